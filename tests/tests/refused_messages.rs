//! What a peer with the right to publish on cachecast's subjects can make of a bad message:
//! nothing but a count. Garbage, truncated, oversized, unknown-version and misaddressed events
//! on an environment's events subject, and acks (alone or together) that are malformed,
//! misaddressed, for no request, or from an agent that was not expected, are counted by reason
//! (`cachecast_agent_rejected_events_total`, `cachecast_rejected_acks_total`) and ignored: the
//! agent stays ready and applies the next real invalidation, and a request in flight gets its
//! right answer. Real NATS, the real publisher and agent in this process.

use std::time::Duration;

use async_nats::HeaderMap;
use cachecast_agent::{Agent, AgentConfig, CacheBackend};
use cachecast_bus::{WIRE_VERSION, WIRE_VERSION_HEADER};
use cachecast_e2e::{GatedCache, JOIN_TIMEOUT, Recorder, Stack, eventually};
use cachecast_proto::{
    Ack, AckStatus, Acks, AgentId, EnvId, Invalidation, MAX_MESSAGE_BYTES, ResponseSelector,
    Target, Wire,
};
use metrics_exporter_prometheus::PrometheusHandle;

/// The value of counter `name{env, reason}` in a Prometheus rendering (0 when absent).
fn counter(metrics: &PrometheusHandle, name: &str, env: &str, reason: &str) -> u64 {
    let prefix = format!("{name}{{env=\"{env}\",reason=\"{reason}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |value| value.trim().parse().expect("a counter value"))
}

/// A valid event for `env`, as a publisher would make it.
fn event(env: &str) -> Invalidation {
    let event_id = cachecast_proto::new_event_id();
    Invalidation {
        ack_subject: format!("cachecast.v1.{env}.ack.test-publisher.{event_id}"),
        event_id,
        env: env.into(),
        request_id: "forged".into(),
        issued_at_unix_ms: cachecast_proto::now_unix_ms(),
        takes_acks_together: true,
        target: Some(Target::Response(ResponseSelector {
            scope_client_ids: vec!["forged-scope".into()],
            identity_id: None,
        })),
    }
}

/// Starts an agent of `env` in this process with its `/readyz` served; returns the URL of
/// `/readyz` and a sender that stops the agent.
async fn agent_with_readyz<B: CacheBackend>(
    stack: &Stack,
    metrics: &PrometheusHandle,
    env: &str,
    id: &str,
    backend: B,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let client = cachecast_bus::connect(&stack.bus.nats, id)
        .await
        .expect("agent NATS client");
    let agent = Agent::new(
        client,
        &stack.bus,
        (
            EnvId::new(env).expect("env"),
            AgentId::new(id).expect("agent id"),
        ),
        AgentConfig::default(),
        backend,
    );
    let probe = agent.probe();
    let health = cachecast_admin::Health::new(move || {
        let probe = probe.clone();
        async move { probe.ready().await }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind admin");
    let readyz = format!("http://{}/readyz", listener.local_addr().expect("addr"));
    let router = cachecast_admin::router(health, metrics.clone());
    tokio::spawn(cachecast_admin::serve(
        listener,
        router,
        std::future::pending(),
    ));
    let running = tokio::time::timeout(JOIN_TIMEOUT, agent.start())
        .await
        .expect("agent starts in time")
        .expect("agent starts");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(running.run(async {
        stopped.await.ok();
    }));
    stack.wait_for_agents(env, 1).await;
    (readyz, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_counts_and_ignores_events_it_cannot_apply() {
    let metrics = cachecast_admin::install_metrics();
    let stack = Stack::start().await;
    let env = "refuse";
    let recorder = Recorder::default();
    let (readyz, stop) = agent_with_readyz(&stack, &metrics, env, "sturdy", recorder.clone()).await;
    assert_eq!(recorder.seen(), ["*"], "the start-up flush");

    let client = async_nats::connect(stack.nats.url()).await.expect("client");
    let js = async_nats::jetstream::new(client);
    let subject = format!("cachecast.v1.{env}.inval");
    let store = |headers: HeaderMap, payload: Vec<u8>| {
        let js = js.clone();
        let subject = subject.clone();
        async move {
            js.publish_with_headers(subject, headers, payload.into())
                .await
                .expect("publish")
                .await
                .expect("stored in the stream");
        }
    };
    // A flood of garbage: counted one by one, logged once per interval.
    const FLOOD: u64 = 50;
    for _ in 0..FLOOD {
        store(HeaderMap::new(), b"not protobuf at all".to_vec()).await;
    }
    let whole = event(env).to_bytes();
    store(HeaderMap::new(), whole[..whole.len() - 5].to_vec()).await;
    store(HeaderMap::new(), vec![0u8; MAX_MESSAGE_BYTES + 1]).await;
    let mut future = HeaderMap::new();
    future.insert(WIRE_VERSION_HEADER, "2");
    store(future, event(env).to_bytes().to_vec()).await;
    store(HeaderMap::new(), event("elsewhere").to_bytes().to_vec()).await;
    let mut wrong_ack = event(env);
    wrong_ack.ack_subject = format!("cachecast.v1.{env}.ack.test-publisher.another-event");
    store(HeaderMap::new(), wrong_ack.to_bytes().to_vec()).await;
    // An event named like acks together: its ack would read as a batch.
    let mut named_acks = event(env);
    named_acks.event_id = cachecast_proto::Subjects::ACKS_TOGETHER.into();
    named_acks.ack_subject = format!("cachecast.v1.{env}.ack.test-publisher.acks");
    store(HeaderMap::new(), named_acks.to_bytes().to_vec()).await;
    // The current version, said out loud, is fine (and nobody waits for this ack).
    let mut current = HeaderMap::new();
    current.insert(WIRE_VERSION_HEADER, WIRE_VERSION);
    store(current, event(env).to_bytes().to_vec()).await;

    // Events are handled in stream order: once the real one is answered, all of the above
    // were handled.
    let answer = stack
        .invalidate(env, r#"{"scopeClientId": "orders-api"}"#, "?timeout=10s")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["successful"], 1, "{}", answer.body);
    assert_eq!(
        recorder.seen(),
        ["*", "forged-scope", "orders-api"],
        "only the valid events were applied"
    );
    let name = "cachecast_agent_rejected_events_total";
    for (reason, count) in [
        ("malformed", FLOOD),
        ("truncated", 1),
        ("oversized", 1),
        ("unknown_version", 1),
        ("wrong_env", 1),
        ("invalid", 2),
    ] {
        assert_eq!(
            counter(&metrics, name, env, reason),
            count,
            "{reason}:\n{}",
            metrics.render()
        );
    }
    let ready = reqwest::get(&readyz).await.expect("readyz answers");
    assert_eq!(ready.status().as_u16(), 200, "the agent stays ready");
    stop.send(()).ok();
}

fn ack(event_id: &str, agent: &str, status: AckStatus) -> Vec<u8> {
    Ack {
        event_id: event_id.into(),
        agent_id: agent.into(),
        status: status as i32,
        evicted: 1,
        error: if status == AckStatus::Failed {
            "forged failure".into()
        } else {
            String::new()
        },
        stream_sequence: 1,
        cache_id: String::new(),
    }
    .to_bytes()
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_refuses_forged_acks_and_answers_correctly() {
    let metrics = cachecast_admin::install_metrics();
    let stack = Stack::start().await;
    let env = "forged";
    let gate = GatedCache::default();
    let (_readyz, stop) = agent_with_readyz(&stack, &metrics, env, "honest", gate.clone()).await;
    let spy = async_nats::connect(stack.nats.url()).await.expect("client");
    let stream = async_nats::jetstream::new(spy.clone())
        .get_stream("CACHECAST")
        .await
        .expect("the stream");

    // A real request, held in flight by the gate while forged acks arrive.
    let request = {
        let http = stack.http.clone();
        let url = format!(
            "{}/api/1.0/runtime/caches/response/{env}/invalidate?timeout=20s",
            stack.base_url
        );
        let token = stack.token(&[env]);
        tokio::spawn(async move {
            let response = http
                .post(url)
                .bearer_auth(token)
                .header("Content-Type", "application/json")
                .body(r#"{"scopeClientId": "orders-api"}"#)
                .send()
                .await
                .expect("the API answers");
            cachecast_e2e::answer(response).await
        })
    };
    // The event, read back from the stream once it is stored.
    let subject = format!("cachecast.v1.{env}.inval");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let payload = loop {
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => break message.payload,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Say what the request got instead (a refusal, say), to tell why nothing was stored.
            Err(err) => {
                let answer = tokio::time::timeout(Duration::from_secs(25), request).await;
                panic!("no event stored within 30 s ({err}); the request: {answer:?}")
            }
        }
    };
    let real = Invalidation::from_bytes(&payload).expect("a real event");
    let (prefix, _) = real.ack_subject.rsplit_once('.').expect("an ack subject");
    let publisher = prefix.rsplit('.').next().expect("publisher id").to_owned();
    let other_env_subject = format!("cachecast.v1.other.ack.{publisher}.{}", real.event_id);
    let unknown_id = cachecast_proto::new_event_id();
    let forgeries: Vec<(String, Vec<u8>)> = vec![
        (real.ack_subject.clone(), b"not protobuf at all".to_vec()),
        (real.ack_subject.clone(), {
            let whole = ack(&real.event_id, "honest", AckStatus::Failed);
            whole[..whole.len() - 5].to_vec()
        }),
        (real.ack_subject.clone(), vec![0u8; MAX_MESSAGE_BYTES + 1]),
        // The subject names the real event, the payload another.
        (
            real.ack_subject.clone(),
            ack(&unknown_id, "honest", AckStatus::Failed),
        ),
        // Another environment's subject, claiming the expected agent failed: if it counted,
        // the answer would be a 424.
        (
            other_env_subject,
            ack(&real.event_id, "honest", AckStatus::Failed),
        ),
        // An agent nobody expected.
        (
            real.ack_subject.clone(),
            ack(&real.event_id, "ghost", AckStatus::Applied),
        ),
        // An event this publisher never published.
        (
            format!("cachecast.v1.{env}.ack.{publisher}.{unknown_id}"),
            ack(&unknown_id, "honest", AckStatus::Applied),
        ),
        // Acks together from one agent, one of them naming another: if it counted, the answer
        // would be a 424.
        (
            format!("cachecast.v1.{env}.ack.{publisher}.acks.intruder"),
            Acks {
                acks: vec![
                    Ack::from_bytes(&ack(&real.event_id, "honest", AckStatus::Failed))
                        .expect("an ack"),
                    Ack::from_bytes(&ack(&unknown_id, "intruder", AckStatus::Applied))
                        .expect("an ack"),
                ],
            }
            .to_bytes()
            .to_vec(),
        ),
        // More acks together than any agent sends, and none at all.
        (
            format!("cachecast.v1.{env}.ack.{publisher}.acks.honest"),
            Acks {
                acks: vec![
                    Ack::from_bytes(&ack(&real.event_id, "honest", AckStatus::Failed))
                        .expect("an ack");
                    cachecast_proto::MAX_ACKS_TOGETHER + 1
                ],
            }
            .to_bytes()
            .to_vec(),
        ),
        (
            format!("cachecast.v1.{env}.ack.{publisher}.acks.honest"),
            Acks { acks: vec![] }.to_bytes().to_vec(),
        ),
    ];
    for (subject, payload) in forgeries {
        spy.publish(subject, payload.into()).await.expect("publish");
    }
    spy.flush().await.expect("flush");
    let name = "cachecast_rejected_acks_total";
    let expected = [
        (env, "malformed", 2),
        (env, "truncated", 1),
        (env, "oversized", 2),
        (env, "mismatched_subject", 2),
        ("other", "wrong_env", 1),
        (env, "unexpected_agent", 1),
        (env, "unknown_event", 2),
    ];
    eventually(
        "every forged ack is counted",
        Duration::from_secs(10),
        || async {
            expected
                .iter()
                .all(|(env, reason, n)| counter(&metrics, name, env, reason) == *n)
        },
    )
    .await;

    gate.open();
    let answer = request.await.expect("the request task");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["total"], 1, "{}", answer.body);
    assert_eq!(answer.body["agents"]["honest"]["status"], "applied");
    assert!(answer.body["agents"]["ghost"].is_null(), "{}", answer.body);

    // After the request: the same ack again is late, not unknown.
    spy.publish(
        real.ack_subject.clone(),
        ack(&real.event_id, "honest", AckStatus::Applied).into(),
    )
    .await
    .expect("publish");
    eventually(
        "the late ack is counted",
        Duration::from_secs(10),
        || async { counter(&metrics, name, env, "late") == 1 },
    )
    .await;
    for (env, reason, n) in expected {
        assert_eq!(counter(&metrics, name, env, reason), n, "{env} {reason}");
    }
    stop.send(()).ok();
}
