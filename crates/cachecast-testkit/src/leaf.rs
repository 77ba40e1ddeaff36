//! Sites behind NATS leaf nodes: a hub whose JetStream has a domain, and site servers that
//! connect out to it through [`TcpProxy`]s (the site's WAN link, which a test can delay, cut
//! and black-hole).
//!
//! Every site server runs a JetStream of its own (domain `<site>`), as a site with local streams
//! would: a client there that forgot `nats.jetstream_domain` would reach that one, not the hub's,
//! so a test fails if the domain is not used.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::{NatsServer, TcpProxy, free_port, nats_binary};

/// How often hub and sites ping their connections (the leaf link included): a link that dies
/// without a close is noticed within a few pings.
const PING_INTERVAL: Duration = Duration::from_secs(2);

/// Where sites connect to a hub: its JetStream domain and every node's leaf-node port.
#[derive(Debug, Clone)]
pub struct HubAddress {
    pub domain: String,
    pub leaf_ports: Vec<u16>,
}

/// The settings that make a server a hub node: a JetStream domain, and a leaf-node port that
/// advertises no address (a site must reconnect through its link, never around it).
pub(crate) fn hub_settings(domain: &str, leaf_port: u16) -> String {
    format!(
        "ping_interval: \"{}s\"\nping_max: 2\njetstream {{ domain: {domain} }}\nleafnodes {{ listen: \"127.0.0.1:{leaf_port}\", no_advertise: true }}\n",
        PING_INTERVAL.as_secs()
    )
}

/// The hub: one nats-server with JetStream domain `domain`, accepting leaf connections.
#[derive(Debug)]
pub struct LeafHub {
    pub server: NatsServer,
    pub address: HubAddress,
    _config: TempDir,
}

impl LeafHub {
    /// Starts the hub, its leaf-node port picked free beforehand (five tries if taken).
    pub async fn start(domain: &str) -> LeafHub {
        let mut last_error = None;
        for _ in 0..5 {
            let leaf_port = free_port();
            let (dir, config) = config_file(&format!(
                "server_name: hub\n{}",
                hub_settings(domain, leaf_port)
            ));
            match NatsServer::builder(nats_binary())
                .args(["-c".to_owned(), config.display().to_string()])
                .start()
                .await
            {
                Ok(server) => {
                    return LeafHub {
                        server,
                        address: HubAddress {
                            domain: domain.to_owned(),
                            leaf_ports: vec![leaf_port],
                        },
                        _config: dir,
                    };
                }
                Err(error) => last_error = Some(error),
            }
        }
        panic!("the hub nats-server did not start: {last_error:?}")
    }
}

/// A site: its own nats-server (JetStream domain `<name>`), a leaf node of the hub through its
/// link: one proxy per hub node, each delaying each direction by the latency it was started with.
#[derive(Debug)]
pub struct LeafSite {
    pub server: NatsServer,
    links: Vec<TcpProxy>,
    hub_domain: String,
    _config: TempDir,
}

impl LeafSite {
    /// Starts site `name` linked to the hub at `hub` with `one_way` latency each direction, and
    /// waits until a client of the site reaches the hub's JetStream.
    pub async fn start(name: &str, hub: &HubAddress, one_way: Duration) -> LeafSite {
        let mut links = Vec::new();
        for port in &hub.leaf_ports {
            links.push(TcpProxy::with_latency(*port, one_way).await);
        }
        let urls = links
            .iter()
            .map(|link| format!("\"nats://127.0.0.1:{}\"", link.port()))
            .collect::<Vec<_>>()
            .join(", ");
        let ping = PING_INTERVAL.as_secs();
        let (dir, config) = config_file(&format!(
            "server_name: {name}\nping_interval: \"{ping}s\"\nping_max: 2\njetstream {{ domain: {name} }}\nleafnodes {{\n  reconnect: \"1s\"\n  remotes: [ {{ urls: [ {urls} ] }} ]\n}}\n"
        ));
        let server = NatsServer::builder(nats_binary())
            .args(["-c".to_owned(), config.display().to_string()])
            .start()
            .await
            .unwrap_or_else(|error| panic!("site {name}'s nats-server did not start: {error}"));
        let site = LeafSite {
            server,
            links,
            hub_domain: hub.domain.clone(),
            _config: dir,
        };
        site.wait_linked().await;
        site
    }

    /// Cuts the site's link to the hub: its leaf connection drops and cannot come back.
    pub fn cut_link(&self) {
        self.links.iter().for_each(TcpProxy::cut);
    }

    /// Stops the site's link without closing it (a WAN link that died half-open): only pings
    /// tell either end.
    pub fn black_hole_link(&self) {
        self.links.iter().for_each(TcpProxy::black_hole);
    }

    /// Lets the site's link carry traffic again.
    pub fn restore_link(&self) {
        self.links.iter().for_each(TcpProxy::restore);
    }

    /// Waits (up to 30 s) until a client of this site gets an answer from the hub's JetStream
    /// (`$JS.<domain>.API.INFO`): the leaf connection is up and carries requests.
    pub async fn wait_linked(&self) {
        let hub_domain = &self.hub_domain;
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
            // A site server with a JetStream of its own answers for an unreachable domain
            // too, with an error: only an account info is the hub's answer.
            if let Ok(Ok(message)) = &answer
                && String::from_utf8_lossy(&message.payload).contains("account_info_response")
                && !String::from_utf8_lossy(&message.payload).contains("\"error\"")
            {
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
    let path = write_config(dir.path(), "nats-server.conf", text);
    (dir, path)
}

/// Writes the server configuration file `name` in `dir`.
pub(crate) fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text)
        .unwrap_or_else(|error| panic!("could not write {}: {error}", path.display()));
    path
}
