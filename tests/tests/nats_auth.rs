//! Publishers and agents log in to NATS with the credentials configured (user and password,
//! token, NKey, a `.creds` file in operator mode) and over TLS (a custom CA, mutual TLS); a
//! wrong credential or an untrusted certificate is refused within bounded time.

use std::time::Duration;

use cachecast_bus::{BusConfig, Secret};
use cachecast_e2e::Stack;
use cachecast_publisher::Publisher;
use cachecast_testkit::NatsServer;
use cachecast_testkit::jwt::Operator;
use cachecast_testkit::tls::TestCa;

async fn nats_with(args: &[&str]) -> NatsServer {
    NatsServer::builder(cachecast_testkit::nats_binary())
        .args(args.iter().copied())
        .start()
        .await
        .unwrap_or_else(|e| panic!("nats-server did not start: {e}"))
}

/// A publisher with `configure`d settings must fail to start against `nats`.
async fn refused(nats: &NatsServer, configure: impl FnOnce(&mut BusConfig)) {
    let mut bus = BusConfig::default();
    bus.nats.url = nats.url();
    configure(&mut bus);
    let client = cachecast_bus::connect(&bus.nats, "intruder")
        .await
        .expect("client");
    let started =
        tokio::time::timeout(Duration::from_secs(15), Publisher::start(client, &bus)).await;
    assert!(
        matches!(started, Ok(Err(_))),
        "a publisher with wrong credentials must fail to start, in bounded time"
    );
}

/// With `configure`d credentials a publisher and an agent work end to end.
async fn works(nats: NatsServer, configure: impl FnOnce(&mut BusConfig)) {
    let stack = Stack::builder().nats(nats).bus(configure).start().await;
    let (_cache, agent) = stack.memory_agent("dev", "authed").await;
    stack.wait_for_agents("dev", 1).await;
    let answer = stack.invalidate("dev", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["successful"], 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password() {
    let nats = nats_with(&["--user", "cachecast", "--pass", "s3cret-pass"]).await;
    refused(&nats, |bus| {
        bus.nats.user = Some("cachecast".into());
        bus.nats.password = Some(Secret::new("wrong"));
    })
    .await;
    works(nats, |bus| {
        bus.nats.user = Some("cachecast".into());
        bus.nats.password = Some(Secret::new("s3cret-pass"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token() {
    let nats = nats_with(&["--auth", "t0ken-for-cachecast"]).await;
    refused(&nats, |bus| bus.nats.token = Some(Secret::new("not-it"))).await;
    works(nats, |bus| {
        bus.nats.token = Some(Secret::new("t0ken-for-cachecast"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey() {
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let dir = std::env::temp_dir().join(format!("cachecast-nkey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("nkey.conf");
    std::fs::write(
        &config,
        format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )
    .expect("write the server config");
    let nats = nats_with(&["-c", &config.to_string_lossy()]).await;
    let seed = |pair: &nkeys::KeyPair| Secret::new(pair.seed().expect("seed"));
    refused(&nats, |bus| bus.nats.nkey_seed = Some(seed(&stranger))).await;
    works(nats, |bus| bus.nats.nkey_seed = Some(seed(&user))).await;
    std::fs::remove_dir_all(dir).ok();
}

/// A server started with the configuration `config`, written into `dir`.
async fn nats_with_config(dir: &std::path::Path, config: &str) -> NatsServer {
    let file = dir.join("server.conf");
    std::fs::write(&file, config).expect("write the server config");
    nats_with(&["-c", &file.to_string_lossy()]).await
}

fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("cachecast-{name}-"))
        .tempdir()
        .expect("temporary directory")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_in_operator_mode() {
    let dir = temp_dir("creds");
    let mut operator = Operator::new("cachecast-test");
    let account = operator.account("CACHECAST");
    let good = dir.path().join("cachecast.creds");
    std::fs::write(&good, account.user_creds("cachecast")).expect("write creds");
    // A user signed by an account the server does not know.
    let mut other = Operator::new("stranger");
    let bad = dir.path().join("stranger.creds");
    std::fs::write(&bad, other.account("ELSEWHERE").user_creds("intruder")).expect("write");
    let nats = nats_with_config(dir.path(), &operator.server_config(dir.path())).await;
    refused(&nats, |bus| bus.nats.creds_file = Some(bad.clone())).await;
    works(nats, |bus| bus.nats.creds_file = Some(good.clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_custom_ca() {
    let dir = temp_dir("tls");
    let ca = TestCa::new(dir.path(), "cachecast-ca");
    let other_ca = TestCa::new(dir.path(), "other-ca");
    let server = ca.server("nats");
    let nats = nats_with_config(
        dir.path(),
        &format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 2\n}}\n",
            server.cert_file.display(),
            server.key_file.display()
        ),
    )
    .await;
    // The server's certificate is signed by a CA this client does not trust.
    refused(&nats, |bus| {
        bus.nats.tls_ca_file = Some(other_ca.ca_file.clone());
        bus.nats.require_tls = true;
    })
    .await;
    works(nats, |bus| {
        bus.nats.tls_ca_file = Some(ca.ca_file.clone());
        bus.nats.require_tls = true;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let dir = temp_dir("mtls");
    let ca = TestCa::new(dir.path(), "cachecast-ca");
    let other_ca = TestCa::new(dir.path(), "other-ca");
    let server = ca.server("nats");
    let client = ca.client("cachecast");
    let forged = other_ca.client("intruder");
    let nats = nats_with_config(
        dir.path(),
        &format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n",
            server.cert_file.display(),
            server.key_file.display(),
            ca.ca_file.display()
        ),
    )
    .await;
    let trust = ca.ca_file.clone();
    // No client certificate at all.
    refused(&nats, |bus| bus.nats.tls_ca_file = Some(trust.clone())).await;
    // A client certificate the server's CA did not sign.
    refused(&nats, |bus| {
        bus.nats.tls_ca_file = Some(trust.clone());
        bus.nats.tls_cert_file = Some(forged.cert_file.clone());
        bus.nats.tls_key_file = Some(forged.key_file.clone());
    })
    .await;
    works(nats, |bus| {
        bus.nats.tls_ca_file = Some(trust.clone());
        bus.nats.tls_cert_file = Some(client.cert_file.clone());
        bus.nats.tls_key_file = Some(client.key_file.clone());
    })
    .await;
}

#[test]
fn conflicting_or_incomplete_settings_are_refused_before_connecting() {
    let with = |f: fn(&mut cachecast_bus::NatsConfig)| {
        let mut config = cachecast_bus::NatsConfig::default();
        f(&mut config);
        config.check().map_err(|e| e.to_string())
    };
    assert!(with(|_| {}).is_ok());
    let both = with(|c| {
        c.token = Some(Secret::new("t"));
        c.nkey_seed = Some(Secret::new("s"));
    });
    assert!(
        both.as_ref()
            .is_err_and(|e| e.contains("nats.token and nats.nkey_seed")),
        "{both:?}"
    );
    let half = with(|c| c.user = Some("u".into()));
    assert!(
        half.as_ref().is_err_and(|e| e.contains("nats.password")),
        "{half:?}"
    );
    let inbox = with(|c| c.inbox_prefix = "_INBOX.*".into());
    assert!(
        inbox
            .as_ref()
            .is_err_and(|e| e.contains("nats.inbox_prefix")),
        "{inbox:?}"
    );
    let missing = with(|c| c.creds_file = Some("/nonexistent/cachecast.creds".into()));
    assert!(
        missing
            .as_ref()
            .is_err_and(|e| e.contains("nats.creds_file")),
        "{missing:?}"
    );
}
