//! With the standard OTEL_* variables set, the API and the agents export spans over OTLP, and
//! a publish and every agent's eviction are one trace (W3C trace context in NATS headers).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cachecast_e2e::{ChildProcess, Signal, TEST_SECRET, cachecast_with_env, start_serve};

const STARTUP: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(15);

/// A stand-in OpenTelemetry collector: keeps every OTLP/HTTP JSON export it receives.
async fn collector() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let export: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                store.lock().expect("lock").push(export);
                axum::Json(serde_json::json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (url, received)
}

/// (service name, span name, trace id) of every span received.
fn spans(exports: &[serde_json::Value]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for export in exports {
        for resource in export["resourceSpans"].as_array().into_iter().flatten() {
            let service = resource["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_owned();
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    out.push((
                        service.clone(),
                        span["name"].as_str().unwrap_or_default().to_owned(),
                        span["traceId"].as_str().unwrap_or_default().to_owned(),
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_and_its_evictions_are_one_trace() {
    let nats = cachecast_testkit::nats().await;
    let (endpoint, received) = collector().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
    ];
    let (mut serve, api) = start_serve(&nats.url(), &otel).await;
    let mut agents: Vec<ChildProcess> = Vec::new();
    for id in ["traced-1", "traced-2"] {
        let agent = cachecast_with_env(&nats.url(), &["agent", "--env", "dev", "--id", id], &otel);
        agent
            .wait_for_output("agent is live", STARTUP)
            .await
            .unwrap_or_else(|e| panic!("{id} did not start: {e}"));
        agents.push(agent);
    }
    let token = cachecast_e2e::token(TEST_SECRET, &["dev"]);
    let response = reqwest::Client::new()
        .post(format!(
            "{api}/api/1.0/runtime/caches/response/dev/invalidate"
        ))
        .bearer_auth(token)
        .body("{}")
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status().as_u16(), 200);

    // Stopping flushes the exporters.
    for process in agents.iter_mut().chain(std::iter::once(&mut serve)) {
        process.signal(Signal::SIGTERM);
        let status = process.wait_exit(EXIT).await.expect("exits");
        assert!(status.success(), "{status:?}: {}", process.output());
    }
    let spans = spans(&received.lock().expect("lock"));
    let request = spans
        .iter()
        .find(|(service, name, _)| service == "cachecast-serve" && name == "request")
        .unwrap_or_else(|| panic!("no request span from the API in {spans:?}"));
    let trace = &request.2;
    assert_eq!(trace.len(), 32, "a W3C trace id: {trace}");
    let evictions: Vec<_> = spans
        .iter()
        .filter(|(service, name, id)| {
            service == "cachecast-agent" && name == "event" && id == trace
        })
        .collect();
    assert_eq!(
        evictions.len(),
        2,
        "both agents' evictions join the request's trace: {spans:?}"
    );
}
