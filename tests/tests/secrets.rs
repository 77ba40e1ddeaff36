//! Secrets never leak: the real `serve` and `agent` binaries run with debug logs and known
//! secret values (the HS256 secret, a NATS password, a Redis password), requests are driven
//! with good and bad tokens, and every byte they print (logs, `--print-config`, `/metrics`,
//! the HTTP answers) is searched for each secret.

use std::time::Duration;

use cachecast_e2e::{ChildProcess, cachecast_with_env, eventually, logged_addr, token};
use cachecast_testkit::NatsServer;

const HS256_SECRET: &str = "hs256-SECRET-7f3a91c0";
const NATS_PASSWORD: &str = "nats-PASS-0c55e2d1";
const REDIS_PASSWORD: &str = "redis-PASS-9d21bb6e";
const BAD_TOKEN: &str = "bad-TOKEN-SECRET-44119a";

const EXIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_config_metrics_or_answers() {
    cachecast_e2e::init_logs();
    let nats = NatsServer::builder(cachecast_testkit::nats_binary())
        .args(["--user", "cachecast", "--pass", NATS_PASSWORD])
        .start()
        .await
        .expect("nats-server starts");
    let redis = cachecast_testkit::redis().await;
    // Protect the Redis with a password, then use it only through the agent's redis.url.
    let client = redis::Client::open(redis.url()).expect("Redis URL");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(REDIS_PASSWORD)
        .query_async(&mut admin)
        .await
        .expect("set the Redis password");
    let redis_url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}", redis.port());

    let common = [
        ("RUST_LOG", "debug"),
        ("CACHECAST_NATS__USER", "cachecast"),
        ("CACHECAST_NATS__PASSWORD", NATS_PASSWORD),
        ("CACHECAST_AUTH__HS256_SECRET", HS256_SECRET),
        ("CACHECAST_AUTH__ALLOW_HS256", "true"),
        ("CACHECAST_REDIS__URL", redis_url.as_str()),
    ];
    let admin_port = cachecast_testkit::free_port().to_string();
    let admin_listen = format!("127.0.0.1:{admin_port}");
    let agent_args = [
        "agent",
        "--env",
        "dev",
        "--id",
        "secret-keeper",
        "--backend",
        "redis",
        "--admin-listen",
        &admin_listen,
    ];
    let serve_args = ["serve", "--listen", "127.0.0.1:0"];

    let serve = cachecast_with_env(&nats.url(), &serve_args, &common);
    serve
        .wait_for_output("API listening on", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("serve did not start: {e}"));
    let api = format!("http://{}", logged_addr(&serve, "API listening on http://"));
    let agent = cachecast_with_env(&nats.url(), &agent_args, &common);

    let http = reqwest::Client::new();
    let url = format!("{api}/api/1.0/runtime/caches/response/dev/invalidate");
    let good = token(HS256_SECRET, &["dev"]);
    let forged = token("not-the-secret", &["dev"]);
    let mut seen = Vec::new();
    // Once the agent is live, a flush is confirmed by it.
    eventually(
        "the agent is live and confirms",
        Duration::from_secs(30),
        || {
            let request = http.post(&url).bearer_auth(&good).body("{}").send();
            async move {
                match request.await {
                    Ok(response) => response
                        .text()
                        .await
                        .is_ok_and(|body| body.contains("\"successful\":1")),
                    Err(_) => false,
                }
            }
        },
    )
    .await;
    for (authorization, body, status) in [
        (
            format!("Bearer {good}"),
            r#"{"scopeClientId": "orders"}"#,
            200,
        ),
        (format!("Bearer {BAD_TOKEN}"), "{}", 401),
        (format!("Bearer {forged}"), "{}", 401),
        (format!("Basic {BAD_TOKEN}"), "{}", 401),
        (BAD_TOKEN.to_owned(), "{}", 401),
        (format!("Bearer {good}"), "{", 400),
    ] {
        let response = http
            .post(&url)
            .header("Authorization", authorization)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status().as_u16(), status, "{body}");
        seen.push(response.text().await.expect("body"));
    }
    for metrics in [
        format!("{api}/metrics"),
        format!("http://{admin_listen}/metrics"),
    ] {
        let response = http.get(&metrics).send().await.expect("metrics answer");
        assert_eq!(response.status().as_u16(), 200, "{metrics}");
        let text = response.text().await.expect("body");
        assert!(text.contains("cachecast_"), "{metrics}: {text}");
        seen.push(text);
    }
    let mut printed = Vec::new();
    for args in [&serve_args[..], &agent_args[..]] {
        let mut with_print = args.to_vec();
        with_print.push("--print-config");
        let mut print = cachecast_with_env(&nats.url(), &with_print, &common);
        assert_eq!(
            print.wait_exit(EXIT).await.and_then(|s| s.code()),
            Some(0),
            "{}",
            print.output()
        );
        assert!(print.stdout().contains("<redacted>"), "{}", print.stdout());
        printed.push(print);
    }

    let outputs: Vec<(&str, String)> = [("serve", &serve), ("agent", &agent)]
        .into_iter()
        .map(|(name, p): (&str, &ChildProcess)| (name, p.output()))
        .chain(printed.iter().map(|p| ("--print-config", p.output())))
        .chain(seen.into_iter().map(|s| ("an HTTP answer", s)))
        .collect();
    // The debug logs really are on (or this test proves nothing about them).
    assert!(
        outputs[0].1.contains("DEBUG"),
        "serve logs at debug: {}",
        outputs[0].1
    );
    let signature = good.rsplit('.').next().expect("a JWT has a signature");
    for secret in [
        HS256_SECRET,
        NATS_PASSWORD,
        REDIS_PASSWORD,
        BAD_TOKEN,
        good.as_str(),
        signature,
        forged.as_str(),
    ] {
        for (what, text) in &outputs {
            assert!(
                !text.contains(secret),
                "{what} shows the secret {secret:?}:\n{text}"
            );
        }
    }
}
