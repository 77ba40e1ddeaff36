//! Sites behind NATS leaf nodes: a hub whose JetStream has a domain, and site servers that
//! connect out to it, each through its own [`TcpProxy`] (the site's WAN link, which a test can
//! delay, cut and black-hole).
//!
//! Every site server runs a JetStream of its own (domain `<site>`), as a site with local streams
//! would: a client there that forgot `nats.jetstream_domain` would reach that one, not the hub's,
//! so a test fails if the domain is not used.

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

use crate::{NatsServer, TcpProxy, free_port, nats_binary};

/// How often the leaf link is pinged: a black-holed link is noticed in two pings.
pub const LEAF_PING_INTERVAL: Duration = Duration::from_secs(2);

/// The hub: one nats-server with JetStream domain `domain`, accepting leaf connections.
#[derive(Debug)]
pub struct LeafHub {
    pub server: NatsServer,
    pub domain: String,
    leaf_port: u16,
    _config: TempDir,
}

impl LeafHub {
    /// Starts the hub, its leaf-node port picked free beforehand (five tries if taken). It
    /// advertises no leaf-node address: a site must reconnect through its link, never around it.
    pub async fn start(domain: &str) -> LeafHub {
        let mut last_error = None;
        for _ in 0..5 {
            let leaf_port = free_port();
            let (dir, config) = config_file(&format!(
                "server_name: hub\njetstream {{ domain: {domain} }}\nleafnodes {{ listen: \"127.0.0.1:{leaf_port}\", no_advertise: true }}\n"
            ));
            match NatsServer::builder(nats_binary())
                .args(["-c".to_owned(), config.display().to_string()])
                .start()
                .await
            {
                Ok(server) => {
                    return LeafHub {
                        server,
                        domain: domain.to_owned(),
                        leaf_port,
                        _config: dir,
                    };
                }
                Err(error) => last_error = Some(error),
            }
        }
        panic!("the hub nats-server did not start: {last_error:?}")
    }

    /// The port sites connect their leaf nodes to.
    pub fn leaf_port(&self) -> u16 {
        self.leaf_port
    }
}

/// A site: its own nats-server (JetStream domain `<name>`), a leaf node of the hub through
/// `link`, a proxy delaying each direction by the latency it was started with.
#[derive(Debug)]
pub struct LeafSite {
    pub server: NatsServer,
    pub link: TcpProxy,
    _config: TempDir,
}

impl LeafSite {
    /// Starts site `name` linked to `hub` with `one_way` latency each direction, and waits until
    /// a client of the site reaches the hub's JetStream.
    pub async fn start(name: &str, hub: &LeafHub, one_way: Duration) -> LeafSite {
        let link = TcpProxy::with_latency(hub.leaf_port(), one_way).await;
        let ping = LEAF_PING_INTERVAL.as_secs();
        let (dir, config) = config_file(&format!(
            "server_name: {name}\nping_interval: \"{ping}s\"\nping_max: 2\njetstream {{ domain: {name} }}\nleafnodes {{\n  reconnect: \"1s\"\n  remotes: [ {{ url: \"nats://127.0.0.1:{}\" }} ]\n}}\n",
            link.port()
        ));
        let server = NatsServer::builder(nats_binary())
            .args(["-c".to_owned(), config.display().to_string()])
            .start()
            .await
            .unwrap_or_else(|error| panic!("site {name}'s nats-server did not start: {error}"));
        let site = LeafSite {
            server,
            link,
            _config: dir,
        };
        site.wait_linked(&hub.domain).await;
        site
    }

    /// Waits (up to 30 s) until a client of this site gets an answer from the hub's JetStream
    /// (`$JS.<domain>.API.INFO`): the leaf connection is up and carries requests.
    pub async fn wait_linked(&self, hub_domain: &str) {
        let client = async_nats::connect(self.server.url())
            .await
            .unwrap_or_else(|error| panic!("could not connect to the site's server: {error}"));
        let subject = format!("$JS.{hub_domain}.API.INFO");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let answer = tokio::time::timeout(
                Duration::from_secs(2),
                client.request(subject.clone(), "".into()),
            )
            .await;
            if let Ok(Ok(_)) = answer {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the site at {} did not reach the hub's JetStream (domain {hub_domain}) within 30 s: {answer:?}\n{}",
                self.server.url(),
                self.server.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A server configuration file in a new temporary directory.
fn config_file(text: &str) -> (TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("cachecast-leaf-")
        .tempdir()
        .unwrap_or_else(|error| panic!("could not create a temporary directory: {error}"));
    let path = dir.path().join("nats-server.conf");
    std::fs::write(&path, text)
        .unwrap_or_else(|error| panic!("could not write {}: {error}", path.display()));
    (dir, path)
}
