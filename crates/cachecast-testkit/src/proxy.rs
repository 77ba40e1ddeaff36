//! A TCP proxy a test can cut, black-hole and restore, to disconnect one client (an agent)
//! from a server that keeps running for everyone else.
//!
//! A cut is a clean close: both sides learn at once. A black hole is a partition: connections
//! stay open and bytes stop flowing both ways, so each side learns only from its own timeouts;
//! restored, what was held back flows on.
//!
//! With a latency, every byte reaches the other side that much later in each direction (a WAN
//! link), and so does the connection itself.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    /// Every connection dropped, new ones refused.
    Cut,
    /// Connections held open, nothing forwarded (new ones accepted, never connected through).
    BlackHole,
}

/// Forwards 127.0.0.1:<port> to a target port, until cut or black-holed.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding a free local port to `target_port` on 127.0.0.1.
    pub async fn start(target_port: u16) -> TcpProxy {
        Self::with_latency(target_port, Duration::ZERO).await
    }

    /// Like [`TcpProxy::start`], each direction delayed by `one_way` (a round trip is twice it).
    pub async fn with_latency(target_port: u16, one_way: Duration) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("could not bind the proxy: {e}"));
        let addr = listener.local_addr().expect("local address");
        let (mode, _) = watch::channel(Mode::Forward);
        let watcher = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut state = watcher.subscribe();
                if *state.borrow() == Mode::Cut {
                    drop(client); // cut: refuse
                    continue;
                }
                tokio::spawn(async move {
                    if !one_way.is_zero() {
                        tokio::time::sleep(one_way).await; // the connect's way there
                    }
                    if forwarding(&mut state).await.is_err() {
                        return; // cut while held in the black hole
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    // As NATS sets on its own sockets: without it, a small write waits for the
                    // peer's delayed ack (40 ms) whenever one is still unacknowledged.
                    client.set_nodelay(true).ok();
                    server.set_nodelay(true).ok();
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = pump(client_read, server_write, state.clone(), one_way) => {}
                        _ = pump(server_read, client_write, state.clone(), one_way) => {}
                        _ = state.wait_for(|mode| *mode == Mode::Cut) => {}
                    }
                });
            }
        });
        TcpProxy { addr, mode, task }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `nats://127.0.0.1:<proxy port>`.
    pub fn nats_url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Drops every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Stops forwarding without closing anything: a partition, not a disconnection.
    pub fn black_hole(&self) {
        self.mode.send_replace(Mode::BlackHole);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Forward);
    }
}

/// Waits until the proxy forwards; `Err` once it is cut.
async fn forwarding(state: &mut watch::Receiver<Mode>) -> Result<(), ()> {
    match state.wait_for(|mode| *mode != Mode::BlackHole).await {
        Ok(mode) if *mode == Mode::Forward => Ok(()),
        _ => Err(()),
    }
}

/// Copies one direction, holding bytes back while the proxy is a black hole; with a latency,
/// each read reaches the other side that much later.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut state: watch::Receiver<Mode>,
    latency: Duration,
) {
    if !latency.is_zero() {
        return pump_late(from, to, state, latency).await;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if forwarding(&mut state).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if forwarding(&mut state).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Reads in flight on a delayed link: as many as a real link's buffers would hold before the
/// sender has to wait (a peer that stops reading stops the sender, as without a latency).
const IN_FLIGHT: usize = 64;

/// [`pump`] with a latency: bytes are timestamped when read and written when due, so the delay
/// does not limit throughput. What was read before the sender closed is still delivered.
async fn pump_late(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    state: watch::Receiver<Mode>,
    latency: Duration,
) {
    let (due_tx, mut due_rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let mut read_state = state.clone();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if forwarding(&mut read_state).await.is_err() {
                return;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let due = Instant::now() + latency;
            if due_tx.send((due, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let mut write_state = state;
    let write = async move {
        while let Some((due, bytes)) = due_rx.recv().await {
            tokio::time::sleep_until(due).await;
            if forwarding(&mut write_state).await.is_err() || to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(read, write);
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
