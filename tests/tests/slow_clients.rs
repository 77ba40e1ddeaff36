//! Clients that hold connections without finishing a request: `cachecast serve` closes them
//! after its header read timeout, caps how many it holds, survives running out of file
//! descriptors, and keeps answering real requests meanwhile.

use std::time::Duration;

use cachecast_e2e::{ChildProcess, TEST_SECRET, eventually, start_serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request line and one header, then silence: what a slowloris client sends.
const PARTIAL_HEADERS: &[u8] =
    b"POST /api/1.0/runtime/caches/response/dev/invalidate HTTP/1.1\r\nHost: cachecast\r\n";

/// Opens `count` connections to `addr` and sends each the start of a request.
async fn slow_clients(addr: &str, count: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let mut tcp = TcpStream::connect(addr).await.expect("connects");
        // A connection closed at once may refuse the write: it still counts as opened.
        tcp.write_all(PARTIAL_HEADERS).await.ok();
        held.push(tcp);
    }
    held
}

/// Whether the server closed `tcp` within `within` (end of stream or a reset).
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_elapsed) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // Some bytes of an answer (none is expected): keep reading until it closes.
            Ok(Ok(_)) => {}
        }
    }
}

/// A full invalidation over a new connection; its status.
async fn invalidate(api: &str) -> Result<u16, reqwest::Error> {
    let token = cachecast_e2e::token(TEST_SECRET, &["dev"]);
    let response = reqwest::Client::new()
        .post(format!(
            "{api}/api/1.0/runtime/caches/response/dev/invalidate"
        ))
        .bearer_auth(token)
        .body("{}")
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// The value of a counter (summed over its labels) in `/metrics`.
async fn counter(api: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{api}/metrics"))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn serve(nats_url: &str, settings: &[(&str, &str)]) -> (ChildProcess, String) {
    start_serve(nats_url, settings).await
}

fn host_port(api: &str) -> &str {
    api.trim_start_matches("http://")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_flood_is_closed_and_real_requests_are_answered_while_it_is_held() {
    let nats = cachecast_testkit::nats().await;
    let (_serve, api) = serve(&nats.url(), &[("CACHECAST_API__HEADER_READ_TIMEOUT", "2s")]).await;
    let mut flood = slow_clients(host_port(&api), 300).await;

    // Held, and a real request on a new connection is answered at once.
    assert_eq!(
        invalidate(&api).await.expect("answered during the flood"),
        200
    );

    // A keep-alive connection that answered one request and then went quiet.
    let mut idle = TcpStream::connect(host_port(&api)).await.expect("connects");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: cachecast\r\n\r\n")
        .await
        .expect("writes");
    let mut answer = [0u8; 256];
    let n = idle.read(&mut answer).await.expect("answer");
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );

    // Every one is closed by the server after the header read timeout, not held for ever.
    for (i, tcp) in flood.iter_mut().enumerate() {
        assert!(
            closed_within(tcp, Duration::from_secs(15)).await,
            "slow connection {i} still open 15 s after a 2 s header read timeout"
        );
    }
    assert!(
        closed_within(&mut idle, Duration::from_secs(15)).await,
        "an idle keep-alive connection is closed too"
    );
    assert!(counter(&api, "cachecast_http_header_timeouts_total").await >= 300.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once_and_the_held_ones_still_answer() {
    let nats = cachecast_testkit::nats().await;
    let (_serve, api) = serve(
        &nats.url(),
        &[
            ("CACHECAST_API__MAX_CONNECTIONS", "50"),
            // Long enough that a connection closed within the checks below was refused,
            // not timed out.
            ("CACHECAST_API__HEADER_READ_TIMEOUT", "60s"),
        ],
    )
    .await;
    let mut held = slow_clients(host_port(&api), 50).await;
    let mut excess = slow_clients(host_port(&api), 100).await;
    for (i, tcp) in excess.iter_mut().enumerate() {
        assert!(
            closed_within(tcp, Duration::from_secs(10)).await,
            "connection {i} over the cap of 50 was not closed at once"
        );
    }
    // The first 50 are held: one of them finishes its request and gets the answer.
    let first = &mut held[0];
    let token = cachecast_e2e::token(TEST_SECRET, &["dev"]);
    first
        .write_all(
            format!(
                "Authorization: Bearer {token}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            )
            .as_bytes(),
        )
        .await
        .expect("writes the rest");
    let mut answer = Vec::new();
    first.read_to_end(&mut answer).await.expect("reads");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // Once the flood lets go, new clients get in again.
    drop(held);
    eventually("a new request is answered", Duration::from_secs(15), || {
        let api = api.clone();
        async move { matches!(invalidate(&api).await, Ok(200)) }
    })
    .await;
    assert!(counter(&api, "cachecast_http_connections_refused_total").await >= 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_is_logged_counted_and_survived() {
    let nats = cachecast_testkit::nats().await;
    let (serve, api) = serve(&nats.url(), &[("CACHECAST_API__HEADER_READ_TIMEOUT", "2s")]).await;
    let pid = serve.pid().expect("serve runs").to_string();
    // A low open-files limit, as on a host that forgot to raise it.
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=64:64"])
        .status()
        .expect("prlimit runs (Debian's util-linux)");
    assert!(limited.success());

    let flood = slow_clients(host_port(&api), 200).await;
    serve
        .wait_for_output("could not accept a connection", Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("EMFILE not logged: {e}"));
    // The held connections time out, descriptors come back, and the server answers again.
    eventually(
        "a request is answered after the flood",
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move { matches!(invalidate(&api).await, Ok(200)) }
        },
    )
    .await;
    drop(flood);
    assert!(counter(&api, "cachecast_http_accept_errors_total{kind=\"EMFILE\"}").await >= 1.0);
    assert!(
        serve.output().contains("ulimit -n"),
        "the log says what to do"
    );
}
