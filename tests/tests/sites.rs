//! Sites behind NATS leaf nodes across a WAN: the publisher and the stream at a hub whose
//! JetStream has a domain, agents at two sites whose servers are leaf nodes of the hub, each
//! link 40 ms each way. Every site server runs a JetStream of its own, so an agent that did not
//! use `nats.jetstream_domain` would read the wrong one.
//!
//! The promise across a cut link: the cut site's caches are named (`424`) while their presence
//! lives; a memory cache has flushed by the time publishers stop expecting it; a Redis cache
//! stays expected (`424 unattended`); the other site keeps its `200`s; and once the link is
//! back, the first `200` that counts the Redis cache finds nothing stale in it. Each checked in
//! the caches themselves.

use std::time::Duration;

use cachecast_agent::{AgentConfig, MemoryCache, RedisBackend, RedisConfig};
use cachecast_bus::BusConfig;
use cachecast_e2e::{Answer, RedisCache, Stack, env_id, eventually};
use cachecast_testkit::{LeafHub, LeafSite};

/// One way across a site's WAN link (a round trip is twice it).
const WAN: Duration = Duration::from_millis(40);
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Short, so a cut site's presence expires within the test.
const PRESENCE_MAX_AGE: Duration = Duration::from_secs(5);
const HUB_DOMAIN: &str = "hub";

/// The bus settings of a site's agents: their site's server, the hub's JetStream domain, and an
/// inbox prefix of the site's own.
fn site_bus(stack: &Stack, site: &LeafSite, name: &str) -> BusConfig {
    let mut bus = stack.bus.clone();
    bus.nats.url = site.server.url();
    bus.nats.jetstream_domain = Some(HUB_DOMAIN.into());
    bus.nats.inbox_prefix = format!("_INBOX.{name}");
    bus
}

fn agent_config() -> AgentConfig {
    AgentConfig {
        heartbeat: HEARTBEAT,
        ..AgentConfig::default()
    }
}

/// The failures of an answer: node id and type, sorted.
fn failures(answer: &Answer) -> Vec<(String, String)> {
    let mut failures: Vec<(String, String)> = answer.body["_nodes"]["failures"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            (
                f["node_id"].as_str().unwrap_or_default().to_owned(),
                f["type"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    failures.sort();
    failures
}

fn applied(answer: &Answer, id: &str) -> bool {
    answer.body["agents"][id]["status"] == "applied"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_site_is_named_until_it_has_flushed_or_caught_up_and_the_other_site_keeps_its_200s() {
    let hub = LeafHub::start(HUB_DOMAIN).await;
    let site_a = LeafSite::start("site-a", &hub, WAN).await;
    let site_b = LeafSite::start("site-b", &hub, WAN).await;
    let LeafHub { server, .. } = hub;
    let stack = Stack::builder()
        .nats(server)
        .bus(|bus| bus.presence.max_age = PRESENCE_MAX_AGE)
        .start()
        .await;

    let bus_a = site_bus(&stack, &site_a, "site-a");
    let bus_b = site_bus(&stack, &site_b, "site-b");
    let a_memory = MemoryCache::new();
    let _a_memory_agent = stack
        .agent_builder("dev", "a-memory")
        .bus(&bus_a)
        .config(agent_config())
        .start(a_memory.clone())
        .await;
    let redis = cachecast_testkit::redis().await;
    let mut a_redis = RedisCache::open(&redis.url()).await;
    let backend = RedisBackend::new(&RedisConfig {
        url: redis.url(),
        ..RedisConfig::default()
    })
    .expect("redis backend");
    let a_redis_agent = stack
        .agent_builder("dev", "a-redis")
        .bus(&bus_a)
        .config(agent_config())
        .start(backend)
        .await;
    let b_memory = MemoryCache::new();
    let _b_memory_agent = stack
        .agent_builder("dev", "b-memory")
        .bus(&bus_b)
        .config(agent_config())
        .start(b_memory.clone())
        .await;
    stack.wait_for_agents("dev", 3).await;

    // Both sites confirm across their links.
    let seed = |cache: &MemoryCache| {
        cache.insert("k1", "s1", "u1", bytes::Bytes::from_static(b"permit"));
        cache.insert("k2", "s2", "u1", bytes::Bytes::from_static(b"permit"));
    };
    seed(&a_memory);
    seed(&b_memory);
    a_redis
        .set(&["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a", "pdp:dev:s3:u1:a"])
        .await;
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "?timeout=5s")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["total"], 3, "{}", answer.body);
    assert!(!a_memory.contains("k1") && !b_memory.contains("k1"));
    assert_eq!(a_redis.keys().await, ["pdp:dev:s2:u1:a", "pdp:dev:s3:u1:a"]);

    // Site A's link is cut. Its agents stay connected to their own server: they see no
    // disconnect, only requests that nothing answers.
    site_a.link.cut();
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s2"}"#, "?timeout=2s")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    let named = failures(&answer);
    assert_eq!(
        named.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["a-memory", "a-redis"],
        "the cut site's caches, and only they: {}",
        answer.body
    );
    assert!(applied(&answer, "b-memory"), "{}", answer.body);
    assert!(!b_memory.contains("k2"), "the other site applied it");

    // Once site A's presence expires, publishers stop expecting its memory cache, which must
    // have flushed by then; its Redis cache stays expected, unattended; site B answers 200.
    stack.wait_for_agents("dev", 1).await;
    assert!(
        a_memory.is_empty(),
        "the cut memory cache still held {:?} when publishers stopped expecting it",
        a_memory.keys()
    );
    // A PAA at site A still writes to its Redis while the site is cut off.
    a_redis.set(&["pdp:dev:s4:u1:a"]).await;
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s4"}"#, "?timeout=2s")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    assert_eq!(
        failures(&answer),
        [("a-redis".to_owned(), "unattended".to_owned())],
        "{}",
        answer.body
    );
    assert!(applied(&answer, "b-memory"), "{}", answer.body);

    // The link returns: site A attends its caches again, and its first 200 vouches for a
    // Redis that holds nothing invalidated while it was cut off.
    site_a.link.restore();
    site_a.wait_linked(HUB_DOMAIN).await;
    stack.wait_for_agents("dev", 3).await;
    eventually(
        "site A's agents vouch for their caches again",
        Duration::from_secs(20),
        || {
            let live = stack.publisher.live_agents(&env_id("dev"));
            std::future::ready(live.len() == 3 && live.iter().all(|a| a.lagging.is_none()))
        },
    )
    .await;
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s5"}"#, "?timeout=5s")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["total"], 3, "{}", answer.body);
    assert!(applied(&answer, "a-redis"), "{}", answer.body);
    let stale: Vec<String> = a_redis
        .keys()
        .await
        .into_iter()
        .filter(|key| {
            ["s2", "s3", "s4"]
                .iter()
                .any(|s| key.contains(&format!(":{s}:")))
        })
        .collect();
    assert!(stale.is_empty(), "stale after the 200: {stale:?}");
    a_redis_agent.stop().await;
}
