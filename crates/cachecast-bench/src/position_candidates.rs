//! Where a persistent cache's position should live, by measurement: the two candidates of
//! the design, on one server and on a 3-node cluster, at N caches.
//!
//! - **Ordered consumer per agent, position in the cache** (what cachecast does): a cache is one
//!   registration in the caches bucket; each agent creates an ephemeral ordered consumer (R1,
//!   in memory) starting after the position it reads from the cache. After a server restart the
//!   consumers are gone and every agent creates its own again.
//! - **Durable consumer per cache**: the server keeps the position (the ack floor) in a durable
//!   consumer with the stream's replicas. On a cluster each R3 durable is a Raft group of its
//!   own, and every create or delete goes through the meta leader.
//!
//! Each candidate runs on fresh servers, measuring how long creating N takes (concurrency 32),
//! the servers' resident memory afterwards (summed), and how long until all N are usable again
//! after every server restarted (recreated by the agents, or recovered by the servers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, kv, stream};
use cachecast_testkit::{NatsCluster, NatsServer};
use futures::StreamExt;

use crate::memory::rss;

/// How many environments the caches are spread over (one event subject each).
const ENVS: usize = 10;
/// Creates in flight at once, as a fleet of agents starting together would be.
const CONCURRENCY: usize = 16;

/// One measured candidate.
#[derive(Debug, Clone)]
pub(crate) struct CandidateRow {
    pub(crate) servers: usize,
    pub(crate) candidate: &'static str,
    pub(crate) caches: usize,
    pub(crate) create: Duration,
    pub(crate) rss_bytes: u64,
    pub(crate) recover: Duration,
}

/// The two candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Candidate {
    PositionInCache,
    DurablePerCache,
}

impl Candidate {
    fn name(self) -> &'static str {
        match self {
            Self::PositionInCache => "ordered consumer per agent, position in the cache",
            Self::DurablePerCache => "durable consumer per cache",
        }
    }
}

/// Servers under test: one, or the nodes of a cluster.
struct Servers(Vec<NatsServer>);

impl Servers {
    async fn start(size: usize) -> Self {
        if size == 1 {
            Self(vec![cachecast_testkit::nats().await])
        } else {
            Self(NatsCluster::start(size).await.nodes)
        }
    }

    fn nodes(&mut self) -> Vec<&mut NatsServer> {
        self.0.iter_mut().collect()
    }

    fn urls(&mut self) -> String {
        self.nodes()
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn rss(&mut self) -> anyhow::Result<u64> {
        let mut total = 0;
        for node in self.nodes() {
            total += rss(node
                .pid()
                .ok_or_else(|| anyhow::anyhow!("a server is down"))?)?;
        }
        Ok(total)
    }

    /// Stops every server, then starts them all together (clustered servers wait for their
    /// routes before they are ready).
    async fn restart(&mut self) -> anyhow::Result<()> {
        for node in self.nodes() {
            node.stop().await;
        }
        let starts = self.nodes().into_iter().map(|n| n.start_again());
        for started in futures::future::join_all(starts).await {
            started.map_err(|e| anyhow::anyhow!("a server did not restart: {e}"))?;
        }
        Ok(())
    }
}

/// Measures both candidates with `caches` caches on `servers` servers.
pub(crate) async fn measure(servers: usize, caches: usize) -> anyhow::Result<Vec<CandidateRow>> {
    let mut rows = Vec::new();
    for candidate in [Candidate::PositionInCache, Candidate::DurablePerCache] {
        eprintln!(
            "  {} servers, {caches} caches: {}",
            servers,
            candidate.name()
        );
        rows.push(measure_one(servers, caches, candidate).await?);
    }
    Ok(rows)
}

async fn measure_one(
    size: usize,
    caches: usize,
    candidate: Candidate,
) -> anyhow::Result<CandidateRow> {
    let mut servers = Servers::start(size).await;
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(60)))
        .retry_on_initial_connect()
        .connect(
            servers
                .urls()
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<async_nats::ServerAddr>, _>>()?,
        )
        .await?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(60));
    let replicas = size.min(3);
    // A new cluster elects its meta leader first: retry until JetStream takes requests.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (events, registry) = loop {
        let created = async {
            let events = js
                .get_or_create_stream(stream::Config {
                    name: "CACHECAST".into(),
                    subjects: vec!["cachecast.v1.*.inval".into()],
                    num_replicas: replicas,
                    max_consumers: 100_000,
                    ..Default::default()
                })
                .await?;
            let registry = js
                .create_key_value(kv::Config {
                    bucket: "cachecast-caches".into(),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await?;
            anyhow::Ok((events, registry))
        };
        match created.await {
            Ok(both) => break both,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(err) => return Err(err),
        }
    };

    let started = Instant::now();
    create_all(caches, &events, &registry, candidate).await?;
    let create = started.elapsed();
    // Let the servers settle (Raft snapshots, consumer state) before reading their memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_bytes = servers.rss()?;

    servers.restart().await?;
    let started = Instant::now();
    // The client reconnects by itself; wait until JetStream answers again, asking often (a
    // request sent during the leader election gets no answer at all).
    let mut probe = js.clone();
    probe.set_timeout(Duration::from_millis(500));
    let events = loop {
        match probe.get_stream("CACHECAST").await {
            Ok(stream) => break stream,
            Err(_) if started.elapsed() < Duration::from_secs(120) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => anyhow::bail!("JetStream did not come back: {err}"),
        }
    };
    match candidate {
        // Ephemeral consumers died with the servers: every agent creates its own again.
        Candidate::PositionInCache => {
            for_each(caches, |i| {
                let events = events.clone();
                async move { ordered(&events, i).await }
            })
            .await?
        }
        // Durable consumers come back from the servers' stores: wait until each answers.
        Candidate::DurablePerCache => {
            for_each(caches, |i| {
                let events = events.clone();
                async move {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    loop {
                        match events.consumer_info(format!("cache-{i}")).await {
                            Ok(_) => return Ok(()),
                            Err(_) if Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(50)).await
                            }
                            Err(err) => anyhow::bail!("durable cache-{i} did not come back: {err}"),
                        }
                    }
                }
            })
            .await?
        }
    }
    let recover = started.elapsed();
    Ok(CandidateRow {
        servers: size,
        candidate: candidate.name(),
        caches,
        create,
        rss_bytes,
        recover,
    })
}

/// What starting `caches` caches costs the servers under `candidate`.
async fn create_all(
    caches: usize,
    events: &stream::Stream,
    registry: &kv::Store,
    candidate: Candidate,
) -> anyhow::Result<()> {
    for_each(caches, |i| {
        let (events, registry) = (events.clone(), registry.clone());
        async move {
            match candidate {
                Candidate::PositionInCache => {
                    registry
                        .put(format!("env{}.cache-{i}", i % ENVS), "registration".into())
                        .await?;
                    ordered(&events, i).await
                }
                Candidate::DurablePerCache => {
                    events
                        .create_consumer(pull::Config {
                            durable_name: Some(format!("cache-{i}")),
                            filter_subject: format!("cachecast.v1.env{}.inval", i % ENVS),
                            ack_policy: AckPolicy::Explicit,
                            deliver_policy: DeliverPolicy::New,
                            ..Default::default()
                        })
                        .await?;
                    Ok(())
                }
            }
        }
    })
    .await
}

/// One agent's ordered consumer of its environment (what `cachecast agent` creates).
async fn ordered(events: &stream::Stream, i: usize) -> anyhow::Result<()> {
    events
        .create_consumer(pull::OrderedConfig {
            name: Some(format!("agent-{i}")),
            filter_subject: format!("cachecast.v1.env{}.inval", i % ENVS),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Runs `op(i)` for every i below `count`, [`CONCURRENCY`] at a time.
async fn for_each<F, Fut>(count: usize, op: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let op = Arc::new(op);
    let mut results = futures::stream::iter(0..count)
        .map(|i| {
            let op = op.clone();
            async move { op(i).await }
        })
        .buffer_unordered(CONCURRENCY);
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}
