//! The OpenAPI 3.1 document at `/openapi.json` describes the API that is served: every
//! documented operation is routed, and schemathesis (from PyPI, pinned) finds no 5xx and no
//! answer that breaks the document against the live server.

use std::time::Duration;

use cachecast_agent::MemoryCache;
use cachecast_e2e::Stack;
use cachecast_proto::CacheName;
use cachecast_testkit::ChildProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served() {
    let stack = Stack::start().await;
    let doc: serde_json::Value = stack
        .http
        .get(format!("{}/openapi.json", stack.base_url))
        .send()
        .await
        .expect("the API answers")
        .json()
        .await
        .expect("JSON");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    assert_eq!(paths.len(), 8, "{:?}", paths.keys());
    for (path, operations) in paths {
        let concrete = path
            .replace("{envId}", "dev")
            .replace("{cache}", "apikeys")
            .replace("{ids}", "k1")
            .replace("{requestId}", "r1")
            .replace("{cacheId}", "redis-1");
        for method in operations.as_object().expect("operations").keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())
                .expect("an HTTP method");
            // Without a token: a routed operation answers 401, an unrouted one 404 or 405.
            let response = stack
                .http
                .request(method.clone(), format!("{}{concrete}", stack.base_url))
                .send()
                .await
                .expect("the API answers");
            assert_eq!(response.status(), 401, "{method} {concrete}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_off_the_schema() {
    let stack = Stack::start().await;
    let _agent = stack
        .agent(
            "dev",
            "schema-agent",
            MemoryCache::with_keyed_caches([CacheName::new("apikeys").expect("valid")]),
        )
        .await;
    stack.wait_for_agents("dev", 1).await;
    let token = stack.token(&["*"]);
    // schemathesis keeps a cache in its working directory: give it a scratch one.
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let mut command = tokio::process::Command::new(cachecast_testkit::python());
    command.current_dir(scratch.path()).args([
            "-m".to_owned(),
            "schemathesis.cli".to_owned(),
            "run".to_owned(),
            format!("{}/openapi.json", stack.base_url),
            "--header".to_owned(),
            format!("Authorization: Bearer {token}"),
            "--checks".to_owned(),
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,response_headers_conformance".to_owned(),
            "--max-examples".to_owned(),
            "40".to_owned(),
            // A fixed seed: CI runs the same cases every time (change it to explore).
            "--seed".to_owned(),
            "20261123".to_owned(),
            "--request-timeout".to_owned(),
            "10".to_owned(),
            // Keep nothing between runs (and write no example database into the tree).
            "--generation-database".to_owned(),
            "none".to_owned(),
        ]);
    let mut run = ChildProcess::from_command(command);
    let status = run.wait_exit(Duration::from_secs(300)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "schemathesis found problems:\n{}",
        run.output()
    );
    // The server is still healthy after the run.
    let answer = stack.invalidate("dev", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}
