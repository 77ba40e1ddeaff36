//! Every selector form evicts exactly the matching entries and nothing else, on three agents,
//! with the in-process memory backend and with the Redis backend.

use std::collections::BTreeSet;

use bytes::Bytes;
use cachecast_agent::{RedisBackend, RedisConfig};
use cachecast_e2e::Stack;

const SCOPES: [&str; 4] = ["s1", "s2", "s3", "s4"];
const IDENTITIES: [&str; 5] = ["u1", "u2", "u3", "u4", "u5"];

/// A selector as sent over HTTP, and which (scope, identity) pairs it matches.
struct Case {
    body: &'static str,
    scopes: &'static [&'static str],
    identity: Option<&'static str>,
}

const CASES: &[Case] = &[
    Case {
        body: "{}",
        scopes: &[],
        identity: None,
    },
    Case {
        body: r#"{"scopeClientId":"s1"}"#,
        scopes: &["s1"],
        identity: None,
    },
    Case {
        body: r#"{"scopeClientIds":["s2","s3"]}"#,
        scopes: &["s2", "s3"],
        identity: None,
    },
    Case {
        body: r#"{"identityId":"u2"}"#,
        scopes: &[],
        identity: Some("u2"),
    },
    Case {
        body: r#"{"scopeClientId":"s1","identityId":"u3"}"#,
        scopes: &["s1"],
        identity: Some("u3"),
    },
    Case {
        body: r#"{"scopeClientIds":["s2","s4"],"identityId":"u5"}"#,
        scopes: &["s2", "s4"],
        identity: Some("u5"),
    },
    Case {
        body: r#"{"scopeClientId":"s1","scopeClientIds":["s4"]}"#,
        scopes: &["s1", "s4"],
        identity: None,
    },
];

impl Case {
    fn matches(&self, scope: &str, identity: &str) -> bool {
        (self.scopes.is_empty() || self.scopes.contains(&scope))
            && self.identity.is_none_or(|i| i == identity)
    }
}

/// Every (key, scope, identity) of a seeded cache, `per_pair` entries per scope and identity.
fn seed_keys(prefix: &str, per_pair: usize) -> Vec<(String, &'static str, &'static str)> {
    let mut keys = Vec::new();
    for scope in SCOPES {
        for identity in IDENTITIES {
            for n in 0..per_pair {
                keys.push((format!("{prefix}{scope}:{identity}:{n}"), scope, identity));
            }
        }
    }
    keys
}

fn assert_all_applied(answer: &cachecast_e2e::Answer, body: &str, expected_evicted: usize) {
    assert_eq!(answer.status, 200, "{body}: {}", answer.body);
    let nodes = &answer.body["_nodes"];
    assert_eq!(nodes["total"], 3, "{body}: {}", answer.body);
    assert_eq!(nodes["successful"], 3, "{body}: {}", answer.body);
    assert_eq!(nodes["failed"], 0, "{body}: {}", answer.body);
    for (id, agent) in answer.body["agents"].as_object().expect("agents map") {
        assert_eq!(agent["status"], "applied", "{body}: agent {id}");
        assert_eq!(
            agent["evicted"], expected_evicted as u64,
            "{body}: agent {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_evicts_exactly_the_selection() {
    let stack = Stack::start().await;
    let mut agents = Vec::new();
    for n in 1..=3 {
        agents.push(stack.memory_agent("dev", &format!("mem-{n}")).await);
    }
    stack.wait_for_agents("dev", 3).await;
    let seed = seed_keys("", 5);

    for case in CASES {
        for (cache, _) in &agents {
            for (key, scope, identity) in &seed {
                cache.insert(key, scope, identity, Bytes::from_static(b"permit"));
            }
        }
        let expected: BTreeSet<String> = seed
            .iter()
            .filter(|(_, s, i)| !case.matches(s, i))
            .map(|(k, _, _)| k.clone())
            .collect();
        let answer = stack.invalidate("dev", case.body, "").await;
        assert_all_applied(&answer, case.body, seed.len() - expected.len());
        for (cache, _) in &agents {
            let left: BTreeSet<String> = cache.keys().into_iter().collect();
            assert_eq!(left, expected, "{}", case.body);
        }
    }
    for (_, handle) in agents {
        handle.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_evicts_exactly_the_selection() {
    let stack = Stack::start().await;
    let redis = cachecast_testkit::redis().await;
    // Each agent has a Redis database of its own, as each PAA pod has its own cache.
    let mut connections = Vec::new();
    let mut agents = Vec::new();
    for n in 1..=3 {
        let url = format!("{}/{n}", redis.url());
        let backend = RedisBackend::new(&RedisConfig {
            url: url.clone(),
            ..RedisConfig::default()
        })
        .expect("redis backend");
        agents.push(stack.agent("dev", &format!("redis-{n}"), backend).await);
        let client = redis::Client::open(url).expect("redis url");
        connections.push(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("redis connection"),
        );
    }
    stack.wait_for_agents("dev", 3).await;

    let seed = seed_keys("pdp:dev:", 50);
    // Keys an invalidation of `dev` must never touch: another environment, other data.
    let bystanders: Vec<String> = seed_keys("pdp:qa:", 2)
        .into_iter()
        .map(|(k, _, _)| k)
        .chain([
            "session:u1".to_owned(),
            "pdp:dev".to_owned(),
            "pdpx:dev:s1:u1:0".to_owned(),
        ])
        .collect();

    for case in CASES {
        for conn in &mut connections {
            let mut pipe = redis::pipe();
            for key in seed.iter().map(|(k, _, _)| k).chain(&bystanders) {
                pipe.set(key, "permit").ignore();
            }
            let () = pipe.query_async(conn).await.expect("seed redis");
        }
        let expected: BTreeSet<String> = seed
            .iter()
            .filter(|(_, s, i)| !case.matches(s, i))
            .map(|(k, _, _)| k.clone())
            .chain(bystanders.iter().cloned())
            .collect();
        let answer = stack.invalidate("dev", case.body, "").await;
        assert_all_applied(
            &answer,
            case.body,
            seed.len() + bystanders.len() - expected.len(),
        );
        for conn in &mut connections {
            let left: Vec<String> = redis::cmd("KEYS")
                .arg("*")
                .query_async(conn)
                .await
                .expect("list keys");
            // The agent's own bookkeeping (its position, the Redis run id) is not cached data.
            let left: BTreeSet<String> = left
                .into_iter()
                .filter(|k| !k.starts_with("cachecast:"))
                .collect();
            assert_eq!(left, expected, "{}", case.body);
        }
    }
    for handle in agents {
        handle.stop().await;
    }
}
