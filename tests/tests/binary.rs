//! The `cachecast` binary as users run it: `up`, `serve`, `agent`, `invalidate`, `agents`,
//! `token`, and the configuration it reads.

use std::time::Duration;

use cachecast_e2e::{ChildProcess, Signal, Stack, cachecast, cachecast_with_env, start_serve};

const STARTUP: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(15);

/// The value of `key=` in a log line, e.g. `pid=1234`.
fn log_field(output: &str, line_marker: &str, key: &str) -> Option<String> {
    let line = output.lines().find(|l| l.contains(line_marker))?;
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    Some(
        line[start..]
            .split_whitespace()
            .next()?
            .trim_matches('"')
            .to_owned(),
    )
}

/// `cachecast up` with its API on `port`, nats-server from the test kit.
fn up_on(port: u16) -> ChildProcess {
    let mut command = tokio::process::Command::new(cachecast_testkit::cachecast_bin());
    command
        .args(["up", "--listen", &format!("127.0.0.1:{port}")])
        .env("NATS_SERVER_BIN", cachecast_testkit::nats_binary())
        .env("NO_COLOR", "1")
        .env_remove("CACHECAST_CONFIG");
    ChildProcess::from_command(command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_a_stack_whose_curl_line_works_and_ctrl_c_stops_everything() {
    let port = cachecast_testkit::free_port();
    let mut up = up_on(port);
    up.wait_for_output("Press Ctrl-C to stop.", STARTUP)
        .await
        .unwrap_or_else(|e| panic!("up did not start: {e}"));
    let stdout = up.stdout();
    let curl = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("curl "))
        .unwrap_or_else(|| panic!("no curl line in {stdout}"))
        .trim()
        .to_owned();

    let out = tokio::process::Command::new("sh")
        .args(["-c", &curl])
        .output()
        .await
        .expect("curl runs (apt-get install curl)");
    assert!(
        out.status.success(),
        "{curl}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON answer");
    assert_eq!(body["_nodes"]["total"], 3, "{body}");
    assert_eq!(body["_nodes"]["successful"], 3, "{body}");

    // The admin routes, like `serve`'s.
    for (path, expected) in [
        ("/healthz", ""),
        ("/readyz", ""),
        ("/metrics", "cachecast_invalidations_total"),
    ] {
        let response = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(response.status(), 200, "{path}");
        let text = response.text().await.expect("body");
        assert!(text.contains(expected), "{path}: {text}");
    }

    let nats_pid = log_field(&up.stderr(), "nats-server started", "pid")
        .unwrap_or_else(|| panic!("no nats-server pid in {}", up.stderr()));
    assert!(std::path::Path::new(&format!("/proc/{nats_pid}")).exists());
    up.signal(Signal::SIGINT);
    let status = up.wait_exit(EXIT).await.expect("up exits on Ctrl-C");
    assert!(status.success(), "{status:?}: {}", up.output());
    // In order: its clients close before its nats-server stops.
    assert!(
        !up.output().contains("disconnected from NATS"),
        "a client outlived the nats-server: {}",
        up.output()
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{nats_pid}")).exists(),
        "nats-server {nats_pid} still runs after up exited"
    );
}

/// A stack that cannot finish starting (its API port is taken, found after the agents are up)
/// stops what it started as Ctrl-C would: the agents leave, every client closes before the
/// nats-server child stops, and the error says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_that_cannot_listen_stops_its_agents_and_clients_before_nats() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let port = taken.local_addr().expect("address").port();
    let up = refused_naming(up_on(port), "pass --listen").await;
    let output = up.output();
    assert_eq!(output.matches("agent stopped").count(), 3, "{output}");
    assert!(
        !output.contains("disconnected from NATS"),
        "a client outlived the nats-server: {output}"
    );
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reads_its_secret_from_the_environment_and_answers() {
    let nats = cachecast_testkit::nats().await;
    let (mut serve, api) = start_serve(
        &nats.url(),
        &[("CACHECAST_AUTH__HS256_SECRET", "serve-secret")],
    )
    .await;
    let output = serve.output();
    assert!(
        !output.contains("serve-secret"),
        "the secret is never logged"
    );

    let token = cachecast(&nats.url(), &["token", "--env", "dev"]);
    let mut token = token;
    token.wait_exit(EXIT).await.expect("token exits");
    // Signed with the dev secret, not serve's: refused.
    let dev_token = token.stdout().trim().to_owned();
    let mut signer = cachecast_with_env(
        &nats.url(),
        &["token", "--env", "dev"],
        &[("CACHECAST_AUTH__HS256_SECRET", "serve-secret")],
    );
    signer.wait_exit(EXIT).await.expect("token exits");
    let good_token = signer.stdout().trim().to_owned();

    let http = reqwest::Client::new();
    let url = format!("{api}/api/1.0/runtime/caches/response/dev/invalidate");
    for (token, status) in [(&dev_token, 401), (&good_token, 200)] {
        let response = http
            .post(&url)
            .bearer_auth(token)
            .body("{}")
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status().as_u16(), status);
    }
    serve.signal(Signal::SIGTERM);
    let status = serve.wait_exit(EXIT).await.expect("serve exits on SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_invalidates_lists_agents_and_reports_failures_by_exit_code() {
    let stack = Stack::start().await;
    let url = stack.nats.url();
    let mut agents = Vec::new();
    for id in ["cli-a", "cli-b"] {
        let agent = cachecast(&url, &["agent", "--env", "dev", "--id", id]);
        agent
            .wait_for_output("agent is live", STARTUP)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        agents.push(agent);
    }
    stack.wait_for_agents("dev", 2).await;

    let list = exits(cachecast(&url, &["agents", "--env", "dev", "--json"]), 0).await;
    let listed: serde_json::Value = serde_json::from_str(list.stdout().trim()).expect("JSON");
    let ids: Vec<&str> = listed["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert_eq!(ids, ["cli-a", "cli-b"]);

    // Client commands are quiet by default: no line per agent seen joining, no connection
    // lines; `-v` brings the informational lines back.
    let quiet = exits(
        cachecast_with_env(&url, &["agents", "--env", "dev"], &[("RUST_LOG", "")]),
        0,
    )
    .await;
    assert!(quiet.stdout().contains("cli-a"), "{}", quiet.output());
    assert!(
        !quiet.stderr().contains("agent joined") && !quiet.stderr().contains("connected to NATS"),
        "{}",
        quiet.stderr()
    );
    let verbose = exits(
        cachecast_with_env(&url, &["agents", "--env", "dev", "-v"], &[("RUST_LOG", "")]),
        0,
    )
    .await;
    assert!(
        verbose.stderr().contains("connected to NATS"),
        "{}",
        verbose.stderr()
    );

    let args = [
        "invalidate",
        "--env",
        "dev",
        "--scope",
        "s1",
        "--identity",
        "u1",
        "--json",
    ];
    let ok = exits(cachecast(&url, &args), 0).await;
    let outcome: serde_json::Value = serde_json::from_str(ok.stdout().trim()).expect("JSON");
    assert_eq!(outcome["_nodes"]["successful"], 2, "{outcome}");

    // The identity cache, with live progress drawn on stderr.
    let identity = exits(
        cachecast(
            &url,
            &[
                "invalidate",
                "--env",
                "dev",
                "--kind",
                "identity",
                "--identity-template",
                "User",
                "--progress",
                "always",
            ],
        ),
        0,
    )
    .await;
    assert!(
        identity.stderr().contains("2/2 agents confirmed"),
        "{}",
        identity.stderr()
    );
    assert!(identity.stdout().contains("2 of 2 agents confirmed"));

    // A keyed cache no agent serves: nothing is expected; the JSON answers Elasticsearch's way.
    let keyed = exits(
        cachecast(
            &url,
            &[
                "invalidate",
                "--env",
                "dev",
                "--kind",
                "keyed",
                "--cache",
                "apikeys",
                "--ids",
                "*",
                "--json",
            ],
        ),
        0,
    )
    .await;
    let keyed: serde_json::Value = serde_json::from_str(keyed.stdout().trim()).expect("JSON");
    assert_eq!(keyed["cluster_name"], "cachecast", "{keyed}");
    assert_eq!(keyed["_nodes"]["total"], 0, "{keyed}");

    // Arguments that do not fit the kind are refused before anything is published.
    for bad in [
        &[
            "invalidate",
            "--env",
            "dev",
            "--kind",
            "keyed",
            "--cache",
            "apikeys",
        ][..],
        &["invalidate", "--env", "dev", "--kind", "identity"][..],
        &["invalidate", "--env", "dev", "--identity-template", "User"][..],
        &[
            "invalidate",
            "--env",
            "dev",
            "--kind",
            "keyed",
            "--cache",
            "a.b",
            "--ids",
            "*",
        ][..],
    ] {
        let refused = exits(cachecast(&url, bad), 2).await;
        assert!(
            refused.stderr().contains("error:"),
            "{bad:?}: {}",
            refused.stderr()
        );
    }

    agents[1].kill().await;
    let partial = exits(
        cachecast(
            &url,
            &[
                "invalidate",
                "--env",
                "dev",
                "--timeout",
                "1s",
                "--progress",
                "always",
            ],
        ),
        3,
    )
    .await;
    let table = partial.stdout();
    assert!(
        table.contains("cli-b") && table.contains("timeout"),
        "{table}"
    );
    assert!(table.contains("1 of 2 agents confirmed"), "{table}");
    let progress = partial.stderr();
    assert!(
        progress.contains("1/2 agents confirmed, 1 did not answer in time"),
        "{progress}"
    );

    exits(
        cachecast(
            "nats://127.0.0.1:1",
            &["invalidate", "--env", "dev", "--timeout", "1s"],
        ),
        4,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_is_layered_redacted_and_checked() {
    let dir = tempfile_dir();
    let file = dir.join("cachecast.toml");
    std::fs::write(
        &file,
        "[agent]\nenv = \"from-file\"\nheartbeat = \"3s\"\n[redis]\nurl = \"redis://:file-password@127.0.0.1:6379\"\n",
    )
    .expect("write config");
    let file = file.to_string_lossy().into_owned();
    let print = exits(
        cachecast_with_env(
            "nats://127.0.0.1:4999",
            &[
                "agent",
                "--config",
                &file,
                "--env",
                "from-flag",
                "--print-config",
            ],
            &[
                ("CACHECAST_AUTH__HS256_SECRET", "env-secret"),
                ("CACHECAST_AGENT__HEARTBEAT", "4s"),
                ("CACHECAST_NATS__TOKEN", "nats-token-value"),
            ],
        ),
        0,
    )
    .await;
    let printed = print.stdout();
    assert!(
        printed.contains("env = \"from-flag\""),
        "flags win over the file: {printed}"
    );
    assert!(
        printed.contains("heartbeat = \"4s\""),
        "variables win over the file: {printed}"
    );
    assert!(
        printed.contains("url = \"nats://127.0.0.1:4999\""),
        "{printed}"
    );
    for secret in ["env-secret", "file-password", "nats-token-value"] {
        assert!(
            !print.output().contains(secret),
            "{secret} leaked: {printed}"
        );
    }

    refused_naming(
        cachecast_with_env(
            "nats://127.0.0.1:4999",
            &["agent", "--print-config"],
            &[("CACHECAST_API__MAX_TIMEOUT", "forever")],
        ),
        "max_timeout",
    )
    .await;

    refused_naming(
        cachecast(
            "nats://127.0.0.1:4999",
            &["serve", "--listen", "127.0.0.1:0"],
        ),
        "auth.hs256_secret",
    )
    .await;

    // HS256 is for development: serve refuses it unless explicitly allowed.
    let hs256_only = refused_naming(
        cachecast_with_env(
            "nats://127.0.0.1:4999",
            &["serve", "--listen", "127.0.0.1:0"],
            &[("CACHECAST_AUTH__HS256_SECRET", "dev-only-secret")],
        ),
        "auth.allow_hs256",
    )
    .await;
    assert!(!hs256_only.output().contains("dev-only-secret"));

    refused_naming(cachecast("nats://127.0.0.1:4999", &["agent"]), "agent.env").await;
    std::fs::remove_dir_all(dir).ok();
}

/// Waits for `child` to exit, asserting its exit code.
async fn exits(mut child: ChildProcess, code: i32) -> ChildProcess {
    assert_eq!(
        child.wait_exit(EXIT).await.and_then(|s| s.code()),
        Some(code),
        "{}",
        child.output()
    );
    child
}

/// Waits for `child` to exit with 1 and asserts its stderr names `needle` (the setting to fix).
async fn refused_naming(child: ChildProcess, needle: &str) -> ChildProcess {
    let child = exits(child, 1).await;
    assert!(child.stderr().contains(needle), "{}", child.stderr());
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_configuration_is_valid_and_complete() {
    let example = cachecast_testkit::workspace_root().join("deploy/cachecast.example.toml");
    let example = example.to_string_lossy().into_owned();
    let with_file = exits(
        cachecast(
            "nats://127.0.0.1:4222",
            &["agent", "--config", &example, "--print-config"],
        ),
        0,
    )
    .await;
    let defaults = exits(
        cachecast("nats://127.0.0.1:4222", &["agent", "--print-config"]),
        0,
    )
    .await;
    // The example documents the defaults: loading it changes nothing.
    assert_eq!(with_file.stdout(), defaults.stdout());
    // And it names every key there is.
    let text = std::fs::read_to_string(&example).expect("read the example");
    for line in defaults.stdout().lines() {
        if let Some((key, _)) = line.split_once(" = ") {
            assert!(
                text.contains(&format!("{key} = ")),
                "the example lacks {key}"
            );
        }
    }
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cachecast-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
