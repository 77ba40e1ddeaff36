//! The fast path (`agent.fast_path = true`; off by default): agents apply an event as NATS delivers it to the
//! environment's subject, before the stream dispatches it, and the consumer stays the
//! backstop. Each test looks into the cache, and at the acks on the wire: an ack from the fast
//! path reports stream sequence 0, one from the stream the event's sequence.

use std::collections::HashMap;
use std::time::Duration;

use cachecast_agent::{AgentConfig, MemoryCache};
use cachecast_e2e::scopes::{all_applied, fill_scope, scope_request};
use cachecast_e2e::{NatsServer, Stack, TcpProxy, env_id, eventually};
use cachecast_proto::{Ack, AckStatus, Wire};
use futures::{FutureExt as _, StreamExt as _};

/// A stack whose server has a monitoring port, to see which subscriptions the server holds.
async fn stack_with_monitor() -> (Stack, u16) {
    let monitor = cachecast_testkit::free_port();
    let nats = NatsServer::builder(cachecast_testkit::nats_binary())
        .args(["-m", &monitor.to_string()])
        .start()
        .await
        .unwrap_or_else(|error| panic!("could not start nats-server: {error}"));
    let stack = Stack::builder()
        .nats(nats)
        .bus(|bus| bus.presence.max_age = Duration::from_secs(30))
        .start()
        .await;
    (stack, monitor)
}

/// How many connections the server holds a subscription to `subject` for.
async fn subscribers(monitor: u16, subject: &str) -> usize {
    let connz: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{monitor}/connz?subs=1"))
        .await
        .expect("the monitoring port answers")
        .json()
        .await
        .expect("connz is JSON");
    connz["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter(|c| {
            c["subscriptions_list"]
                .as_array()
                .is_some_and(|subs| subs.iter().any(|s| s == subject))
        })
        .count()
}

/// Every ack received on `acks` so far (after a round trip of its client).
fn drain(acks: &mut async_nats::Subscriber) -> Vec<Ack> {
    let mut received = Vec::new();
    while let Some(Some(message)) = acks.next().now_or_never() {
        received.push(Ack::from_bytes(&message.payload).expect("an ack"));
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_applied_from_the_fast_path_and_acknowledged_once() {
    let (stack, _) = stack_with_monitor().await;
    let cache = MemoryCache::new();
    let agent = stack
        .agent_builder("dev", "a1")
        .config(AgentConfig {
            fast_path: true,
            ..AgentConfig::default()
        })
        .start(cache.clone())
        .await;
    stack.wait_for_agents("dev", 1).await;
    let (observer, mut acks) = stack.ack_observer("dev").await;

    let mut last = 0;
    for n in 0..10 {
        let scope = format!("s{n}");
        fill_scope(&cache, &scope);
        let outcome = stack
            .publisher
            .invalidate(scope_request(&scope, Duration::from_secs(10)))
            .await
            .expect("published");
        assert!(all_applied(&outcome), "{outcome:?}");
        assert!(!cache.contains(&format!("{scope}/k")), "{scope} survived");
        last = outcome.sequence;
    }
    // Once the consumer has handled the last event too, every ack either path would send has
    // been sent.
    eventually(
        "the agent's consumer reaches the last event",
        Duration::from_secs(20),
        || {
            let live = stack.publisher.live_agents(&env_id("dev"));
            std::future::ready(live.iter().any(|a| a.progress.applied_sequence >= last))
        },
    )
    .await;
    observer.flush().await.expect("flush");
    let received = drain(&mut acks);
    let mut per_event: HashMap<&str, usize> = HashMap::new();
    for ack in &received {
        assert_eq!(
            AckStatus::try_from(ack.status),
            Ok(AckStatus::Applied),
            "{ack:?}"
        );
        *per_event.entry(ack.event_id.as_str()).or_default() += 1;
    }
    assert_eq!(per_event.len(), 10, "an ack for every event: {received:?}");
    assert!(
        per_event.values().all(|&n| n == 1),
        "each event acknowledged once, whichever path brought it first: {received:?}"
    );
    assert!(
        received.iter().any(|ack| ack.stream_sequence == 0),
        "no event was applied from the fast path: {received:?}"
    );
    agent.stop().await;
}

/// The agent's link is cut while an event is published: its fast-path copy goes to nobody.
/// Back, the agent gets the event from its consumer, applies it and confirms it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_fast_path_missed_is_applied_from_the_stream() {
    let (stack, monitor) = stack_with_monitor().await;
    let proxy = TcpProxy::start(stack.nats.port()).await;
    let cache = MemoryCache::default();
    // Long heartbeats: the cut must not outlast presence, so the cache stays expected and no
    // stale-presence flush empties it.
    let config = AgentConfig {
        heartbeat: Duration::from_secs(10),
        fast_path: true,
        ..AgentConfig::default()
    };
    let agent = stack
        .agent_builder("dev", "a1")
        .via(&proxy.nats_url())
        .config(config)
        .start(cache.clone())
        .await;
    stack.wait_for_agents("dev", 1).await;
    let subject = "cachecast.v1.dev.inval";
    assert_eq!(
        subscribers(monitor, subject).await,
        1,
        "the agent takes the fast path"
    );
    let (observer, mut acks) = stack.ack_observer("dev").await;
    fill_scope(&cache, "s1");
    fill_scope(&cache, "s2");

    proxy.cut();
    eventually(
        "the server drops the agent's subscription",
        Duration::from_secs(10),
        || async { subscribers(monitor, subject).await == 0 },
    )
    .await;
    // Stored, and its copy delivered to no agent.
    let mut in_flight = stack
        .publisher
        .begin(scope_request("s1", Duration::from_secs(25)))
        .await
        .expect("published");
    assert!(cache.contains("s1/k"), "nothing reached the agent");
    proxy.restore();
    while in_flight.next_ack().await.is_some() {}
    let outcome = in_flight.finish();
    assert!(all_applied(&outcome), "{outcome:?}");
    assert!(!cache.contains("s1/k"), "the invalidated entry survived");
    assert!(
        cache.contains("s2/k"),
        "the agent applied the event, it did not flush"
    );
    observer.flush().await.expect("flush");
    let received = drain(&mut acks);
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(
        received[0].stream_sequence, outcome.sequence,
        "applied from the stream: {received:?}"
    );
    agent.stop().await;
}
