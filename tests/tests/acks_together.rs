//! Acks together: an agent that finds several live copies waiting applies them all, then
//! answers their publisher in one `Acks` message (`cachecast.v1.<env>.ack.<publisherId>.acks.
//! <agentId>`). Every request those acks answer must still be confirmed only by an eviction
//! that happened: the test holds the agent's first eviction so that the next events pile up,
//! lets them through, and then looks into the cache for each confirmed request. And an ack in
//! hand goes once its moment is over, whatever eviction comes behind it.

use std::time::Duration;

use cachecast_agent::CacheBackend;
use cachecast_e2e::scopes::{all_applied, fill_scope, scope_request};
use cachecast_e2e::{AgentHandle, FaultyCache, GatedCache, Stack, eventually};
use cachecast_proto::{AckStatus, Acks, ResponseSelector, Target, Wire};
use cachecast_publisher::InvalidationRequest;
use futures::StreamExt as _;

/// A stack with agent `a1` of `dev` on `backend`, live, and a spy (its client kept with it)
/// subscribed to `subject`.
async fn agent_a1_watched<B: CacheBackend>(
    backend: B,
    subject: &str,
) -> (
    Stack,
    AgentHandle,
    (async_nats::Client, async_nats::Subscriber),
) {
    let stack = Stack::start().await;
    let agent = stack.agent("dev", "a1", backend).await;
    stack.wait_for_agents("dev", 1).await;
    let spy = async_nats::connect(stack.nats.url()).await.expect("spy");
    let watched = spy.subscribe(subject.to_owned()).await.expect("subscribe");
    spy.flush().await.expect("flush");
    (stack, agent, (spy, watched))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_arrived_together_are_acknowledged_together_and_applied() {
    let cache = FaultyCache::default();
    let (stack, _agent, (_spy, mut together)) =
        agent_a1_watched(cache.clone(), "cachecast.v1.dev.ack.*.acks.*").await;

    let scopes: Vec<String> = (0..30).map(|n| format!("s{n}")).collect();
    for scope in &scopes {
        fill_scope(&cache.cache, scope);
    }
    // The first event's eviction is held: the others arrive while the agent waits on it.
    // Counted from here: the agent's start-up flush is an eviction too (CI once saw the first
    // event's eviction begin before the first look, and a wait for "one" never ended).
    let before = cache.evictions_started();
    cache.hold();
    let first = {
        let publisher = stack.publisher.clone();
        let request = scope_request(&scopes[0], Duration::from_secs(20));
        tokio::spawn(async move { publisher.invalidate(request).await })
    };
    eventually(
        "the first eviction is held",
        Duration::from_secs(10),
        || async { cache.evictions_started() == before + 1 },
    )
    .await;
    // Each begun request's event is stored, so its live copy is on its way to the agent.
    let mut rest = Vec::new();
    for scope in &scopes[1..] {
        let request = scope_request(scope, Duration::from_secs(20));
        rest.push(stack.publisher.begin(request).await.expect("published"));
    }
    cache.release();

    let mut outcomes = vec![first.await.expect("the first request").expect("published")];
    for mut in_flight in rest {
        while in_flight.next_ack().await.is_some() {}
        outcomes.push(in_flight.finish());
    }
    for (scope, outcome) in scopes.iter().zip(&outcomes) {
        assert!(all_applied(outcome), "{scope}: {outcome:?}");
        assert!(
            !cache.cache.contains(&format!("{scope}/k")),
            "{scope} was confirmed but is still cached"
        );
    }

    // At least one message carried several acks, each for a request confirmed above.
    let message = tokio::time::timeout(Duration::from_secs(5), together.next())
        .await
        .expect("acks went together")
        .expect("the spy's subscription");
    assert!(message.subject.ends_with(".acks.a1"), "{}", message.subject);
    let acks = Acks::from_bytes(&message.payload).expect("Acks").acks;
    assert!(acks.len() > 1, "one message, several acks: {acks:?}");
    for ack in &acks {
        assert_eq!(ack.agent_id, "a1");
        assert_eq!(ack.status, AckStatus::Applied as i32);
        assert!(
            outcomes.iter().any(|o| o.event_id == ack.event_id),
            "an ack for an event no request here published: {ack:?}"
        );
    }
}

/// Waits for every ack of `in_flight` (or its deadline).
async fn outcome(mut in_flight: cachecast_publisher::InFlight) -> cachecast_publisher::Outcome {
    while in_flight.next_ack().await.is_some() {}
    in_flight.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_in_hand_does_not_wait_for_a_slow_eviction_behind_it() {
    let gate = GatedCache::default();
    let (stack, _agent, (spy, mut copies)) =
        agent_a1_watched(gate.clone(), "cachecast.v1.dev.live").await;

    // A scope eviction held at the gate; behind it, one of every response (which the gate lets
    // by) and another scope (held too).
    let first = stack
        .publisher
        .begin(scope_request("s0", Duration::from_secs(30)))
        .await
        .expect("published");
    let everything = stack
        .publisher
        .begin(InvalidationRequest {
            target: Target::Response(ResponseSelector::default()),
            ..scope_request("all", Duration::from_secs(30))
        })
        .await
        .expect("published");
    let slow = stack
        .publisher
        .begin(scope_request("s2", Duration::from_secs(30)))
        .await
        .expect("published");
    // The copies reach the agent as they reach this spy: all three are there.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), copies.next()).await {
            Ok(Some(copy)) => seen.push(copy.headers.as_ref().and_then(|h| {
                h.get(async_nats::header::NATS_SEQUENCE)
                    .map(|v| v.to_string())
            })),
            Ok(None) => panic!("the spy's subscription ended"),
            // Seen once in CI and not reproduced: say what the stream held.
            Err(_) => {
                let js = async_nats::jetstream::new(spy.clone());
                let state = match js.get_stream("CACHECAST").await {
                    Ok(mut stream) => format!("{:?}", stream.info().await.map(|i| i.state.clone())),
                    Err(err) => err.to_string(),
                };
                panic!(
                    "{} of 3 live copies within 10 s (sequences {seen:?}); published at {}, {}, {}; the stream: {state}",
                    seen.len(),
                    first.sequence(),
                    everything.sequence(),
                    slow.sequence()
                );
            }
        }
    }

    gate.let_one_through();
    assert!(all_applied(&outcome(first).await), "the first");
    // The flush is applied at once; its ack goes while the scope behind it is still held.
    let everything = tokio::time::timeout(Duration::from_secs(10), outcome(everything))
        .await
        .expect("the ack of an applied eviction waited for a held one");
    assert!(all_applied(&everything), "{everything:?}");
    assert!(
        slow.agents().values().all(Option::is_none),
        "the held eviction was not answered: {:?}",
        slow.agents()
    );
    gate.open();
    assert!(all_applied(&outcome(slow).await), "the last");
}
