//! `GET /api/1.0/runtime/caches/{envId}`: an environment's persistent caches and live agents,
//! with their state. What it says agrees with what a request then answers: a cache it shows
//! unattended is the one a request names in its `424`.

use std::time::Duration;

use cachecast_agent::{RedisBackend, RedisConfig};
use cachecast_e2e::{Answer, Stack, TEST_SECRET, eventually, token_with_rights};
use cachecast_publisher::auth::Right;
use serde_json::Value;

const INVENTORY: &str = "/api/1.0/runtime/caches/dev";

fn find<'a>(list: &'a Value, id: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|item| item["id"] == id)
}

async fn get_with(stack: &Stack, token: &str) -> Answer {
    let response = reqwest::Client::new()
        .get(format!("{}{INVENTORY}", stack.base_url))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("the API answers");
    cachecast_e2e::answer(response).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_lists_caches_and_agents_and_agrees_with_the_next_request() {
    let stack = Stack::start().await;
    let redis = cachecast_testkit::redis().await;
    let (_memory, _m1) = stack.memory_agent("dev", "m1").await;
    let backend = RedisBackend::new(&RedisConfig {
        url: redis.url(),
        ..RedisConfig::default()
    })
    .expect("redis backend");
    let r1 = stack
        .agent_builder("dev", "r1")
        .config(cachecast_agent::AgentConfig {
            cache_id: Some(cachecast_proto::CacheId::new("shared-redis").expect("valid")),
            ..cachecast_agent::AgentConfig::default()
        })
        .start(backend)
        .await;
    stack.wait_for_agents("dev", 2).await;

    let answer = stack.get_as(&["dev"], INVENTORY).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = &answer.body;
    assert_eq!(body["envId"], "dev");
    let m1 = find(&body["agents"], "m1").unwrap_or_else(|| panic!("m1 listed: {body}"));
    assert_eq!(m1["backend"], "memory", "{m1}");
    assert_eq!(m1["state"], "live", "{m1}");
    assert!(m1["cacheId"].is_null(), "an in-process cache: {m1}");
    let r1_view = find(&body["agents"], "r1").unwrap_or_else(|| panic!("r1 listed: {body}"));
    assert_eq!(r1_view["cacheId"], "shared-redis", "{r1_view}");
    let cache = find(&body["caches"], "shared-redis")
        .unwrap_or_else(|| panic!("the Redis cache listed: {body}"));
    assert_eq!(cache["state"], "attended", "{cache}");
    assert_eq!(cache["attendedBy"], serde_json::json!(["r1"]), "{cache}");
    assert_eq!(cache["backend"], "redis", "{cache}");

    // Its agent stops; the cache stays, unattended, and a request names it.
    r1.stop().await;
    eventually(
        "the inventory shows the cache unattended",
        Duration::from_secs(10),
        || async {
            let answer = stack.get_as(&["dev"], INVENTORY).await;
            find(&answer.body["caches"], "shared-redis")
                .is_some_and(|c| c["state"] == "unattended" && c["unattendedForMs"].is_u64())
                && find(&answer.body["agents"], "r1").is_none()
        },
    )
    .await;
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    let failures = &answer.body["_nodes"]["failures"];
    assert!(
        failures.as_array().is_some_and(|f| f
            .iter()
            .any(|f| f["node_id"] == "shared-redis" && f["type"] == "unattended")),
        "{}",
        answer.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_needs_the_read_right_and_the_environment() {
    let stack = Stack::start().await;
    let no_read = token_with_rights(TEST_SECRET, &["dev"], &[Right::Scoped, Right::Flush]);
    let answer = get_with(&stack, &no_read).await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.body["code"], "missing_right", "{}", answer.body);
    assert!(
        answer.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("read")),
        "names the right: {}",
        answer.body
    );
    let other_env = token_with_rights(TEST_SECRET, &["prod"], &[Right::Read]);
    let answer = get_with(&stack, &other_env).await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(
        answer.body["code"], "forbidden_environment",
        "{}",
        answer.body
    );
    let answer = get_with(&stack, "not-a-token").await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    let read_only = token_with_rights(TEST_SECRET, &["dev"], &[Right::Read]);
    let answer = get_with(&stack, &read_only).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["caches"],
        serde_json::json!([]),
        "{}",
        answer.body
    );
}
