//! What operators rely on: health and readiness, metrics, logs with the request id, and a
//! graceful shutdown that still answers the request in flight correctly.

use std::time::Duration;

use cachecast_e2e::{
    ChildProcess, Signal, TEST_SECRET, cachecast_with_env, logged_addr, start_serve,
};

const STARTUP: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(15);

async fn start_agent(
    nats_url: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (ChildProcess, String) {
    let mut all = vec!["agent", "--env", "dev", "--admin-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let agent = cachecast_with_env(nats_url, &all, env);
    agent
        .wait_for_output("agent is live", STARTUP)
        .await
        .unwrap_or_else(|e| panic!("agent did not start: {e}"));
    let addr = logged_addr(&agent, "admin endpoints on http://");
    (agent, format!("http://{addr}"))
}

fn token() -> String {
    cachecast_e2e::token(TEST_SECRET, &["dev"])
}

async fn invalidate(
    http: &reqwest::Client,
    base: &str,
    body: &str,
    request_id: &str,
) -> (u16, serde_json::Value) {
    let response = http
        .post(format!(
            "{base}/api/1.0/runtime/caches/response/dev/invalidate?timeout=10s"
        ))
        .bearer_auth(token())
        .header("RequestID", request_id)
        .body(body.to_owned())
        .send()
        .await
        .expect("answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, String) {
    let response = http.get(url).send().await.expect("answers");
    (
        response.status().as_u16(),
        response.text().await.expect("text"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_on_the_api_and_the_agent() {
    let nats = cachecast_testkit::nats().await;
    let mut redis = cachecast_testkit::redis().await;
    let http = reqwest::Client::new();
    let (mut serve, api) = start_serve(&nats.url(), &[]).await;
    let (mut agent, admin) = start_agent(
        &nats.url(),
        &[
            "--id",
            "ops-agent",
            "--backend",
            "redis",
            "--redis-url",
            &redis.url(),
        ],
        &[],
    )
    .await;

    for base in [&api, &admin] {
        assert_eq!(
            get(&http, &format!("{base}/healthz")).await.0,
            200,
            "{base}"
        );
        assert_eq!(get(&http, &format!("{base}/readyz")).await.0, 200, "{base}");
    }
    let (status, body) = invalidate(&http, &api, "{}", "metrics-1").await;
    assert_eq!(status, 200, "{body}");

    let (_, api_metrics) = get(&http, &format!("{api}/metrics")).await;
    for expected in [
        r#"cachecast_invalidations_total{env="dev",outcome="confirmed"} 1"#,
        r#"cachecast_invalidation_seconds_bucket{env="dev",outcome="confirmed""#,
        r#"cachecast_agent_ack_seconds_count{env="dev"} 1"#,
        r#"cachecast_live_agents{env="dev"} 1"#,
    ] {
        assert!(
            api_metrics.contains(expected),
            "{expected} missing from\n{api_metrics}"
        );
    }
    let (_, agent_metrics) = get(&http, &format!("{admin}/metrics")).await;
    for expected in [
        r#"cachecast_agent_flushes_total{env="dev",reason="start"} 1"#,
        r#"cachecast_agent_events_total{env="dev",outcome="applied"} 1"#,
        r#"cachecast_agent_eviction_seconds_count{env="dev"} 1"#,
        "cachecast_nats_connects_total 1",
    ] {
        assert!(
            agent_metrics.contains(expected),
            "{expected} missing from\n{agent_metrics}"
        );
    }
    for text in [&api_metrics, &agent_metrics] {
        assert!(
            !text.contains("metrics-1"),
            "no request ids or keys in labels"
        );
    }

    // The agent is not ready while its cache is unreachable.
    redis.stop().await;
    let (status, body) = get(&http, &format!("{admin}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("redis"), "{body}");
    redis.start_again().await;
    assert_eq!(get(&http, &format!("{admin}/readyz")).await.0, 200);

    for process in [&mut agent, &mut serve] {
        process.signal(Signal::SIGTERM);
        let status = process.wait_exit(EXIT).await.expect("exits");
        assert!(status.success(), "{status:?}: {}", process.output());
    }
}

/// The request is held in flight by pausing the agent's Redis: the agent has the event and
/// waits for Redis to answer.
async fn held_request(
    nats_url: &str,
    redis: &cachecast_testkit::RedisServer,
    serve_env: &[(&str, &str)],
) -> (
    ChildProcess,
    String,
    ChildProcess,
    tokio::task::JoinHandle<(u16, serde_json::Value)>,
) {
    let (serve, api) = start_serve(nats_url, serve_env).await;
    let (agent, _) = start_agent(
        nats_url,
        &[
            "--id",
            "held",
            "--cache-id",
            "held",
            "--backend",
            "redis",
            "--redis-url",
            &redis.url(),
        ],
        &[("RUST_LOG", "info,cachecast_agent=debug")],
    )
    .await;
    redis.pause();
    let request = tokio::spawn({
        let api = api.clone();
        async move { invalidate(&reqwest::Client::new(), &api, "{}", "held-1").await }
    });
    agent
        .wait_for_output("applying the eviction", STARTUP)
        .await
        .unwrap_or_else(|e| panic!("the event did not reach the agent: {e}"));
    (serve, api, agent, request)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_api_mid_request_still_answers_it_correctly() {
    let nats = cachecast_testkit::nats().await;
    let redis = cachecast_testkit::redis().await;
    let (mut serve, api, mut agent, request) = held_request(
        &nats.url(),
        &redis,
        &[("CACHECAST_API__SHUTDOWN_DELAY", "1s")],
    )
    .await;

    serve.signal(Signal::SIGTERM);
    // Readiness goes 503 as soon as shutdown begins, while the request is still in flight.
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = get(&http, &format!("{api}/readyz")).await;
        if status == 503 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never went 503"
        );
    }
    redis.resume();
    let (status, body) = request.await.expect("request task");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["agents"]["held"]["status"], "applied");
    let exit = serve.wait_exit(EXIT).await.expect("serve exits");
    assert!(exit.success(), "{exit:?}: {}", serve.output());
    // Its audit record, queued as it was answered, was written before the process exited.
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let mut trail = async_nats::jetstream::new(client)
        .get_stream("CACHECAST_AUDIT")
        .await
        .expect("the audit stream");
    let last = trail.info().await.expect("stream info").state.last_sequence;
    let written = trail
        .get_raw_message(last)
        .await
        .expect("the last audit message");
    let text = String::from_utf8_lossy(&written.payload);
    assert!(text.contains(r#""requestId":"held-1""#), "{text}");
    agent.signal(Signal::SIGTERM);
    agent.wait_exit(EXIT).await.expect("agent exits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_an_agent_mid_eviction_finishes_acks_and_leaves() {
    let nats = cachecast_testkit::nats().await;
    let redis = cachecast_testkit::redis().await;
    let (mut serve, _api, mut agent, request) = held_request(&nats.url(), &redis, &[]).await;

    agent.signal(Signal::SIGTERM);
    redis.resume();
    let (status, body) = request.await.expect("request task");
    assert_eq!(
        status, 200,
        "the eviction in hand is finished and acknowledged: {body}"
    );
    assert_eq!(body["agents"]["held"]["status"], "applied");
    let exit = agent.wait_exit(EXIT).await.expect("agent exits");
    assert!(exit.success(), "{exit:?}");
    assert!(
        agent.output().contains("presence removed"),
        "{}",
        agent.output()
    );
    serve.signal(Signal::SIGTERM);
    serve.wait_exit(EXIT).await.expect("serve exits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id_on_both_sides() {
    let nats = cachecast_testkit::nats().await;
    let (mut serve, api) = start_serve(&nats.url(), &[]).await;
    let (mut agent, _) = start_agent(
        &nats.url(),
        &["--id", "logger", "--log-format", "json"],
        &[],
    )
    .await;
    let (status, body) = invalidate(&reqwest::Client::new(), &api, "{}", "trace-me-42").await;
    assert_eq!(status, 200, "{body}");
    agent
        .wait_for_output("eviction applied", EXIT)
        .await
        .expect("the agent logs the eviction");
    let line = agent
        .stderr()
        .lines()
        .find(|l| l.contains("eviction applied"))
        .map(str::to_owned)
        .expect("a log line");
    let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(json["span"]["request_id"], "trace-me-42", "{line}");
    assert!(serve.output().contains("trace-me-42"), "{}", serve.output());
    for process in [&mut agent, &mut serve] {
        process.signal(Signal::SIGTERM);
        process.wait_exit(EXIT).await.expect("exits");
    }
}
