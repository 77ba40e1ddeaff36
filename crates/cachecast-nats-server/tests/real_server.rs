//! Starts the real nats-server (found like the test kit finds it) and checks start, kill,
//! restart on the same port, pause and resume, and the error when the port is taken.
//!
//! There is no skipping: without a binary the test fails with the message saying how to get one.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use cachecast_nats_server::{Error, NatsServer, locate};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    net::TcpStream,
};

fn binary() -> PathBuf {
    let tools = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(".tools");
    locate(&tools).unwrap_or_else(|e| panic!("{e}"))
}

/// Connects and reads the server's first line, which must be its INFO.
async fn read_info(port: u16) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("connect to nats-server on port {port}: {e}"));
    read_line(stream, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no INFO line from nats-server on port {port} within 5 s"))
}

async fn read_line(stream: TcpStream, timeout: Duration) -> Option<String> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    match tokio::time::timeout(timeout, reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => Some(line),
        _ => None,
    }
}

#[tokio::test]
async fn starts_kills_restarts_pauses_and_resumes_a_real_server() {
    let mut server = NatsServer::builder(binary())
        .start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let port = server.port();
    assert_ne!(port, 0);
    assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
    assert!(server.pid().is_some());
    assert!(
        server.store_dir().join("jetstream").is_dir(),
        "JetStream is on"
    );
    let info = read_info(port).await;
    assert!(info.starts_with("INFO {"), "{info}");
    assert!(info.contains("\"jetstream\":true"), "{info}");

    server.kill().await;
    assert!(server.pid().is_none());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "port {port} still open after kill"
    );

    server.start_again().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.port(), port);
    assert!(read_info(port).await.starts_with("INFO {"));
    assert!(server.log_tail().contains("Server is ready"));

    // Paused: the kernel still accepts the connection, but the server says nothing.
    server.pause().unwrap_or_else(|e| panic!("{e}"));
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let early = tokio::time::timeout(Duration::from_millis(300), reader.read_line(&mut line)).await;
    assert!(early.is_err(), "a paused server answered: {line:?}");
    server.resume().unwrap_or_else(|e| panic!("{e}"));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .unwrap_or_else(|_| panic!("no INFO within 5 s of resume"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(line.starts_with("INFO {"), "{line}");

    server.stop().await;
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    assert!(
        server.pause().is_err(),
        "pausing a stopped server is an error"
    );
}

#[tokio::test]
async fn restart_on_a_taken_port_fails_with_the_log_tail() {
    let mut server = NatsServer::builder(binary())
        .start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let port = server.port();
    server.kill().await;
    let _squatter =
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("{e}"));
    match server.start_again().await {
        Err(error @ Error::Exited { .. }) => {
            let message = error.to_string();
            assert!(message.contains(&port.to_string()), "{message}");
            assert!(message.contains("address already in use"), "{message}");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    assert!(server.pid().is_none());
}

#[tokio::test]
async fn keeps_a_given_store_dir_and_log_file() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = dir.path().join("store");
    let log = dir.path().join("logs/nats.log");
    let mut server = NatsServer::builder(binary())
        .store_dir(&store)
        .log_file(&log)
        .start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.store_dir(), store);
    assert!(store.join("jetstream").is_dir());
    server.stop().await;
    server.start_again().await.unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(text.matches("Server is ready").count(), 2, "{text}");
    drop(server);
    assert!(store.is_dir(), "a given store dir is never deleted");
}
