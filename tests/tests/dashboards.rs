//! The Grafana dashboard and the Prometheus alerts in deploy/ watch what cachecast exports:
//! `promtool check rules` accepts the rules, and every metric a panel or a rule names is in the
//! `/metrics` of a running stack (`serve` and an agent) after the events they are about.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cachecast_e2e::{
    ChildProcess, Signal, cachecast_with_env, logged_addr, redis_agent, start_serve, token,
};
use cachecast_testkit::workspace_root;

/// Every `cachecast_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("cachecast_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The metric names a Prometheus text exposition defines.
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_alerting_rules() {
    let rules = workspace_root().join("deploy/prometheus/alerts.yaml");
    let output = tokio::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("promtool not found ({e}): apt-get install prometheus (scripts/test does this)")
        });
    assert!(
        output.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_name_is_exported() {
    let root = workspace_root();
    let dashboard =
        std::fs::read_to_string(root.join("deploy/grafana/cachecast.json")).expect("the dashboard");
    let alerts =
        std::fs::read_to_string(root.join("deploy/prometheus/alerts.yaml")).expect("the alerts");
    let doc: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let panels = doc["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "a dashboard of the fleet");
    let mut named = metric_names(&alerts);
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            named.extend(metric_names(target["expr"].as_str().expect("an expr")));
        }
    }

    // A stack that goes through what the panels and rules are about: a 200, a 424 for a cache
    // left unattended, a refused request, a flush, agents' lag, and a JWKS that cannot be read.
    let nats = cachecast_testkit::nats().await;
    let (_serve, api) = start_serve(
        &nats.url(),
        &[("CACHECAST_AUTH__JWKS_URL", "http://127.0.0.1:9/jwks.json")],
    )
    .await;
    let agent = cachecast_with_env(
        &nats.url(),
        &[
            "agent",
            "--env",
            "dev",
            "--id",
            "m1",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    agent
        .wait_for_output("agent is live", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("the agent did not start: {e}"));
    let admin = format!(
        "http://{}",
        logged_addr(&agent, "admin endpoints on http://")
    );
    let http = reqwest::Client::new();
    let invalidate = |bearer: Option<String>| {
        let mut request = http
            .post(format!(
                "{api}/api/1.0/runtime/caches/response/dev/invalidate"
            ))
            .header("Content-Type", "application/json")
            .body(r#"{"scopeClientId":"s1"}"#);
        if let Some(bearer) = bearer {
            request = request.header("Authorization", format!("Bearer {bearer}"));
        }
        async move {
            request
                .send()
                .await
                .expect("the API answers")
                .status()
                .as_u16()
        }
    };
    let dev = token(cachecast_e2e::TEST_SECRET, &["dev"]);
    assert_eq!(invalidate(Some(dev.clone())).await, 200);
    assert_eq!(invalidate(None).await, 401);
    let redis = cachecast_testkit::redis().await;
    let mut leaving: ChildProcess = redis_agent(&nats.url(), &redis.url(), "r1", &[], &[]).await;
    leaving.signal(Signal::SIGTERM);
    leaving.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(invalidate(Some(dev)).await, 424, "a cache left unattended");

    // The agent sets its lag at its first look, a heartbeat after it started.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut have = exported(&scrape(&api).await);
        have.extend(exported(&scrape(&admin).await));
        let missing: Vec<&String> = named.difference(&have).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "named by the dashboard or the alerts but not exported: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
