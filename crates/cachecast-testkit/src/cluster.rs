//! Three (or any number of) nats-servers in one JetStream cluster on 127.0.0.1, whose nodes a
//! test can kill, restart and pause one by one.

use tempfile::TempDir;

use crate::leaf::{HubAddress, hub_settings, write_config};
use crate::{NatsServer, free_port, nats_binary};

/// A JetStream cluster of real nats-servers.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    /// As a hub of sites: where they connect, and the nodes' configuration files.
    hub: Option<(HubAddress, TempDir)>,
}

impl NatsCluster {
    /// Starts `size` servers routed to each other, each with its own store. The route ports
    /// are picked free beforehand, so another process may take one first: then the whole
    /// cluster is started again on new ports (five tries).
    pub async fn start(size: usize) -> NatsCluster {
        Self::start_as(size, None).await
    }

    /// Like [`NatsCluster::start`], as the hub of sites (see [`crate::LeafSite`]): JetStream
    /// domain `domain`, and every node accepting leaf nodes.
    pub async fn start_hub(size: usize, domain: &str) -> NatsCluster {
        Self::start_as(size, Some(domain)).await
    }

    /// Where sites connect, when started as a hub.
    pub fn hub_address(&self) -> Option<&HubAddress> {
        self.hub.as_ref().map(|(address, _)| address)
    }

    async fn start_as(size: usize, hub_domain: Option<&str>) -> NatsCluster {
        let mut tries = 5;
        loop {
            match Self::try_start(size, hub_domain).await {
                Ok(cluster) => return cluster,
                Err(error) if tries > 1 => {
                    tries -= 1;
                    eprintln!(
                        "a cluster node did not start ({error}); starting the cluster again on other ports"
                    );
                }
                Err(error) => panic!("a cluster node did not start: {error}"),
            }
        }
    }

    async fn try_start(
        size: usize,
        hub_domain: Option<&str>,
    ) -> Result<NatsCluster, cachecast_nats_server::Error> {
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        // A hub node's settings go in a file of its own (leaf nodes have no flags).
        let hub = hub_domain.map(|domain| {
            let leaf_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
            let dir = tempfile::tempdir()
                .unwrap_or_else(|error| panic!("could not create a temporary directory: {error}"));
            for (n, port) in leaf_ports.iter().enumerate() {
                write_config(
                    dir.path(),
                    &format!("n{n}.conf"),
                    &hub_settings(domain, *port),
                );
            }
            let address = HubAddress {
                domain: domain.to_owned(),
                leaf_ports,
            };
            (address, dir)
        });
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let starts = cluster_ports.iter().enumerate().map(|(n, port)| {
            let mut args = vec![
                "--server_name".to_owned(),
                format!("n{n}"),
                "--cluster_name".to_owned(),
                "cachecast".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{port}"),
                "--routes".to_owned(),
                routes.clone(),
                // Clients use the addresses they are given, and only those: one behind a
                // proxy must not fail over around it to an address the cluster advertised.
                "--no_advertise".to_owned(),
            ];
            if let Some((_, dir)) = &hub {
                args.push("-c".to_owned());
                args.push(dir.path().join(format!("n{n}.conf")).display().to_string());
            }
            // The client port is the server's pick (port 0): only the routes' are fixed.
            NatsServer::builder(nats_binary()).args(args).start()
        });
        // Started together: a clustered server waits for its routes before it is ready. The
        // nodes that did start are stopped when dropped.
        let nodes = futures::future::join_all(starts)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NatsCluster { nodes, hub })
    }

    /// Every node's client URL, comma-separated, for a client that fails over.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
