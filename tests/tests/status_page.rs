//! The status page at `/ui/`, in a real headless Chromium (Debian's `chromium`), driven by
//! tests/python/status_page.py: a person pastes a token and sees the live agents, an
//! invalidation made during the test with its outcome, and an unattended cache. A screenshot
//! lands in target/status-page.png for people to look at.

use cachecast_e2e::Stack;
use cachecast_testkit::workspace_root;

const REQUEST_ID: &str = "ui-check-1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_agents_caches_and_the_last_invalidations() {
    let chromium = cachecast_testkit::find_on_path("chromium").unwrap_or_else(|| {
        panic!("chromium not found: apt-get install chromium (scripts/test does this)")
    });
    let stack = Stack::start().await;
    let _m1 = stack.memory_agent("dev", "m1").await;
    stack.wait_for_agents("dev", 1).await;
    for _ in 0..3 {
        let confirmed = stack
            .invalidate("dev", r#"{"scopeClientId":"s0"}"#, "")
            .await;
        assert_eq!(confirmed.status, 200, "{}", confirmed.body);
    }
    let _redis = stack.left_redis_cache("dev", "left-redis").await;
    let token = stack.token(&["dev"]);
    let answer = stack
        .post(
            "/api/1.0/runtime/caches/response/dev/invalidate",
            r#"{"scopeClientId":"s1"}"#,
            &[
                ("Authorization", format!("Bearer {token}")),
                ("Content-Type", "application/json".into()),
                ("RequestID", REQUEST_ID.into()),
            ],
        )
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);

    let screenshot = workspace_root().join("target/status-page.png");
    let script = workspace_root().join("tests/python/status_page.py");
    let output = tokio::process::Command::new(cachecast_testkit::python())
        .arg(&script)
        .arg(&chromium)
        .arg(&stack.base_url)
        .arg(&token)
        .arg(&screenshot)
        .arg(REQUEST_ID)
        .output()
        .await
        .expect("run the page script");
    assert!(
        output.status.success(),
        "the status page: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        screenshot.is_file(),
        "a screenshot at {}",
        screenshot.display()
    );
}
