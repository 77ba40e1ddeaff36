//! Joining: a cache in an agent's process serves nothing until its agent's presence is stored,
//! and a publisher reads its view through to the buckets' last writes for the environment
//! before it fixes a request's expected set. Without either, a request sent just after a new
//! agent's cache began serving could leave that cache out: a `200` while it still held an
//! entry the request covers, until the agent applied the event.

use std::time::Duration;

use bytes::Bytes;
use cachecast_agent::{Agent, AgentConfig, MemoryCache};
use cachecast_bus::BusConfig;
use cachecast_e2e::{Stack, env_id, eventually, init_logs, start_publisher};
use cachecast_proto::{AgentId, Presence, Target, Wire};
use cachecast_publisher::{InvalidationRequest, Outcome, Publisher};

/// Presences written just before a request, one per round: the watch that feeds the
/// publisher's view races each request, so some rounds would leave the newcomer out.
const ROUNDS: usize = 20;
/// Writes of another environment stored just before each newcomer's: its watch delivers them
/// first, so it lags well behind the request's own round trip to the stream.
const AHEAD: usize = 1000;

/// Invalidates every response of `dev` and waits for its acks (or `timeout`).
async fn everything(publisher: &Publisher, request_id: &str, timeout: Duration) -> Outcome {
    let mut in_flight = publisher
        .begin(InvalidationRequest {
            env: env_id("dev"),
            target: Target::Response(Default::default()),
            request_id: request_id.into(),
            timeout,
            caller: None,
        })
        .await
        .expect("published");
    while in_flight.next_ack().await.is_some() {}
    in_flight.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_expects_every_agent_whose_presence_was_stored_before_it() {
    let stack = Stack::start().await;
    let writer = async_nats::connect(stack.nats.url()).await.expect("writer");
    let js = async_nats::jetstream::new(writer);
    let bucket = &stack.bus.presence.bucket;
    for n in 0..ROUNDS {
        let mut ahead = Vec::with_capacity(AHEAD);
        for k in 0..AHEAD {
            let other = Presence {
                agent_id: format!("busy-{k}"),
                env: "other".into(),
                heartbeat_ms: 60_000,
                ..Default::default()
            };
            let subject = format!("$KV.{bucket}.other.busy-{k}");
            ahead.push(
                js.publish(subject, other.to_bytes())
                    .await
                    .expect("publish"),
            );
        }
        for stored in ahead {
            stored.await.expect("stored");
        }
        let joiner = format!("joiner-{n}");
        // An agent that announced itself (it applies nothing: these rounds only look at
        // whom the request expected).
        let presence = Presence {
            agent_id: joiner.clone(),
            env: "dev".into(),
            heartbeat_ms: 60_000,
            ..Default::default()
        };
        js.publish(format!("$KV.{bucket}.dev.{joiner}"), presence.to_bytes())
            .await
            .expect("publish the presence")
            .await
            .expect("the presence is stored");
        let outcome = everything(
            &stack.publisher,
            &format!("after-{joiner}"),
            Duration::from_millis(100),
        )
        .await;
        let joiner = AgentId::new(&joiner).expect("agent id");
        assert!(
            outcome.agents.contains_key(&joiner),
            "round {n}: {joiner}'s presence was stored before the request, which expected only {:?}",
            outcome.agents.keys().collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_cache_serves_nothing_until_its_agent_is_announced() {
    init_logs();
    let nats = cachecast_testkit::nats().await;
    let mut bus = BusConfig::default();
    bus.nats.url = nats.url();
    let cache = MemoryCache::new();
    cache.insert(
        "before",
        "s",
        "i",
        Bytes::from_static(b"cached before the agent"),
    );
    assert!(
        cache.get("before").is_some(),
        "a cache without an agent serves"
    );

    // No publisher has created the stream yet: the agent's start waits for it.
    let client = cachecast_bus::connect(&bus.nats, "a1")
        .await
        .expect("agent client");
    let agent = Agent::new(
        client,
        &bus,
        (env_id("dev"), AgentId::new("a1").expect("agent id")),
        AgentConfig::default(),
        cache.clone(),
    );
    let starting = tokio::spawn(agent.start());
    eventually(
        "the starting agent stops its cache serving",
        Duration::from_secs(10),
        || std::future::ready(!cache.is_serving()),
    )
    .await;
    assert_eq!(
        cache.get("before"),
        None,
        "served before the agent was announced"
    );
    let ticket = cache.ticket();
    assert!(
        !cache.insert_if_current(ticket, "during", "s", "i", Bytes::from_static(b"x")),
        "a fill was taken before the agent was announced"
    );

    let publisher = start_publisher(&bus, "p1").await;
    let running = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .expect("the agent starts once the stream exists")
        .expect("the start task")
        .expect("the agent starts");
    assert!(cache.is_serving(), "a live agent's cache serves");
    assert!(!cache.contains("before"), "what it held before was flushed");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(running.run(async {
        stopped.await.ok();
    }));
    // The first request after the start expects the agent, and is applied by it.
    let outcome = everything(&publisher, "after-start", Duration::from_secs(10)).await;
    assert!(
        outcome.confirmed()
            && outcome
                .agents
                .contains_key(&AgentId::new("a1").expect("id")),
        "{outcome:?}"
    );
    stop.send(()).expect("the agent runs");
    agent
        .await
        .expect("the agent task")
        .expect("the agent stops cleanly");
}
