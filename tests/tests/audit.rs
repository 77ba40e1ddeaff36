//! The audit trail: every invalidation leaves a record (who, what, the event, the outcome with
//! each cache that did not confirm), paged newest first per environment, never holding a token.

use std::time::{Duration, Instant};

use cachecast_e2e::{Answer, Stack};
use serde_json::Value;

const RESPONSES: &str = "/api/1.0/runtime/caches/response";

async fn invalidate(stack: &Stack, env: &str, request_id: &str, body: &str) -> Answer {
    stack
        .post(
            &format!("{RESPONSES}/{env}/invalidate"),
            body,
            &[
                ("Authorization", format!("Bearer {}", stack.token(&[env]))),
                ("Content-Type", "application/json".into()),
                ("RequestID", request_id.into()),
            ],
        )
        .await
}

/// Every record of `env`, newest first, reading pages of `limit` until the last one.
async fn all_records(stack: &Stack, env: &str, limit: usize) -> Vec<Value> {
    let mut records = Vec::new();
    let mut before = String::new();
    loop {
        let page = stack
            .get_as(
                &[env],
                &format!("/api/1.0/runtime/invalidations/{env}?limit={limit}{before}"),
            )
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        let got = page.body["records"].as_array().expect("records").clone();
        assert!(got.len() <= limit, "{}", page.body);
        records.extend(got);
        match page.body["nextBefore"].as_u64() {
            Some(next) => before = format!("&before={next}"),
            None => return records,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalidation_leaves_a_record_paged_newest_first() {
    let stack = Stack::start().await;
    let _m1 = stack.memory_agent("dev", "m1").await;
    let _p1 = stack.memory_agent("prod", "p1").await;
    stack.wait_for_agents("dev", 1).await;
    stack.wait_for_agents("prod", 1).await;

    let first = invalidate(&stack, "dev", "change-1", r#"{"scopeClientId":"s1"}"#).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let other = invalidate(&stack, "prod", "prod-1", "{}").await;
    assert_eq!(other.status, 200, "{}", other.body);
    // A Redis cache registered, then left: the next request answers 424 naming it.
    let _redis = stack.left_redis_cache("dev", "left-redis").await;
    let failed = invalidate(
        &stack,
        "dev",
        "change-2",
        r#"{"scopeClientIds":["s2","s3"],"identityId":"u1"}"#,
    )
    .await;
    assert_eq!(failed.status, 424, "{}", failed.body);
    let last = invalidate(&stack, "dev", "change-3", r#"{"scopeClientId":"s4"}"#).await;
    assert_eq!(last.status, 424, "{}", last.body);

    // Records are written right after each answer: wait until the last one is there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = all_records(&stack, "dev", 2).await;
        if records.len() >= 3 || Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r["requestId"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["change-3", "change-2", "change-1"],
        "newest first, dev only"
    );
    let sequences: Vec<u64> = records
        .iter()
        .filter_map(|r| r["auditSequence"].as_u64())
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] > w[1]), "{sequences:?}");

    let confirmed = &records[2];
    assert_eq!(confirmed["outcome"], "confirmed", "{confirmed}");
    assert_eq!(confirmed["caller"], "e2e", "the token's sub: {confirmed}");
    assert_eq!(confirmed["eventId"], first.body["eventId"], "{confirmed}");
    assert_eq!(confirmed["sequence"], first.body["sequence"], "{confirmed}");
    assert_eq!(
        confirmed["target"]["response"]["scopeClientIds"],
        serde_json::json!(["s1"]),
        "{confirmed}"
    );
    assert_eq!(confirmed["expected"], 1);
    assert_eq!(confirmed["successful"], 1);

    let failed_record = &records[1];
    assert_eq!(
        failed_record["outcome"], "failed_dependency",
        "{failed_record}"
    );
    assert_eq!(
        failed_record["target"]["response"],
        serde_json::json!({"scopeClientIds": ["s2", "s3"], "identityId": "u1"}),
        "values as sent: {failed_record}"
    );
    let failures = failed_record["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1, "{failed_record}");
    assert_eq!(failures[0]["node_id"], "left-redis");
    assert_eq!(failures[0]["type"], "unattended");

    // No token anywhere in the trail.
    let token = stack.token(&["dev"]);
    let signature = token.rsplit('.').next().expect("a JWT");
    let text = serde_json::to_string(&records).expect("JSON");
    assert!(!text.contains(signature), "a token in the audit trail");
}

/// Records answered together go out in one message; each still has its own place, and pages
/// reach every one of them exactly once. The publisher that answered has them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_written_together_are_paged_one_by_one() {
    let stack = Stack::start().await;
    let _m1 = stack.memory_agent("dev", "m1").await;
    stack.wait_for_agents("dev", 1).await;

    let requests = 40;
    let ids: Vec<String> = (0..requests).map(|i| format!("together-{i}")).collect();
    let answers =
        futures::future::join_all(ids.iter().map(|id| invalidate(&stack, "dev", id, "{}"))).await;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.body);
    }

    // No waiting: the publisher that answered writes its queued records before it reads.
    let records = all_records(&stack, "dev", 3).await;
    let mut read: Vec<&str> = records
        .iter()
        .filter_map(|r| r["requestId"].as_str())
        .collect();
    read.sort_unstable();
    let mut sent: Vec<&str> = ids.iter().map(String::as_str).collect();
    sent.sort_unstable();
    assert_eq!(read, sent, "each record once");
    let places: Vec<u64> = records
        .iter()
        .filter_map(|r| r["auditSequence"].as_u64())
        .collect();
    assert!(places.windows(2).all(|w| w[0] > w[1]), "{places:?}");
    let mut messages: Vec<u64> = places.iter().map(|p| p / 1024).collect();
    messages.dedup();
    assert!(
        messages.len() < requests,
        "answered together, yet every record went out alone: {places:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_needs_the_read_right() {
    let stack = Stack::start().await;
    let no_read = cachecast_e2e::token_with_rights(
        cachecast_e2e::TEST_SECRET,
        &["dev"],
        &[cachecast_publisher::auth::Right::Scoped],
    );
    let response = reqwest::Client::new()
        .get(format!(
            "{}/api/1.0/runtime/invalidations/dev",
            stack.base_url
        ))
        .header("Authorization", format!("Bearer {no_read}"))
        .send()
        .await
        .expect("the API answers");
    let answer = cachecast_e2e::answer(response).await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.body["code"], "missing_right", "{}", answer.body);
    let bad = stack
        .get_as(&["dev"], "/api/1.0/runtime/invalidations/dev?limit=0")
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
}
