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

use std::time::{Duration, Instant};

use cachecast_agent::{AgentConfig, CacheBackend, MemoryCache, RedisBackend, RedisConfig};
use cachecast_bus::BusConfig;
use cachecast_e2e::{
    AgentHandle, Answer, RedisCache, Stack, env_id, eventually, start_agent, start_publisher,
};
use cachecast_proto::{AgentId, ResponseSelector, Target};
use cachecast_publisher::InvalidationRequest;
use cachecast_testkit::{LeafHub, LeafSite, NatsCluster};
use futures::StreamExt as _;

fn agent_id(id: &str) -> AgentId {
    AgentId::new(id).expect("valid agent id")
}

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

fn heartbeat_every_second() -> AgentConfig {
    AgentConfig {
        heartbeat: HEARTBEAT,
        ..AgentConfig::default()
    }
}

/// Starts agent `id` of `env` on `bus` (a site's, from [`site_bus`]), heartbeating every
/// [`HEARTBEAT`], and waits until it is live.
async fn site_agent<B: CacheBackend>(
    stack: &Stack,
    bus: &BusConfig,
    env: &str,
    id: &str,
    backend: B,
) -> AgentHandle {
    stack
        .agent_builder(env, id)
        .bus(bus)
        .config(heartbeat_every_second())
        .start(backend)
        .await
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

/// The API and its publisher on the hub's server (its sites started first: they need the hub's
/// address).
async fn hub_stack(hub: LeafHub) -> Stack {
    let LeafHub { server, .. } = hub;
    Stack::builder()
        .nats(server)
        .bus(|bus| bus.presence.max_age = PRESENCE_MAX_AGE)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_site_is_named_until_it_has_flushed_or_caught_up_and_the_other_site_keeps_its_200s() {
    let hub = LeafHub::start(HUB_DOMAIN).await;
    let site_a = LeafSite::start("site-a", &hub.address, WAN).await;
    let site_b = LeafSite::start("site-b", &hub.address, WAN).await;
    let stack = hub_stack(hub).await;

    let bus_a = site_bus(&stack, &site_a, "site-a");
    let bus_b = site_bus(&stack, &site_b, "site-b");
    let a_memory = MemoryCache::new();
    let _a_memory_agent = site_agent(&stack, &bus_a, "dev", "a-memory", a_memory.clone()).await;
    let redis = cachecast_testkit::redis().await;
    let mut a_redis = RedisCache::open(&redis.url()).await;
    let backend = RedisBackend::new(&RedisConfig {
        url: redis.url(),
        ..RedisConfig::default()
    })
    .expect("redis backend");
    let a_redis_agent = site_agent(&stack, &bus_a, "dev", "a-redis", backend).await;
    let b_memory = MemoryCache::new();
    let _b_memory_agent = site_agent(&stack, &bus_b, "dev", "b-memory", b_memory.clone()).await;
    // An environment whose caches are all at site B.
    let b_shop = MemoryCache::new();
    let _b_shop_agent = site_agent(&stack, &bus_b, "shop", "b-shop", b_shop.clone()).await;
    stack.wait_for_agents("dev", 3).await;
    stack.wait_for_agents("shop", 1).await;

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

    // Site A's link is cut. Its clients stay connected to their own server: they see no
    // disconnect, only JetStream requests that nothing answers.
    let site_a_client = async_nats::connect(site_a.server.url())
        .await
        .expect("a client of site A");
    site_a.cut_link();
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
    assert_eq!(
        site_a_client.connection_state(),
        async_nats::connection::State::Connected
    );
    let unanswered = site_a_client
        .request(format!("$JS.{HUB_DOMAIN}.API.INFO"), "".into())
        .await
        .map(|message| message.payload);
    assert!(
        matches!(&unanswered, Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders),
        "a request to the hub's JetStream from the cut site: {unanswered:?}"
    );
    // Site B's own environment does not notice.
    b_shop.insert("k", "s1", "u1", bytes::Bytes::from_static(b"permit"));
    let answer = stack.invalidate("shop", "{}", "?timeout=2s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(!b_shop.contains("k"));

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
    let answer = stack.invalidate("shop", "{}", "?timeout=2s").await;
    assert_eq!(
        answer.status, 200,
        "site B's own environment: {}",
        answer.body
    );

    // The hub deletes the cut agents' event consumers once nothing pulls from them (their
    // inactive threshold, 30 s): when the link returns, the agents must make new ones.
    let observer = cachecast_bus::jetstream(
        cachecast_bus::connect(&stack.bus.nats, "observer")
            .await
            .expect("observer"),
        &stack.bus.nats,
    );
    eventually(
        "the hub deletes site A's event consumers",
        Duration::from_secs(60),
        || {
            let observer = observer.clone();
            async move {
                let Ok(stream) = observer.get_stream("CACHECAST").await else {
                    return false;
                };
                let names: Vec<String> = stream
                    .consumer_names()
                    .filter_map(|name| async move { name.ok() })
                    .collect()
                    .await;
                !names.iter().any(|name| name.starts_with("a-"))
            }
        },
    )
    .await;

    // The link returns: site A attends its caches again, and its first 200 vouches for a
    // Redis that holds nothing invalidated while it was cut off.
    site_a.restore_link();
    site_a.wait_linked().await;
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
        .filter(|key| ["s2", "s4"].iter().any(|s| key.contains(&format!(":{s}:"))))
        .collect();
    assert!(stale.is_empty(), "stale after the 200: {stale:?}");
    a_redis_agent.stop().await;
}

const SITE_A_LEAF_PASSWORD: &str = "site-a-pw-for-tests";
const SITE_A_AGENT_PASSWORD: &str = "site-a-agent-1-pw-for-tests";
const API_PASSWORD: &str = "api-pw-for-tests";

/// A committed file of deploy/nats/ copied (with accounts.conf, which it may include) into a
/// temporary directory, with `replacements` made: the addresses a test must move to free ports.
fn committed(name: &str, replacements: &[(&str, String)]) -> (tempfile::TempDir, String) {
    let deploy = cachecast_testkit::workspace_root().join("deploy/nats");
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut text = std::fs::read_to_string(deploy.join(name)).expect("committed configuration");
    for (from, to) in replacements {
        assert!(text.contains(from), "{name} no longer has {from:?}");
        text = text.replace(from, to);
    }
    std::fs::write(dir.path().join(name), text).expect("write the configuration");
    std::fs::copy(
        deploy.join("accounts.conf"),
        dir.path().join("accounts.conf"),
    )
    .expect("copy accounts.conf");
    let path = dir.path().join(name).display().to_string();
    (dir, path)
}

/// The committed hub (deploy/nats/hub.conf with accounts.conf) and site A
/// (deploy/nats/site-a.conf), linked through a proxy: the API and a site agent work end to end
/// with their least-privilege users, and the link carries site A's environment only, even for a
/// site user allowed everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_hub_and_site_configurations_carry_only_the_sites_environment() {
    cachecast_e2e::init_logs();
    let binary = cachecast_testkit::nats_binary();
    let free = cachecast_testkit::free_port;
    let leaf_port = free();
    let (_hub_dir, hub_conf) = committed(
        "hub.conf",
        &[
            ("0.0.0.0:7422", format!("127.0.0.1:{leaf_port}")),
            // The test server's own store (-sd).
            ("  store_dir: /data/jetstream\n", String::new()),
            ("0.0.0.0:8222", format!("127.0.0.1:{}", free())),
        ],
    );
    let mut hub_server = cachecast_testkit::NatsServer::builder(&binary).args(["-c", &hub_conf]);
    for (name, password) in [
        ("NATS_SYS_PASSWORD", "sys-pw-for-tests"),
        ("NATS_CACHECAST_API_PASSWORD", API_PASSWORD),
        ("NATS_CACHECAST_AGENT_DEV_1_PASSWORD", "unused-1"),
        ("NATS_CACHECAST_AGENT_DEV_2_PASSWORD", "unused-2"),
        ("NATS_CACHECAST_AGENT_PROD_1_PASSWORD", "unused-3"),
        ("NATS_CACHECAST_CALLER_DEV_PASSWORD", "unused-4"),
        ("NATS_CACHECAST_SITE_A_PASSWORD", SITE_A_LEAF_PASSWORD),
    ] {
        hub_server = hub_server.env(name, password);
    }
    let hub_server = hub_server
        .start()
        .await
        .unwrap_or_else(|e| panic!("the hub did not start with deploy/nats/hub.conf: {e}"));
    let link = cachecast_testkit::TcpProxy::with_latency(leaf_port, WAN).await;
    // A site user allowed everything at the site: what the link carries must not depend on it.
    let (_site_dir, site_conf) = committed(
        "site-a.conf",
        &[
            ("0.0.0.0:8222", format!("127.0.0.1:{}", free())),
            ("  store_dir: /data/jetstream\n", String::new()),
            (
                "    users = [\n",
                "    users = [\n      { user: site-a-anything, password: anything }\n".into(),
            ),
        ],
    );
    let site = cachecast_testkit::NatsServer::builder(&binary)
        .args(["-c", &site_conf])
        .env(
            "CACHECAST_HUB_LEAF_URL",
            format!(
                "nats-leaf://cachecast-site-a:{SITE_A_LEAF_PASSWORD}@127.0.0.1:{}",
                link.port()
            ),
        )
        .env("NATS_SITE_A_AGENT_1_PASSWORD", SITE_A_AGENT_PASSWORD)
        .start()
        .await
        .unwrap_or_else(|e| panic!("site A did not start with deploy/nats/site-a.conf: {e}"));

    let stack = Stack::builder()
        .nats(hub_server)
        .bus(|bus| {
            bus.nats.user = Some("cachecast-api".into());
            bus.nats.password = Some(cachecast_bus::Secret::new(API_PASSWORD));
            bus.nats.inbox_prefix = "_INBOX.api".into();
        })
        .start()
        .await;
    let mut agent_bus = stack.bus.clone();
    agent_bus.nats.url = site.url();
    agent_bus.nats.user = Some("site-a-dev-agent-1".into());
    agent_bus.nats.password = Some(cachecast_bus::Secret::new(SITE_A_AGENT_PASSWORD));
    agent_bus.nats.inbox_prefix = "_INBOX.site-a.dev-agent-1".into();
    agent_bus.nats.jetstream_domain = Some(HUB_DOMAIN.into());
    let cache = MemoryCache::new();
    let agent = stack
        .agent_builder("dev", "dev-agent-1")
        .bus(&agent_bus)
        .start(cache.clone())
        .await;
    stack.wait_for_agents("dev", 1).await;
    cache.insert("k", "s1", "u1", bytes::Bytes::from_static(b"permit"));
    let answer = stack.invalidate("dev", "{}", "?timeout=5s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(applied(&answer, "dev-agent-1"), "{}", answer.body);
    assert!(!cache.contains("k"));

    // The site user allowed everything at the site: prod's JetStream requests go nowhere,
    // dev's are answered; events and the API's replies never reach the site.
    let anything = async_nats::ConnectOptions::with_user_and_password(
        "site-a-anything".into(),
        "anything".into(),
    )
    .custom_inbox_prefix("_INBOX.site-a.anything")
    .request_timeout(Some(Duration::from_secs(2)))
    .connect(site.url())
    .await
    .expect("the site's wide user connects");
    let mut events = anything
        .subscribe("cachecast.v1.*.inval")
        .await
        .expect("sub");
    let mut api_replies = anything.subscribe("_INBOX.api.>").await.expect("sub");
    let create = |env: &str| {
        let subject =
            format!("$JS.hub.API.CONSUMER.CREATE.CACHECAST.probe_{env}.cachecast.v1.{env}.inval");
        let body = serde_json::json!({
            "stream_name": "CACHECAST",
            "config": { "name": format!("probe_{env}"), "filter_subject": format!("cachecast.v1.{env}.inval") }
        });
        anything.request(subject, body.to_string().into())
    };
    let dev = create("dev")
        .await
        .expect("dev's consumer create is carried and answered");
    assert!(
        String::from_utf8_lossy(&dev.payload).contains("\"created\""),
        "{:?}",
        dev.payload
    );
    let prod = create("prod").await;
    assert!(
        prod.is_err(),
        "prod's consumer create crossed the link: {prod:?}"
    );
    // Nor does prod's presence, its last event, or an ack as a prod agent.
    let presence = |env: &str| {
        anything.request(
            format!("$JS.hub.API.$KV.cachecast-agents.{env}.intruder"),
            "x".into(),
        )
    };
    let dev_presence = presence("dev").await;
    assert!(
        dev_presence.is_ok(),
        "dev's presence write is carried: {dev_presence:?}"
    );
    assert!(
        presence("prod").await.is_err(),
        "prod's presence write crossed the link"
    );
    let prod_last = anything
        .request(
            "$JS.hub.API.DIRECT.GET.CACHECAST.cachecast.v1.prod.inval",
            "".into(),
        )
        .await;
    assert!(prod_last.is_err(), "prod's last event crossed the link");
    let hub_api = async_nats::ConnectOptions::with_user_and_password(
        "cachecast-api".into(),
        API_PASSWORD.into(),
    )
    .custom_inbox_prefix("_INBOX.api")
    .connect(stack.nats.url())
    .await
    .expect("the API user connects to the hub");
    let mut prod_acks = hub_api
        .subscribe("cachecast.v1.prod.ack.>")
        .await
        .expect("sub");
    hub_api.flush().await.expect("flush");
    anything
        .publish("cachecast.v1.prod.ack.e.1.prod-agent-1", "forged".into())
        .await
        .expect("publish");
    let answer = stack.invalidate("prod", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let answer = stack.invalidate("dev", "{}", "?timeout=5s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    // A round trip through the link after those: anything bound for the site has arrived.
    create("dev")
        .await
        .expect("dev's consumer create is answered");
    hub_api.flush().await.expect("flush");
    use futures::FutureExt as _;
    assert!(
        prod_acks.next().now_or_never().is_none(),
        "a prod ack crossed the link"
    );
    assert!(
        events.next().now_or_never().is_none(),
        "an event reached the site"
    );
    assert!(
        api_replies.next().now_or_never().is_none(),
        "an API reply reached the site"
    );
    agent.stop().await;
}

/// A site's link dies half-open: nothing is closed, bytes stop. Only pings tell the servers
/// (the testkit's 2 s, two unanswered), after which the site's clients get no responders, as
/// for a cut. Meanwhile, and after, the promise holds: the site's cache is named while its
/// presence lives, and has flushed by the time publishers stop expecting it; when the link
/// comes back it confirms again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_site_link_is_noticed_by_pings_and_the_sites_cache_flushes_in_time() {
    let hub = LeafHub::start(HUB_DOMAIN).await;
    let site = LeafSite::start("site-a", &hub.address, WAN).await;
    let stack = hub_stack(hub).await;
    let cache = MemoryCache::new();
    let _agent = site_agent(
        &stack,
        &site_bus(&stack, &site, "site-a"),
        "dev",
        "a-memory",
        cache.clone(),
    )
    .await;
    stack.wait_for_agents("dev", 1).await;
    let answer = stack.invalidate("dev", "{}", "?timeout=5s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    let site_client = async_nats::connect(site.server.url())
        .await
        .expect("a client of the site");
    cache.insert("k", "s1", "u1", bytes::Bytes::from_static(b"permit"));
    site.black_hole_link();
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "?timeout=2s")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    assert_eq!(answer.failed_agents(), ["a-memory"], "{}", answer.body);
    // The site's server notices by pings and drops the link: requests fail fast again, with no
    // responders, instead of waiting out their timeout.
    eventually(
        "the site's server drops the half-open link",
        Duration::from_secs(30),
        || {
            let site_client = site_client.clone();
            async move {
                let answer = site_client
                    .request(format!("$JS.{HUB_DOMAIN}.API.INFO"), "".into())
                    .await;
                matches!(answer, Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders)
            }
        },
    )
    .await;
    stack.wait_for_agents("dev", 0).await;
    assert!(
        !cache.contains("k"),
        "the half-open site's cache still held an invalidated entry when publishers stopped expecting it"
    );

    site.restore_link();
    site.wait_linked().await;
    eventually(
        "the site's agent vouches for its cache again",
        Duration::from_secs(30),
        || {
            let live = stack.publisher.live_agents(&env_id("dev"));
            std::future::ready(live.len() == 1 && live[0].lagging.is_none())
        },
    )
    .await;
    cache.insert("k", "s1", "u1", bytes::Bytes::from_static(b"permit"));
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "?timeout=5s")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(applied(&answer, "a-memory"), "{}", answer.body);
    assert!(!cache.contains("k"));
}

/// A hub node lost while a site is linked. The site's agent stays connected to its own server
/// and sees no disconnect; its event consumer (R1) lived on the lost node and is gone with it.
/// (An agent taking live copies keeps no consumer once caught up: this one takes every event
/// from its consumer, `agent.live_events = false`.)
/// The agent must notice by itself (the consumer's idle heartbeats stop) and replace it: the
/// next requests name it until then, and the first `200` that counts it finds its cache applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_agent_replaces_the_consumer_it_lost_with_a_hub_node() {
    cachecast_e2e::init_logs();
    let mut hub = NatsCluster::start_hub(3, HUB_DOMAIN).await;
    let address = hub.hub_address().expect("a hub").clone();
    let mut bus = BusConfig::default();
    bus.nats.url = hub.urls();
    bus.stream.replicas = 3;
    bus.presence.replicas = 3;
    bus.caches.replicas = 3;
    bus.audit.replicas = 3;
    let publisher = start_publisher(&bus, "hub-publisher").await;
    let site = LeafSite::start("site-a", &address, WAN).await;
    let mut site_bus = bus.clone();
    site_bus.nats.url = site.server.url();
    site_bus.nats.jetstream_domain = Some(HUB_DOMAIN.into());
    site_bus.nats.inbox_prefix = "_INBOX.site-a".into();
    let cache = MemoryCache::new();
    let agent = start_agent(
        &site_bus,
        "dev",
        "a-memory",
        AgentConfig {
            live_events: false,
            ..heartbeat_every_second()
        },
        cache.clone(),
    )
    .await;
    assert!(
        publisher
            .wait_for_live_agents(&env_id("dev"), 1, Duration::from_secs(30))
            .await
    );
    let invalidate = |scope: String| {
        let publisher = publisher.clone();
        async move {
            publisher
                .invalidate(InvalidationRequest {
                    env: env_id("dev"),
                    target: Target::Response(ResponseSelector {
                        scope_client_ids: vec![scope.clone()],
                        identity_id: None,
                    }),
                    request_id: scope,
                    timeout: Duration::from_secs(2),
                    caller: None,
                })
                .await
        }
    };
    let outcome = invalidate("before".into()).await.expect("published");
    assert!(outcome.confirmed(), "{outcome:?}");

    // The node that holds the agent's consumer.
    let observer = cachecast_bus::connect(&bus.nats, "observer")
        .await
        .expect("observer");
    let stream = cachecast_bus::jetstream(observer, &bus.nats)
        .get_stream("CACHECAST")
        .await
        .expect("the stream");
    let mut consumers = stream.consumers();
    let mut holder = None;
    while let Some(info) = consumers.next().await {
        let info = info.expect("consumer info");
        if info.name.starts_with("a-memory_") {
            holder = info.cluster.and_then(|cluster| cluster.leader);
        }
    }
    let holder = holder.expect("the agent's consumer and its server");
    let lost: usize = holder
        .trim_start_matches('n')
        .parse()
        .expect("a node named n<N>");
    hub.nodes[lost].kill().await;
    let killed = Instant::now();

    // Until the agent has replaced its consumer, requests name it (or cannot be published
    // while the stream elects a leader); then a 200 counts it, and its cache applied it. Every
    // 200 on the way finds the entry gone.
    let mut n = 0;
    let recovered = loop {
        n += 1;
        let scope = format!("after-{n}");
        cache.insert(&scope, &scope, "u1", bytes::Bytes::from_static(b"permit"));
        match invalidate(scope.clone()).await {
            Ok(outcome) if outcome.confirmed() => {
                // A 200 without the agent (its presence lapsed while the bucket moved) is
                // right only because its cache flushed and caches nothing meanwhile.
                assert!(
                    !cache.contains(&scope),
                    "a 200 while the cache held {scope}"
                );
                if outcome.agents.contains_key(&agent_id("a-memory")) {
                    break killed.elapsed();
                }
            }
            // A 424 names the agent, whose event consumer is gone.
            Ok(outcome) => assert!(
                outcome
                    .agents
                    .get(&agent_id("a-memory"))
                    .is_some_and(|agent| !agent.is_applied()),
                "a 424 that does not name the agent: {outcome:?}"
            ),
            // Not published (a 503): the stream is electing a leader. Asked again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the site's agent did not recover from losing its consumer's node within 60 s"
        );
    };
    eprintln!("the site's agent confirmed again {recovered:?} after its consumer's node was lost");
    agent.stop().await;
}
