//! The identity cache and keyed caches, end to end: each request form evicts exactly what it
//! names and nothing else, with the memory and the Redis backends; keyed caches answer with
//! Elasticsearch's `_nodes`, `cluster_name` and `nodes`, expect only the agents serving the
//! cache, and a partial failure is a `424`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use cachecast_agent::{MemoryCache, RedisBackend, RedisConfig};
use cachecast_e2e::{Answer, RedisCache, Stack};
use cachecast_proto::CacheName;

const TEMPLATES: [&str; 2] = ["User", "Device"];
const IDENTITIES: [&str; 3] = ["alice", "bob", "carol"];

fn identity_path(env: &str) -> String {
    format!("/api/1.0/runtime/caches/identity/{env}/invalidate")
}

fn keyed_path(env: &str, cache: &str, ids: &str) -> String {
    format!("/api/1.0/runtime/caches/keyed/{env}/{cache}/{ids}/_clear_cache")
}

/// An identity request body and the (template, id) pairs it matches.
const IDENTITY_CASES: &[(&str, Option<&str>, Option<&str>)] = &[
    (r#"{"identityTemplate":"User"}"#, Some("User"), None),
    (r#"{"identityId":"bob"}"#, None, Some("bob")),
    (
        r#"{"identityTemplate":"Device","identityId":"carol"}"#,
        Some("Device"),
        Some("carol"),
    ),
    (
        r#"{"identityTemplate":"Nobody","identityId":null}"#,
        Some("Nobody"),
        None,
    ),
];

fn identity_matches(case: (Option<&str>, Option<&str>), template: &str, id: &str) -> bool {
    case.0.is_none_or(|t| t == template) && case.1.is_none_or(|i| i == id)
}

fn assert_confirmed(answer: &Answer, what: &str, agents: u64, evicted_each: u64) {
    assert_eq!(answer.status, 200, "{what}: {}", answer.body);
    assert_eq!(
        answer.body["_nodes"]["total"], agents,
        "{what}: {}",
        answer.body
    );
    assert_eq!(answer.body["_nodes"]["successful"], agents, "{what}");
    for (id, agent) in answer.body["agents"].as_object().expect("agents") {
        assert_eq!(agent["status"], "applied", "{what}: {id}");
        assert_eq!(agent["evicted"], evicted_each, "{what}: {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_requests_evict_exactly_their_identities_in_memory() {
    let stack = Stack::start().await;
    let mut agents = Vec::new();
    for n in 1..=2 {
        agents.push(stack.memory_agent("dev", &format!("mem-{n}")).await);
    }
    stack.wait_for_agents("dev", 2).await;
    for (body, template, id) in IDENTITY_CASES {
        for (cache, _) in &agents {
            // The response cache holds the same identities: an identity request leaves it be.
            cache.insert("decision", "s1", "bob", Bytes::from_static(b"permit"));
            for t in TEMPLATES {
                for i in IDENTITIES {
                    cache.insert_identity(t, i, Bytes::from_static(b"attributes"));
                }
            }
        }
        let matched = TEMPLATES
            .iter()
            .flat_map(|t| IDENTITIES.iter().map(move |i| (*t, *i)))
            .filter(|(t, i)| identity_matches((*template, *id), t, i))
            .count();
        let answer = stack.post_as("dev", &identity_path("dev"), body).await;
        assert_confirmed(&answer, body, 2, matched as u64);
        for (cache, _) in &agents {
            for t in TEMPLATES {
                for i in IDENTITIES {
                    let gone = identity_matches((*template, *id), t, i);
                    assert_eq!(cache.get_identity(t, i).is_none(), gone, "{body}: {t}/{i}");
                }
            }
            assert!(
                cache.contains("decision"),
                "{body} touched the response cache"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_keyed_requests_evict_exactly_their_keys_in_redis() {
    let stack = Stack::start().await;
    let redis = cachecast_testkit::redis().await;
    let config = RedisConfig {
        url: redis.url(),
        keyed_caches: BTreeMap::from([(
            CacheName::new("apikeys").expect("valid"),
            "apikey:{env}:{id}".to_owned(),
        )]),
        ..RedisConfig::default()
    };
    let backend = RedisBackend::new(&config).expect("redis backend");
    let _agent = stack.agent("dev", "redis-1", backend).await;
    stack.wait_for_agents("dev", 1).await;
    let mut cache = RedisCache::open(&redis.url()).await;

    let mut identity_keys = Vec::new();
    for t in TEMPLATES {
        for i in IDENTITIES {
            identity_keys.push((format!("pdp-identity:dev:{t}:{i}"), t, i));
        }
    }
    // Keys no request of `dev` may touch.
    let bystanders = [
        "pdp-identity:qa:User:alice",
        "pdp:dev:s1:alice:0",
        "apikey:qa:k1",
        "apikey:dev:k1:extra",
    ];
    for (body, template, id) in IDENTITY_CASES {
        let keys: Vec<&str> = identity_keys
            .iter()
            .map(|(k, _, _)| k.as_str())
            .chain(bystanders)
            .collect();
        cache.set(&keys).await;
        let answer = stack.post_as("dev", &identity_path("dev"), body).await;
        let expected: BTreeSet<String> = identity_keys
            .iter()
            .filter(|(_, t, i)| !identity_matches((*template, *id), t, i))
            .map(|(k, _, _)| k.clone())
            .chain(bystanders.iter().map(|k| k.to_string()))
            .collect();
        let evicted = identity_keys.len() + bystanders.len() - expected.len();
        assert_confirmed(&answer, body, 1, evicted as u64);
        let left: BTreeSet<String> = cache.all_keys().await.into_iter().collect();
        assert_eq!(left, expected, "{body}");
    }

    // Keyed: ids (a glob character in an id is only itself), then `*`.
    let apikeys = [
        "apikey:dev:k1",
        "apikey:dev:k2",
        "apikey:dev:k3",
        "apikey:dev:k?",
    ];
    cache.set(&apikeys).await;
    let answer = stack
        .post_as("dev", &keyed_path("dev", "apikeys", "k1,k%3F,missing"), "")
        .await;
    assert_confirmed(&answer, "k1,k?,missing", 1, 2);
    let left: BTreeSet<String> = cache.all_keys().await.into_iter().collect();
    assert!(
        left.contains("apikey:dev:k2") && left.contains("apikey:dev:k3"),
        "{left:?}"
    );
    assert!(
        !left.contains("apikey:dev:k1") && !left.contains("apikey:dev:k?"),
        "{left:?}"
    );
    // An exact key is removed alone: a longer key that starts like it stays.
    assert!(left.contains("apikey:dev:k1:extra"), "{left:?}");
    let answer = stack
        .post_as("dev", &keyed_path("dev", "apikeys", "*"), "")
        .await;
    assert_confirmed(&answer, "*", 1, 3);
    let left: BTreeSet<String> = cache.all_keys().await.into_iter().collect();
    // `*` is every key the template makes for dev (so `{id}` spans `k1:extra` too: evicting
    // more than asked only costs a miss); other environments' keys stay.
    assert!(
        !left.iter().any(|k| k.starts_with("apikey:dev:")),
        "{left:?}"
    );
    assert!(left.contains("apikey:qa:k1"), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_caches_answer_like_elasticsearch_and_expect_only_agents_serving_them() {
    let stack = Stack::start().await;
    let apikeys = CacheName::new("apikeys").expect("valid");
    let serving_a = MemoryCache::with_keyed_caches([apikeys.clone()]);
    let serving_b = MemoryCache::with_keyed_caches([apikeys.clone()]);
    let _a = stack.agent("dev", "serves-a", serving_a.clone()).await;
    let _b = stack.agent("dev", "serves-b", serving_b.clone()).await;
    // An agent without that cache is live in the environment but not expected.
    let (plain, _c) = stack.memory_agent("dev", "plain").await;
    stack.wait_for_agents("dev", 3).await;
    for cache in [&serving_a, &serving_b] {
        for id in ["k1", "k2", "k3"] {
            assert!(cache.insert_keyed("apikeys", id, Bytes::from_static(b"key")));
        }
    }

    plain.insert("decision", "s1", "alice", Bytes::from_static(b"permit"));
    let answer = stack
        .post_as("dev", &keyed_path("dev", "apikeys", "k1,k2"), "")
        .await;
    assert_confirmed(&answer, "k1,k2", 2, 2);
    // The agent without that cache received the event too, and left its caches alone.
    assert!(
        plain.contains("decision"),
        "a keyed clear flushed an agent that does not serve it"
    );
    assert_eq!(answer.body["cluster_name"], "cachecast", "{}", answer.body);
    let nodes: BTreeSet<&str> = answer.body["nodes"]
        .as_object()
        .expect("nodes map")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(nodes, BTreeSet::from(["serves-a", "serves-b"]));
    assert_eq!(answer.body["nodes"]["serves-a"]["name"], "serves-a");
    for cache in [&serving_a, &serving_b] {
        assert!(cache.get_keyed("apikeys", "k1").is_none());
        assert!(cache.get_keyed("apikeys", "k2").is_none());
        assert!(cache.get_keyed("apikeys", "k3").is_some());
    }

    let answer = stack
        .post_as("dev", &keyed_path("dev", "apikeys", "*"), "{}")
        .await;
    assert_confirmed(&answer, "*", 2, 1);
    assert_eq!(serving_a.keyed_len("apikeys"), 0);

    // A cache nobody serves: nothing is expected (as an environment without agents).
    let answer = stack
        .post_as("dev", &keyed_path("dev", "sessions", "*"), "")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["total"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_clear_that_fails_on_one_agent_is_a_424_naming_it() {
    let stack = Stack::start().await;
    let redis = cachecast_testkit::redis().await;
    let config = RedisConfig {
        url: redis.url(),
        keyed_caches: BTreeMap::from([(
            CacheName::new("apikeys").expect("valid"),
            "apikey:{env}:{id}".to_owned(),
        )]),
        command_timeout: std::time::Duration::from_millis(300),
        ..RedisConfig::default()
    };
    let _healthy = stack
        .agent(
            "dev",
            "healthy",
            MemoryCache::with_keyed_caches([CacheName::new("apikeys").expect("valid")]),
        )
        .await;
    // A persistent cache is reported under its cache id.
    let _redis_agent = stack
        .agent_builder("dev", "redis-agent")
        .config(cachecast_agent::AgentConfig {
            cache_id: Some(cachecast_proto::CacheId::new("redis-down").expect("valid")),
            ..cachecast_agent::AgentConfig::default()
        })
        .start(RedisBackend::new(&config).expect("backend"))
        .await;
    stack.wait_for_agents("dev", 2).await;
    drop(redis); // The Redis behind one agent goes away.

    let answer = stack
        .post_as("dev", &keyed_path("dev", "apikeys", "k1"), "")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    assert_eq!(answer.failed_agents(), ["redis-down"]);
    assert_eq!(answer.body["_nodes"]["successful"], 1);
    assert_eq!(
        answer.body["_nodes"]["failures"][0]["type"],
        "eviction_failed"
    );
    assert!(
        answer.body["nodes"]["healthy"].is_object(),
        "{}",
        answer.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_identity_and_keyed_requests_get_their_codes() {
    let stack = Stack::start().await;
    let cases: &[(&str, &str, u16, &str)] = &[
        (&identity_path("dev"), "{}", 400, "missing_field"),
        (
            &identity_path("dev"),
            r#"{"identityId":null}"#,
            400,
            "missing_field",
        ),
        (
            &identity_path("dev"),
            r#"{"identityTemplate":""}"#,
            400,
            "invalid_value",
        ),
        (
            &identity_path("dev"),
            r#"{"identityTemplate":7}"#,
            400,
            "invalid_field_type",
        ),
        (
            &identity_path("dev"),
            r#"{"scopeClientId":"s"}"#,
            400,
            "unknown_field",
        ),
        (&identity_path("dev"), "", 400, "missing_body"),
        (
            &keyed_path("dev", "apikeys", "k*"),
            "",
            400,
            "unsupported_wildcard",
        ),
        (
            &keyed_path("dev", "apikeys", "*,k1"),
            "",
            400,
            "unsupported_wildcard",
        ),
        (
            &keyed_path("dev", "apikeys", "k%2A"),
            "",
            400,
            "unsupported_wildcard",
        ),
        (
            &keyed_path("dev", "apikeys", "k1,,k2"),
            "",
            400,
            "invalid_value",
        ),
        (
            &keyed_path("dev", "api.keys", "k1"),
            "",
            400,
            "invalid_cache_name",
        ),
        (
            &keyed_path("dev", "apikeys", "k1"),
            r#"{"ids":["k1"]}"#,
            400,
            "unknown_field",
        ),
        (
            &keyed_path("dev", "apikeys", "k1"),
            "[]",
            400,
            "body_not_object",
        ),
        (
            &keyed_path("d.v", "apikeys", "k1"),
            "",
            400,
            "invalid_env_id",
        ),
    ];
    for (path, body, status, code) in cases {
        let answer = stack.post_as("dev", path, body).await;
        assert_eq!(answer.status, *status, "{path} {body}: {}", answer.body);
        assert_eq!(answer.body["code"], *code, "{path} {body}: {}", answer.body);
    }
}
