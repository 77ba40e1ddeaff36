//! `?wait_for_completion=false`: a `202` at once with the request id and a `Location`; the
//! status resource shows each expected agent's state as its ack arrives, then the outcome.

use std::time::Duration;

use cachecast_agent::MemoryCache;
use cachecast_e2e::{GatedCache, Stack, eventually};

const SCOPED: &str = r#"{"scopeClientId":"s1"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_resource_follows_each_agent_then_shows_the_outcome() {
    let stack = Stack::start().await;
    let gate = GatedCache::default();
    let _fast = stack.agent("dev", "fast", MemoryCache::new()).await;
    let _slow = stack.agent("dev", "slow", gate.clone()).await;
    stack.wait_for_agents("dev", 2).await;

    let token = stack.token(&["dev"]);
    let response = stack
        .http
        .post(format!(
            "{}/api/1.0/runtime/caches/response/dev/invalidate?wait_for_completion=false&timeout=30s",
            stack.base_url
        ))
        .header("Authorization", format!("Bearer {token}"))
        .header("RequestID", "async-1")
        .body(SCOPED)
        .send()
        .await
        .expect("the API answers");
    assert_eq!(response.status(), 202);
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("a Location header")
        .to_owned();
    assert_eq!(location, "/api/1.0/requests/async-1");
    let accepted: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(accepted["requestId"], "async-1");
    assert_eq!(accepted["expected"], 2);
    assert_eq!(accepted["location"], location.as_str());

    // The fast agent's ack shows while the slow one is still pending.
    eventually(
        "the fast agent's ack shows",
        Duration::from_secs(10),
        || async {
            let status = stack.get_as(&["dev"], &location).await.body;
            status["agents"]["fast"]["status"] == "applied"
        },
    )
    .await;
    let running = stack.get_as(&["dev"], &location).await;
    assert_eq!(running.status, 200);
    assert_eq!(running.body["state"], "running", "{}", running.body);
    assert_eq!(running.body["agents"]["slow"]["status"], "pending");
    assert_eq!(running.body["progress"]["confirmed"], 1);
    assert_eq!(running.body["progress"]["pending"], 1);
    assert!(running.body.get("outcome").is_none(), "{}", running.body);

    // The same request id cannot start another asynchronous request while it is kept.
    let again = stack
        .post(
            "/api/1.0/runtime/caches/response/dev/invalidate?wait_for_completion=false",
            SCOPED,
            &[
                ("Authorization", format!("Bearer {token}")),
                ("RequestID", "async-1".into()),
            ],
        )
        .await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert_eq!(again.body["code"], "request_id_in_use");

    // Another environment's token does not see it; an unknown id is not found.
    let other = stack.get_as(&["qa"], &location).await;
    assert_eq!(other.status, 404, "{}", other.body);
    assert_eq!(other.body["code"], "unknown_request");
    let unknown = stack.get_as(&["dev"], "/api/1.0/requests/nope").await;
    assert_eq!(unknown.status, 404);

    gate.let_one_through();
    eventually("the request finishes", Duration::from_secs(10), || async {
        stack.get_as(&["dev"], &location).await.body["state"] == "done"
    })
    .await;
    let done = stack.get_as(&["dev"], &location).await.body;
    assert_eq!(done["progress"]["confirmed"], 2, "{done}");
    assert_eq!(done["outcome"]["status"], 200, "{done}");
    assert_eq!(done["outcome"]["_nodes"]["successful"], 2, "{done}");
    assert_eq!(done["agents"]["slow"]["status"], "applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_answers_for_the_status_of_a_request_another_replica_took() {
    let stack = Stack::start().await;
    let gate = GatedCache::default();
    let _slow = stack.agent("dev", "slow", gate.clone()).await;
    stack.wait_for_agents("dev", 1).await;
    let (other, _replica) = stack.another_replica().await;
    let accepted = stack
        .invalidate("dev", SCOPED, "?wait_for_completion=false&timeout=30s")
        .await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let location = accepted.body["location"]
        .as_str()
        .expect("location")
        .to_owned();
    let token = stack.token(&["dev"]);
    let via_other = |token: String| {
        let url = format!("{other}{location}");
        let http = stack.http.clone();
        async move {
            cachecast_e2e::answer(
                http.get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("the other replica answers"),
            )
            .await
        }
    };
    let running = via_other(token.clone()).await;
    assert_eq!(running.status, 200, "{}", running.body);
    assert_eq!(running.body["state"], "running");
    assert_eq!(running.body["agents"]["slow"]["status"], "pending");
    // The environment is checked by the replica that was asked.
    let other_env = via_other(stack.token(&["qa"])).await;
    assert_eq!(other_env.status, 404, "{}", other_env.body);

    gate.let_one_through();
    eventually(
        "the other replica sees it done",
        Duration::from_secs(10),
        || {
            let ask = via_other(token.clone());
            async move { ask.await.body["state"] == "done" }
        },
    )
    .await;
    let done = via_other(token).await.body;
    assert_eq!(done["outcome"]["status"], 200, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_request_that_times_out_ends_as_a_424() {
    let stack = Stack::start().await;
    let gate = GatedCache::default();
    let _stuck = stack.agent("dev", "stuck", gate.clone()).await;
    stack.wait_for_agents("dev", 1).await;
    let accepted = stack
        .invalidate("dev", SCOPED, "?wait_for_completion=false&timeout=300ms")
        .await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let location = accepted.body["location"]
        .as_str()
        .expect("location")
        .to_owned();
    eventually("the request times out", Duration::from_secs(10), || async {
        stack.get_as(&["dev"], &location).await.body["state"] == "done"
    })
    .await;
    let done = stack.get_as(&["dev"], &location).await.body;
    assert_eq!(done["outcome"]["status"], 424, "{done}");
    assert_eq!(done["outcome"]["_nodes"]["failures"][0]["node_id"], "stuck");
    assert_eq!(done["agents"]["stuck"]["status"], "timeout");
    assert_eq!(done["progress"]["failed"], 1);
    gate.let_one_through();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_with_path_characters_has_a_location_that_works() {
    let stack = Stack::start().await;
    let token = stack.token(&["dev"]);
    let accepted = stack
        .post(
            "/api/1.0/runtime/caches/response/dev/invalidate?wait_for_completion=false",
            "{}",
            &[
                ("Authorization", format!("Bearer {token}")),
                ("RequestID", "deploy/42?x#y%".into()),
            ],
        )
        .await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let location = accepted.body["location"]
        .as_str()
        .expect("location")
        .to_owned();
    assert_eq!(location, "/api/1.0/requests/deploy%2F42%3Fx%23y%25");
    let status = stack.get_as(&["dev"], &location).await;
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(status.body["requestId"], "deploy/42?x#y%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_completion_takes_only_true_or_false() {
    let stack = Stack::start().await;
    let answer = stack
        .invalidate("dev", "{}", "?wait_for_completion=maybe")
        .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["code"], "invalid_parameter");
    let answer = stack
        .invalidate("dev", "{}", "?wait_for_completion=true")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}
