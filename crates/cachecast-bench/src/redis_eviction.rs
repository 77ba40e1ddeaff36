//! Evicting one scope's entries from a Redis that holds more and more keys, on one Redis and on
//! a 3-master Redis Cluster: the Redis backend against a plain `SCAN MATCH` + `UNLINK` loop
//! (on every master at once in the cluster), the floor any eviction by pattern must pay.

use std::time::{Duration, Instant};

use cachecast_agent::{CacheBackend, RedisBackend, RedisConfig};
use cachecast_proto::{EnvId, ResponseSelector};
use futures::future::try_join_all;
use redis::aio::MultiplexedConnection;

pub(crate) const PER_SCOPE: usize = 10_000;
/// The `SCAN COUNT` the backend uses unless configured.
const DEFAULT_SCAN_COUNT: usize = 1000;
/// The larger count measured as a remedy at the largest size.
const LARGE_SCAN_COUNT: usize = 10_000;

#[derive(Debug)]
pub(crate) struct RedisRow {
    pub(crate) topology: &'static str,
    pub(crate) keys: usize,
    pub(crate) scan_count: usize,
    pub(crate) ours: Duration,
    pub(crate) floor: Duration,
}

/// Where the keys live: one node, or each master of a cluster with the slots it serves.
struct Nodes {
    conns: Vec<MultiplexedConnection>,
    /// `(first slot, last slot, index in conns)`; empty for one node.
    slots: Vec<(u16, u16, usize)>,
}

impl Nodes {
    async fn open(url: &str) -> anyhow::Result<Self> {
        let mut seed = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut seed)
            .await?;
        if !info.contains("redis_mode:cluster") {
            return Ok(Self {
                conns: vec![seed],
                slots: Vec::new(),
            });
        }
        // CLUSTER SLOTS: [[first, last, [host, port, id], replicas...], ...]
        let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut seed)
            .await?;
        let mut nodes = Self {
            conns: Vec::new(),
            slots: Vec::new(),
        };
        let mut addrs: Vec<String> = Vec::new();
        for range in ranges {
            let [first, last, master, ..] = range.as_slice() else {
                anyhow::bail!("CLUSTER SLOTS answered a short range");
            };
            let (first, last): (u16, u16) = (
                redis::from_redis_value(first.clone())?,
                redis::from_redis_value(last.clone())?,
            );
            let (host, port): (String, u16) = match master {
                redis::Value::Array(fields) => (
                    redis::from_redis_value(fields[0].clone())?,
                    redis::from_redis_value(fields[1].clone())?,
                ),
                _ => anyhow::bail!("CLUSTER SLOTS answered a master that is not an array"),
            };
            let addr = format!("redis://{host}:{port}");
            let index = match addrs.iter().position(|a| *a == addr) {
                Some(index) => index,
                None => {
                    let conn = redis::Client::open(addr.as_str())?
                        .get_multiplexed_async_connection()
                        .await?;
                    nodes.conns.push(conn);
                    addrs.push(addr);
                    addrs.len() - 1
                }
            };
            nodes.slots.push((first, last, index));
        }
        Ok(nodes)
    }

    fn node_of(&self, key: &str) -> usize {
        let slot = cachecast_agent::redis_key_slot(key.as_bytes());
        self.slots
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map_or(0, |(_, _, index)| *index)
    }

    /// Writes `PER_SCOPE` keys of each scope (`pdp:bench:s<scope>:u<identity>:<n>`).
    async fn load(&mut self, scopes: std::ops::Range<usize>) -> anyhow::Result<()> {
        let mut pipes: Vec<(redis::Pipeline, usize)> = vec![(redis::pipe(), 0); self.conns.len()];
        for scope in scopes {
            for n in 0..PER_SCOPE {
                let key = format!("pdp:bench:s{scope}:u{}:{n}", n % 500);
                let node = self.node_of(&key);
                let (pipe, queued) = &mut pipes[node];
                pipe.cmd("SET").arg(key).arg("permit").ignore();
                *queued += 1;
                if *queued == 10_000 {
                    let () = pipe.query_async(&mut self.conns[node]).await?;
                    *pipe = redis::pipe();
                    *queued = 0;
                }
            }
        }
        for (node, (pipe, queued)) in pipes.into_iter().enumerate() {
            if queued > 0 {
                let () = pipe.query_async(&mut self.conns[node]).await?;
            }
        }
        Ok(())
    }

    /// The floor: `SCAN MATCH` + `UNLINK` on every node at once (one key per `UNLINK` in a
    /// cluster, which refuses a command over keys of several slots).
    async fn floor(&self, pattern: &str) -> anyhow::Result<u64> {
        let cluster = !self.slots.is_empty();
        let scans = self.conns.iter().map(|conn| {
            let mut conn = conn.clone();
            async move {
                let mut cursor = 0u64;
                let mut removed = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(DEFAULT_SCAN_COUNT)
                        .query_async(&mut conn)
                        .await?;
                    if cluster && !keys.is_empty() {
                        let mut pipe = redis::pipe();
                        for key in &keys {
                            pipe.cmd("UNLINK").arg(key);
                        }
                        let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
                        removed += counts.iter().sum::<u64>();
                    } else if !keys.is_empty() {
                        let n: u64 = redis::cmd("UNLINK")
                            .arg(&keys)
                            .query_async(&mut conn)
                            .await?;
                        removed += n;
                    }
                    if next == 0 {
                        return Ok::<_, anyhow::Error>(removed);
                    }
                    cursor = next;
                }
            }
        });
        Ok(try_join_all(scans).await?.into_iter().sum())
    }
}

/// For each size in `sizes` (keys, ascending; loaded on top of the previous size), the median
/// over `runs` alternating runs of the backend and the floor; at the largest size also the
/// backend with a larger `SCAN COUNT`.
pub(crate) async fn measure(
    topology: &'static str,
    url: &str,
    sizes: &[usize],
    runs: usize,
) -> anyhow::Result<Vec<RedisRow>> {
    let mut nodes = Nodes::open(url).await?;
    let env = EnvId::new("bench")?;
    let mut rows = Vec::new();
    let mut loaded = 0;
    for (i, &keys) in sizes.iter().enumerate() {
        let scopes = (keys / PER_SCOPE).max(1);
        eprintln!("  {topology}: loading {} keys", scopes * PER_SCOPE);
        nodes.load(loaded..scopes).await?;
        loaded = scopes;
        let mut counts = vec![DEFAULT_SCAN_COUNT];
        if i + 1 == sizes.len() {
            counts.push(LARGE_SCAN_COUNT);
        }
        for scan_count in counts {
            let backend = RedisBackend::new(&RedisConfig {
                url: url.to_owned(),
                scan_count,
                command_timeout: Duration::from_secs(30),
                ..RedisConfig::default()
            })?;
            let (mut ours, mut floor) = (Vec::new(), Vec::new());
            for run in 0..runs {
                let scope = run % scopes;
                let selector = ResponseSelector {
                    scope_client_ids: vec![format!("s{scope}")],
                    identity_id: None,
                };
                let t = Instant::now();
                let removed = backend.evict_responses(&env, &selector).await?;
                ours.push(t.elapsed());
                anyhow::ensure!(removed == PER_SCOPE as u64, "the backend removed {removed}");
                nodes.load(scope..scope + 1).await?;

                let t = Instant::now();
                let removed = nodes.floor(&format!("pdp:bench:s{scope}:*")).await?;
                floor.push(t.elapsed());
                anyhow::ensure!(removed == PER_SCOPE as u64, "the floor removed {removed}");
                nodes.load(scope..scope + 1).await?;
            }
            ours.sort();
            floor.sort();
            let row = RedisRow {
                topology,
                keys: scopes * PER_SCOPE,
                scan_count,
                ours: ours[runs / 2],
                floor: floor[runs / 2],
            };
            eprintln!(
                "  {topology}: {} keys, COUNT {scan_count}: backend {:?}, floor {:?}",
                row.keys, row.ours, row.floor
            );
            rows.push(row);
        }
    }
    Ok(rows)
}
