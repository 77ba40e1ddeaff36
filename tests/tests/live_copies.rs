//! Live copies (`agent.live_events`, on by default): the stream republishes each event it
//! stores to `cachecast.v1.<env>.live`, agents apply those, and a consumer only catches up.
//! The faults here make the stream store an event without sending its copy (its republish
//! turned off for that event): the agent must still apply it, from the stream, without a
//! flush. Each test looks into the cache.

use std::time::Duration;

use cachecast_agent::{AgentConfig, MemoryCache};
use cachecast_e2e::Stack;
use cachecast_e2e::scopes::{all_applied, fill_scope, scope_request};
use cachecast_publisher::Outcome;
use futures::StreamExt as _;

async fn jetstream(stack: &Stack) -> cachecast_bus::JetStream {
    let client = cachecast_bus::connect(&stack.bus.nats, "operator")
        .await
        .expect("connected");
    cachecast_bus::jetstream(client, &stack.bus.nats)
}

async fn stream(stack: &Stack) -> async_nats::jetstream::stream::Stream {
    let js = jetstream(stack).await;
    js.get_stream(&stack.bus.stream.name)
        .await
        .expect("the stream")
}

/// The stream's configuration as the server holds it now.
async fn stream_config(stack: &Stack) -> async_nats::jetstream::stream::Config {
    stream(stack)
        .await
        .info()
        .await
        .expect("info")
        .config
        .clone()
}

/// Turns the stream's live copies off or back on, as an operator editing it would.
async fn set_live_copies(
    stack: &Stack,
    on: bool,
    original: &async_nats::jetstream::stream::Config,
) {
    let js = jetstream(stack).await;
    let mut config = original.clone();
    if !on {
        config.republish = None;
    }
    js.update_stream(config).await.expect("stream updated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_as_live_copies_not_through_a_consumer() {
    let stack = Stack::start().await;
    let (cache, agent) = stack.memory_agent("dev", "a1").await;
    stack.wait_for_agents("dev", 1).await;
    let mut stream = stream(&stack).await;
    assert!(
        cachecast_bus::republishes_live(&stream.info().await.expect("info").config),
        "the publisher turns the live copies on"
    );
    let mut first = None;
    for n in 0..5 {
        let scope = format!("s{n}");
        fill_scope(&cache, &scope);
        let outcome = stack
            .publisher
            .invalidate(scope_request(&scope, Duration::from_secs(10)))
            .await
            .expect("published");
        assert!(all_applied(&outcome), "{outcome:?}");
        assert!(!cache.contains(&format!("{scope}/k")), "{scope} survived");
        first.get_or_insert(outcome.sequence);
    }
    // The consumer the agent created at start (kept by the server a while after the agent
    // dropped it) delivered none of them.
    let first = first.expect("five events");
    let mut consumers = stream.consumers();
    let mut seen = 0;
    while let Some(info) = consumers.next().await {
        let info = info.expect("consumer info");
        seen += 1;
        assert!(
            info.delivered.stream_sequence < first,
            "a consumer delivered events the live copies bring: {info:?}"
        );
    }
    assert!(seen > 0, "the agent's start-up consumer is still listed");
    agent.stop().await;
}

/// The stream stores an event but sends no copy of it; the next copy's chain shows the gap,
/// and the agent catches up from the stream. The progress check looks only every 15 s, so
/// within the request's 10 s only the chain can have noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_missing_from_the_chain_is_caught_up_from_the_stream() {
    let stack = Stack::start().await;
    let cache = MemoryCache::new();
    let agent = stack
        .agent_builder("dev", "a1")
        .config(AgentConfig {
            heartbeat: Duration::from_secs(15),
            ..AgentConfig::default()
        })
        .start(cache.clone())
        .await;
    stack.wait_for_agents("dev", 1).await;
    for scope in ["lost", "next", "bystander"] {
        fill_scope(&cache, scope);
    }
    let lost = published_without_copy(&stack, "lost", Duration::from_secs(10)).await;
    let next = stack
        .publisher
        .invalidate(scope_request("next", Duration::from_secs(10)))
        .await
        .expect("published");
    assert!(all_applied(&next), "{next:?}");
    let lost = finish(lost).await;
    assert!(all_applied(&lost), "the event without a copy: {lost:?}");
    assert!(
        !cache.contains("lost/k"),
        "the event without a copy was not applied"
    );
    assert!(!cache.contains("next/k"));
    assert!(
        cache.contains("bystander/k"),
        "the agent flushed instead of catching up"
    );
    agent.stop().await;
}

/// The stream stores an event but sends no copy, and nothing comes after it: the progress
/// check sees the stream hold an event the agent has not handled, and it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_copy_lost_is_caught_up_by_the_progress_check() {
    let stack = Stack::start().await;
    let cache = MemoryCache::new();
    let agent = stack
        .agent_builder("dev", "a1")
        .config(AgentConfig {
            heartbeat: Duration::from_millis(500),
            // Well past the test's bound: a flush for lagging would not be a catch-up.
            max_lag: Some(Duration::from_secs(60)),
            ..AgentConfig::default()
        })
        .start(cache.clone())
        .await;
    stack.wait_for_agents("dev", 1).await;
    fill_scope(&cache, "lost");
    fill_scope(&cache, "bystander");
    let lost = published_without_copy(&stack, "lost", Duration::from_secs(20)).await;
    let lost = finish(lost).await;
    assert!(all_applied(&lost), "the event without a copy: {lost:?}");
    assert!(
        !cache.contains("lost/k"),
        "the event without a copy was not applied"
    );
    assert!(
        cache.contains("bystander/k"),
        "the agent flushed instead of catching up"
    );
    agent.stop().await;
}

/// Publishes an eviction of `scope` that the stream stores but sends no live copy of (its
/// republish off for that one event, as an operator editing it would); returns it in flight.
async fn published_without_copy(
    stack: &Stack,
    scope: &str,
    timeout: Duration,
) -> cachecast_publisher::InFlight {
    let original = stream_config(stack).await;
    set_live_copies(stack, false, &original).await;
    let in_flight = stack
        .publisher
        .begin(scope_request(scope, timeout))
        .await
        .expect("stored");
    set_live_copies(stack, true, &original).await;
    in_flight
}

async fn finish(mut in_flight: cachecast_publisher::InFlight) -> Outcome {
    while in_flight.next_ack().await.is_some() {}
    in_flight.finish()
}

/// An agent whose NATS user may not subscribe to the live copies (an `accounts.conf` from
/// before them) gets none: once the progress check shows it missed one, it takes every event
/// from a consumer, and confirms them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refused_the_live_copies_takes_events_from_a_consumer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("nats.conf");
    std::fs::write(
        &config,
        r#"authorization { users = [
            { user: api, password: api },
            { user: agent, password: agent, permissions: { subscribe: { allow: [">"], deny: ["cachecast.v1.*.live"] } } }
        ] }
        "#,
    )
    .expect("write the server config");
    let nats = cachecast_e2e::NatsServer::builder(cachecast_testkit::nats_binary())
        .arg("-c")
        .arg(config.to_string_lossy())
        .start()
        .await
        .unwrap_or_else(|e| panic!("nats-server did not start: {e}"));
    let as_user = |bus: &mut cachecast_bus::BusConfig, user: &str| {
        bus.nats.user = Some(user.into());
        bus.nats.password = Some(cachecast_bus::Secret::new(user));
    };
    let stack = Stack::builder()
        .nats(nats)
        .bus(|bus| as_user(bus, "api"))
        .start()
        .await;
    let mut agent_bus = stack.bus.clone();
    as_user(&mut agent_bus, "agent");
    let cache = MemoryCache::new();
    let agent = stack
        .agent_builder("dev", "a1")
        .bus(&agent_bus)
        .config(AgentConfig {
            heartbeat: Duration::from_millis(500),
            max_lag: Some(Duration::from_secs(60)),
            ..AgentConfig::default()
        })
        .start(cache.clone())
        .await;
    stack.wait_for_agents("dev", 1).await;
    fill_scope(&cache, "bystander");
    for n in 0..3 {
        let scope = format!("s{n}");
        fill_scope(&cache, &scope);
        let outcome = stack
            .publisher
            .invalidate(scope_request(&scope, Duration::from_secs(10)))
            .await
            .expect("published");
        assert!(all_applied(&outcome), "{outcome:?}");
        assert!(!cache.contains(&format!("{scope}/k")), "{scope} survived");
    }
    assert!(cache.contains("bystander/k"), "the agent flushed instead");
    // One consumer delivered all three: the agent stopped waiting for copies after the first.
    let mut consumers = stream(&stack).await.consumers();
    let mut most = 0;
    while let Some(info) = consumers.next().await {
        most = most.max(info.expect("consumer info").delivered.consumer_sequence);
    }
    assert_eq!(
        most, 3,
        "events came through one consumer each, not one for all"
    );
    agent.stop().await;
}

/// A stream from before live copies gets them when a publisher starts; a republish an
/// operator set up for something else is left alone (agents then keep consumers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_turns_live_copies_on_but_keeps_an_operators_republish() {
    let stack = Stack::start().await;
    let original = stream_config(&stack).await;
    set_live_copies(&stack, false, &original).await;
    let _second = cachecast_e2e::start_publisher(&stack.bus, "second").await;
    let config = stream_config(&stack).await;
    assert!(cachecast_bus::republishes_live(&config), "{config:?}");

    let theirs = async_nats::jetstream::stream::Republish {
        source: cachecast_proto::Subjects::ALL_EVENTS.into(),
        destination: "audit-feed.{{wildcard(1)}}".into(),
        headers_only: true,
    };
    let js = jetstream(&stack).await;
    js.update_stream(async_nats::jetstream::stream::Config {
        republish: Some(theirs.clone()),
        ..original.clone()
    })
    .await
    .expect("stream updated");
    let _third = cachecast_e2e::start_publisher(&stack.bus, "third").await;
    let config = stream_config(&stack).await;
    assert_eq!(config.republish, Some(theirs));
}
