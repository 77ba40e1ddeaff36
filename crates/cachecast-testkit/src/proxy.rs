//! A TCP proxy a test can cut and restore, to disconnect one client (an agent) from a server
//! that keeps running for everyone else.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards 127.0.0.1:<port> to a target port until [`TcpProxy::cut`].
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding a free local port to `target_port` on 127.0.0.1.
    pub async fn start(target_port: u16) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("could not bind the proxy: {e}"));
        let addr = listener.local_addr().expect("local address");
        let (cut, _) = watch::channel(false);
        let watcher = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut state = watcher.subscribe();
                if *state.borrow() {
                    drop(client); // cut: refuse
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = state.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        TcpProxy { addr, cut, task }
    }

    /// `nats://127.0.0.1:<proxy port>`.
    pub fn nats_url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Drops every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
