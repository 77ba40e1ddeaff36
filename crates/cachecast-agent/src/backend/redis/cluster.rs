//! A Redis Cluster: evictions on every master, and what tells the agent that the cluster still
//! holds nothing it evicted.
//!
//! The agent reads the topology from `CLUSTER NODES`, talks to each master directly, `SCAN`s
//! every master (in parallel; while slots migrate, a migration's source before its target) and
//! `UNLINK`s keys on the node that holds them, one command per slot; a key that moved meanwhile
//! is followed (`MOVED`, `ASK`). An eviction is complete only when the topology read after it
//! equals the one read before it: a slot that changed owner, a migration that began or ended,
//! or a failover in between could have hidden keys from both scans, so the pass runs again.
//! A master marked failing, or a slot without a master, fails the eviction: it cannot be
//! confirmed there.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::try_join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, ServerErrorKind};

use super::template::Keys;
use crate::backend::BackendError;

/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;
/// Passes an eviction makes while the topology keeps changing under it, before it fails.
const PASSES: usize = 5;
/// How often, and how far apart, disagreeing views are read again before they count.
const SETTLE_TRIES: usize = 20;
const SETTLE_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// The masters of one Redis Cluster, reached from a seed node.
pub(super) struct Cluster {
    /// The configured node: credentials and settings every node's connection shares.
    seed: ConnectionInfo,
    seed_addr: String,
    config: ConnectionManagerConfig,
    /// A connection per node address (`host:port`), opened on first use.
    nodes: Mutex<HashMap<String, ConnectionManager>>,
    /// The topology last read, for commands on one key.
    last: Mutex<Option<Arc<Topology>>>,
    scan_count: usize,
    unlink_batch: usize,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("seed", &self.seed_addr)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    pub(super) fn new(
        seed: ConnectionInfo,
        config: ConnectionManagerConfig,
        scan_count: usize,
        unlink_batch: usize,
    ) -> Result<Self, BackendError> {
        let seed_addr = match seed.addr() {
            ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
            _ => {
                return Err(BackendError::Unsupported(
                    "redis.url names a Redis Cluster over TLS or a Unix socket; this agent reaches a cluster's nodes over plain TCP only: use redis://host:port".into(),
                ));
            }
        };
        Ok(Self {
            seed,
            seed_addr,
            config,
            nodes: Mutex::new(HashMap::new()),
            last: Mutex::new(None),
            scan_count,
            unlink_batch,
        })
    }

    /// Removes every key in `keys` from every master.
    pub(super) async fn evict(&self, keys: &[Keys]) -> Result<u64, BackendError> {
        let mut removed = 0;
        let mut before = self.topology().await?;
        for _ in 0..PASSES {
            removed += self.pass(&before, keys).await?;
            let after = self.topology().await?;
            if after == before {
                return Ok(removed);
            }
            tracing::info!(
                "the Redis Cluster's topology changed during an eviction; evicting again"
            );
            before = after;
        }
        Err(unsettled(format!(
            "its topology changed during each of {PASSES} eviction passes (a resharding or a failover under way)"
        )))
    }

    /// One eviction over the masters of `topology`.
    async fn pass(&self, topology: &Topology, keys: &[Keys]) -> Result<u64, BackendError> {
        let mut exact: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
        let mut patterns = Vec::new();
        for keys in keys {
            match keys {
                Keys::Exact(key) => {
                    let owner = topology.owner(slot_of(key.as_bytes()))?;
                    exact
                        .entry(owner.addr.as_str())
                        .or_default()
                        .push(key.clone().into_bytes());
                }
                Keys::Pattern(pattern) => patterns.push(pattern.as_str()),
            }
        }
        let mut removed: u64 = try_join_all(
            exact
                .iter()
                .map(|(addr, keys)| self.unlink(topology, addr, keys)),
        )
        .await?
        .into_iter()
        .sum();
        for pattern in patterns {
            for wave in topology.waves()? {
                let scans = wave
                    .into_iter()
                    .map(|addr| self.evict_pattern(topology, addr, pattern));
                removed += try_join_all(scans).await?.into_iter().sum::<u64>();
            }
        }
        Ok(removed)
    }

    /// `SCAN`s the node at `addr` for `pattern` and removes what it finds.
    async fn evict_pattern(
        &self,
        topology: &Topology,
        addr: &str,
        pattern: &str,
    ) -> Result<u64, BackendError> {
        let mut conn = self.node(addr)?;
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(self.scan_count)
                .query_async(&mut conn)
                .await?;
            removed += self.unlink(topology, addr, &keys).await?;
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// Removes `keys` through the node at `addr`: one `UNLINK` per slot (a cluster refuses a
    /// command over keys of several slots), pipelined. A slot's command that the node
    /// redirects (the slot moved, or some of its keys did) is redone key by key.
    async fn unlink(
        &self,
        topology: &Topology,
        addr: &str,
        keys: &[Vec<u8>],
    ) -> Result<u64, BackendError> {
        let mut conn = self.node(addr)?;
        let mut removed = 0;
        for batch in keys.chunks(self.unlink_batch) {
            let mut by_slot: BTreeMap<u16, Vec<&[u8]>> = BTreeMap::new();
            for key in batch {
                by_slot.entry(slot_of(key)).or_default().push(key);
            }
            let mut pipe = redis::pipe();
            // Which command of the pipeline is the UNLINK of which slot (ASKING adds one).
            let mut unlinks = Vec::new();
            for (slot, keys) in &by_slot {
                if topology.importing_into(*slot, addr) {
                    // A node answers for a slot it is importing only right after ASKING.
                    pipe.cmd("ASKING");
                    unlinks.push(None);
                }
                pipe.cmd("UNLINK").arg(keys.as_slice());
                unlinks.push(Some((*slot, keys)));
            }
            let replies: Vec<redis::RedisResult<redis::Value>> =
                pipe.ignore_errors().query_async(&mut conn).await?;
            if replies.len() != unlinks.len() {
                return Err(BackendError::Protocol(
                    "a pipeline of UNLINKs got another number of replies",
                ));
            }
            for (unlink, reply) in unlinks.into_iter().zip(replies) {
                let Some((slot, keys)) = unlink else {
                    reply?;
                    continue;
                };
                match reply {
                    Ok(redis::Value::Int(n)) => removed += u64::try_from(n).unwrap_or(0),
                    Ok(_) => {
                        return Err(BackendError::Protocol(
                            "UNLINK answered something other than a count",
                        ));
                    }
                    Err(err) if redirected(&err) => {
                        let asking = topology.importing_into(slot, addr);
                        for key in keys {
                            removed += self.unlink_one(addr, key, asking).await?;
                        }
                    }
                    Err(err) => return Err(err.into()),
                }
            }
        }
        Ok(removed)
    }

    /// Removes one key, starting at `addr` and following at most two redirects.
    async fn unlink_one(&self, addr: &str, key: &[u8], asking: bool) -> Result<u64, BackendError> {
        let mut addr = addr.to_owned();
        let mut asking = asking;
        for _ in 0..3 {
            let mut pipe = redis::pipe();
            if asking {
                pipe.cmd("ASKING").ignore();
            }
            pipe.cmd("UNLINK").arg(key);
            match pipe.query_async::<(u64,)>(&mut self.node(&addr)?).await {
                Ok((n,)) => return Ok(n),
                Err(err) => match redirect_of(&err) {
                    Some((to, ask)) => {
                        asking = ask;
                        addr = to;
                    }
                    None => return Err(err.into()),
                },
            }
        }
        Err(unsettled(format!(
            "a key kept moving between nodes while it was removed (last at {addr})"
        )))
    }

    /// Runs a command on one key on the master that holds it, following one redirect.
    pub(super) async fn on_key<T: redis::FromRedisValue>(
        &self,
        key: &str,
        cmd: &redis::Cmd,
    ) -> Result<T, BackendError> {
        let known = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let topology = match known {
            Some(topology) => topology,
            None => self.topology().await?,
        };
        let owner = topology.owner(slot_of(key.as_bytes()))?.addr.clone();
        let err = match cmd.query_async(&mut self.node(&owner)?).await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let Some((to, ask)) = redirect_of(&err) else {
            // The owner may be gone (a failover): read the map again and try once more.
            let topology = self.topology().await?;
            let owner = topology.owner(slot_of(key.as_bytes()))?.addr.clone();
            return Ok(cmd.query_async(&mut self.node(&owner)?).await?);
        };
        let mut pipe = redis::pipe();
        if ask {
            pipe.cmd("ASKING").ignore();
        } else {
            // The slot has a new owner: read the map again next time.
            *self.last.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        pipe.add_command(cmd.clone());
        let (value,): (T,) = pipe.query_async(&mut self.node(&to)?).await?;
        Ok(value)
    }

    /// Which process runs each master: `<node id>=<run_id>,...` by node id. A master that
    /// restarted, or a replica promoted in a failover (it may lag behind evictions its master
    /// applied), changes it.
    pub(super) async fn run_ids(&self) -> Result<String, BackendError> {
        let topology = self.topology().await?;
        let reads = topology.masters.iter().map(|(id, master)| async move {
            let info: String = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut self.node(&master.addr)?)
                .await?;
            Ok::<_, BackendError>(format!("{id}={}", super::run_id(&info)?))
        });
        Ok(try_join_all(reads).await?.join(","))
    }

    /// Reads the topology: the slot map from the seed (or a master known before, if the
    /// seed does not answer), and each master's own migrations (a node reports only its own).
    pub(super) async fn topology(&self) -> Result<Arc<Topology>, BackendError> {
        // Gossip brings the nodes' views together within moments of a failover or a slot
        // handed over: a view that disagrees is read again for a while before it counts.
        let mut tries = 0;
        loop {
            match self.read_topology().await {
                Ok(topology) => return Ok(topology),
                Err(Reading::Failed(err)) => return Err(err),
                Err(Reading::Disagree(why)) if tries < SETTLE_TRIES => {
                    tracing::debug!(%why, "the cluster's views disagree; reading them again");
                    tries += 1;
                    tokio::time::sleep(SETTLE_PAUSE).await;
                }
                Err(Reading::Disagree(why)) => return Err(unsettled(why)),
            }
        }
    }

    /// One reading of the topology.
    async fn read_topology(&self) -> Result<Arc<Topology>, Reading> {
        let mut candidates = vec![self.seed_addr.clone()];
        if let Some(last) = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            candidates.extend(last.masters.values().map(|m| m.addr.clone()));
        }
        let mut failure = None;
        let mut map = None;
        for addr in candidates {
            match self.cluster_nodes(&addr).await {
                Ok(view) => {
                    map = Some(view);
                    break;
                }
                Err(err) => failure = Some(err),
            }
        }
        let Some(map) = map else {
            return Err(failure
                .unwrap_or_else(|| unsettled("no node answered".into()))
                .into());
        };
        let views = try_join_all(
            map.masters
                .values()
                .map(|master| self.cluster_nodes(&master.addr)),
        )
        .await?;
        // The map is one node's view, which gossip may not have brought up to date (a slot
        // given to another master, a failover): every master must say it serves what the map
        // says, or the topology is changing and the eviction waits for it to settle.
        for ((id, master), view) in map.masters.iter().zip(&views) {
            let agrees = view.myself.as_ref().is_some_and(|(own_id, own)| {
                own_id == id && own.slots == master.slots && own.config_epoch == master.config_epoch
            });
            if !agrees {
                return Err(Reading::Disagree(format!(
                    "master {id} ({}) does not itself say it serves what the map from {} says",
                    master.addr, self.seed_addr
                )));
            }
        }
        let topology = Topology::new(map.masters, views.into_iter().flat_map(|v| v.migrations))
            .map_err(|why| Reading::Failed(unsettled(why)))?;
        let topology = Arc::new(topology);
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(topology.clone());
        Ok(topology)
    }

    async fn cluster_nodes(&self, addr: &str) -> Result<NodesView, BackendError> {
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut self.node(addr)?)
            .await?;
        parse_nodes(&text).map_err(unsettled)
    }

    /// The connection to the node at `addr` (`host:port`).
    fn node(&self, addr: &str) -> Result<ConnectionManager, BackendError> {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(conn) = nodes.get(addr) {
            return Ok(conn.clone());
        }
        let conn = super::connect_to(&self.seed, addr, &self.config)?
            .ok_or_else(|| unsettled(format!("a node has the address {addr:?}")))?;
        nodes.insert(addr.to_owned(), conn.clone());
        Ok(conn)
    }
}

/// Why one reading of the topology gave none.
enum Reading {
    /// The masters' own views disagree with the map: it is changing.
    Disagree(String),
    Failed(BackendError),
}

impl From<BackendError> for Reading {
    fn from(err: BackendError) -> Self {
        Self::Failed(err)
    }
}

fn unsettled(why: String) -> BackendError {
    BackendError::RedisUnsettled(format!("the cluster: {why}"))
}

/// Whether a reply sends the command elsewhere: the slot moved, is moving (`ASK`), or only
/// some of a multi-key command's keys moved (`TRYAGAIN`).
fn redirected(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Server(
            ServerErrorKind::Moved | ServerErrorKind::Ask | ServerErrorKind::TryAgain
        )
    )
}

/// Where a `MOVED` or `ASK` reply sends the command (`host:port`), and whether it is `ASK`;
/// also inside a pipeline's error, where it is the failing command's.
fn redirect_of(err: &RedisError) -> Option<(String, bool)> {
    let is_ask = |err: &RedisError| matches!(err.kind(), ErrorKind::Server(ServerErrorKind::Ask));
    if let Some((to, _)) = err.redirect_node() {
        return Some((to.to_owned(), is_ask(err)));
    }
    let items = err.clone().into_server_errors()?;
    let failed = RedisError::from(items.first()?.1.clone());
    failed
        .redirect_node()
        .map(|(to, _)| (to.to_owned(), is_ask(&failed)))
}

/// The masters of a cluster and the slots moving between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Topology {
    /// By node id.
    masters: BTreeMap<String, Master>,
    /// `(slot, from, to)` by node id.
    migrations: BTreeSet<(u16, String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Master {
    /// `host:port`.
    addr: String,
    /// Changes when a failover or a resharding gives the master its slots.
    config_epoch: u64,
    /// Inclusive ranges.
    slots: Vec<(u16, u16)>,
}

impl Topology {
    /// Checks that every slot has a master and every migration is between known masters.
    fn new(
        masters: BTreeMap<String, Master>,
        migrations: impl IntoIterator<Item = (u16, String, String)>,
    ) -> Result<Self, String> {
        let migrations: BTreeSet<(u16, String, String)> = migrations.into_iter().collect();
        let mut covered = vec![false; usize::from(SLOTS)];
        for master in masters.values() {
            for &(start, end) in &master.slots {
                for slot in start..=end.min(SLOTS - 1) {
                    covered[usize::from(slot)] = true;
                }
            }
        }
        if let Some(slot) = covered.iter().position(|c| !c) {
            return Err(format!(
                "slot {slot} has no master (is cluster_state ok? check with redis-cli --cluster check)"
            ));
        }
        for (slot, from, to) in &migrations {
            if !masters.contains_key(from) || !masters.contains_key(to) {
                return Err(format!(
                    "slot {slot} migrates between {from} and {to}, not both known masters"
                ));
            }
        }
        Ok(Self {
            masters,
            migrations,
        })
    }

    /// The master that serves `slot`.
    fn owner(&self, slot: u16) -> Result<&Master, BackendError> {
        self.masters
            .values()
            .find(|m| m.slots.iter().any(|&(s, e)| (s..=e).contains(&slot)))
            .ok_or_else(|| unsettled(format!("slot {slot} has no master")))
    }

    /// Whether `slot` is moving into the master at `addr`.
    fn importing_into(&self, slot: u16, addr: &str) -> bool {
        self.migrations
            .iter()
            .any(|(s, _, to)| *s == slot && self.masters.get(to).is_some_and(|m| m.addr == addr))
    }

    /// The masters' addresses in the order they are scanned: each wave in parallel, and a
    /// migration's target in a wave after its source. Keys only move from source to target,
    /// so a key that left the source before the source's scan reached it is on the target by
    /// the time the target is scanned.
    fn waves(&self) -> Result<Vec<Vec<&str>>, BackendError> {
        let mut pending: BTreeSet<&str> = self.masters.keys().map(String::as_str).collect();
        let mut waves = Vec::new();
        while !pending.is_empty() {
            let ready: Vec<&str> = pending
                .iter()
                .copied()
                .filter(|id| {
                    !self.migrations.iter().any(|(_, from, to)| {
                        to == id && from != id && pending.contains(from.as_str())
                    })
                })
                .collect();
            if ready.is_empty() {
                return Err(unsettled(
                    "slots migrate both ways between masters; evict again once the resharding is done".into(),
                ));
            }
            for id in &ready {
                pending.remove(id);
            }
            waves.push(
                ready
                    .into_iter()
                    .map(|id| self.masters[id].addr.as_str())
                    .collect(),
            );
        }
        Ok(waves)
    }
}

/// What one node's `CLUSTER NODES` says.
#[derive(Debug, Default)]
struct NodesView {
    /// Masters that hold slots or may (not failing), by node id.
    masters: BTreeMap<String, Master>,
    /// The node's own migrations: `(slot, from, to)`.
    migrations: Vec<(u16, String, String)>,
    /// The node itself, when it is a master: its id and what it says it serves.
    myself: Option<(String, Master)>,
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent>
/// <pong-recv> <config-epoch> <link-state> <slot>...`, where a slot is `n`, `n-m`, or on the
/// node itself `[n->-<to>]` (migrating) or `[n-<-<from>]` (importing).
fn parse_nodes(text: &str) -> Result<NodesView, String> {
    let mut view = NodesView::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [id, address, flags, _, _, _, epoch, _, slots @ ..] = fields.as_slice() else {
            return Err(format!("CLUSTER NODES has a line it cannot read: {line:?}"));
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master") {
            continue;
        }
        let failing = flags
            .iter()
            .find(|f| matches!(**f, "fail" | "fail?" | "handshake" | "noaddr"));
        if let Some(flag) = failing {
            if slots.is_empty() {
                // A master that failed over and holds nothing: it rejoins as a replica.
                continue;
            }
            return Err(format!(
                "master {id} ({address}) serves slots and is marked {flag}"
            ));
        }
        let addr = address.split(['@', ',']).next().unwrap_or_default();
        if super::host_port(addr).is_none_or(|(_, port)| port == 0) {
            return Err(format!("master {id} has no address yet ({address})"));
        }
        let config_epoch = epoch
            .parse()
            .map_err(|_| format!("CLUSTER NODES has a bad config epoch in {line:?}"))?;
        let mut ranges = Vec::new();
        for slot in slots {
            if let Some(marker) = slot.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                if let Some((slot, to)) = marker.split_once("->-") {
                    view.migrations
                        .push((parse_slot(slot)?, (*id).to_owned(), to.to_owned()));
                } else if let Some((slot, from)) = marker.split_once("-<-") {
                    view.migrations
                        .push((parse_slot(slot)?, from.to_owned(), (*id).to_owned()));
                } else {
                    return Err(format!("CLUSTER NODES has an unknown slot marker {slot:?}"));
                }
            } else {
                let (start, end) = slot.split_once('-').unwrap_or((slot, slot));
                ranges.push((parse_slot(start)?, parse_slot(end)?));
            }
        }
        let master = Master {
            addr: addr.to_owned(),
            config_epoch,
            slots: ranges,
        };
        if flags.contains(&"myself") {
            view.myself = Some(((*id).to_owned(), master.clone()));
        }
        view.masters.insert((*id).to_owned(), master);
    }
    Ok(view)
}

fn parse_slot(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|slot| *slot < SLOTS)
        .ok_or_else(|| format!("CLUSTER NODES names a slot {text:?}"))
}

/// The hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag (what is between the
/// first `{` and the next `}`, if not empty), modulo 16384.
pub fn slot_of(key: &[u8]) -> u16 {
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tag.unwrap_or(key)) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0, |crc, &byte| {
        (crc << 8) ^ CRC16_TABLE[usize::from(((crc >> 8) as u8) ^ byte)]
    })
}

/// CRC16 XMODEM (polynomial 0x1021), a byte at a time.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_own() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_ne!(
            slot_of(b"foo{}{bar}"),
            slot_of(b"bar"),
            "an empty tag hashes the key"
        );
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
    }

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002,node2 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [93->-292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f]
";

    fn topology(text: &str) -> Result<Topology, String> {
        let view = parse_nodes(text)?;
        Topology::new(view.masters, view.migrations)
    }

    #[test]
    fn the_map_names_every_master_its_slots_and_migrations() {
        let t = topology(NODES).expect("parses");
        assert_eq!(t.masters.len(), 3, "replicas are left out");
        assert_eq!(t.owner(93).expect("owned").addr, "127.0.0.1:30001");
        assert_eq!(t.owner(5461).expect("owned").addr, "127.0.0.1:30002");
        assert_eq!(t.owner(16383).expect("owned").addr, "127.0.0.1:30003");
        assert!(t.importing_into(93, "127.0.0.1:30003"));
        assert!(!t.importing_into(93, "127.0.0.1:30001"));
        assert!(!t.importing_into(94, "127.0.0.1:30003"));
    }

    #[test]
    fn a_migration_target_is_scanned_after_its_source() {
        let t = topology(NODES).expect("parses");
        let waves = t.waves().expect("ordered");
        let wave_of = |addr: &str| waves.iter().position(|w| w.contains(&addr));
        assert!(wave_of("127.0.0.1:30001") < wave_of("127.0.0.1:30003"));
        let settled =
            topology(&NODES.replace(" [93->-292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f]", ""))
                .expect("parses");
        assert_eq!(settled.waves().expect("ordered").len(), 1, "all at once");
        let both_ways = format!(
            "{NODES}292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 myself,master - 0 0 3 connected 10923-16383 [11000->-e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca]\n"
        );
        assert!(topology(&both_ways).expect("parses").waves().is_err());
    }

    #[test]
    fn a_cluster_that_cannot_confirm_an_eviction_says_why() {
        let failing = NODES.replace(
            "master - 0 1426238316232 2",
            "master,fail - 0 1426238316232 2",
        );
        let err = topology(&failing).expect_err("a failing master with slots");
        assert!(err.contains("67ed2db8") && err.contains("fail"), "{err}");
        let gap = NODES.replace("5461-10922", "5461-10000");
        let err = topology(&gap).expect_err("slots without a master");
        assert!(err.contains("slot 10001"), "{err}");
        // A failed master that holds nothing is left out: it rejoins as a replica.
        let old = format!(
            "{NODES}aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 127.0.0.1:30009@31009 master,fail - 0 0 1 disconnected\n"
        );
        assert_eq!(topology(&old).expect("parses").masters.len(), 3);
    }

    #[test]
    fn a_target_reports_its_import_and_itself() {
        let target = NODES
            .replace("myself,master - 0 0 1 connected 0-5460 [93->-292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f]", "master - 0 0 1 connected 0-5460")
            .replace(
                "127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383",
                "127.0.0.1:30003@31003 myself,master - 0 1426238318243 3 connected 10923-16383 [93-<-e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca]",
            );
        let view = parse_nodes(&target).expect("parses");
        assert_eq!(
            view.migrations,
            [(
                93,
                "e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca".to_owned(),
                "292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f".to_owned()
            )]
        );
        let (id, own) = view.myself.expect("a master reports itself");
        assert_eq!(id, "292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f");
        assert_eq!(own.slots, [(10923, 16383)]);
    }

    #[test]
    fn addresses_may_be_ipv6_but_not_unknown() {
        let v6 = NODES.replace("127.0.0.1:30002@31002,node2", "::1:30002@31002");
        let t = topology(&v6).expect("an IPv6 address");
        assert_eq!(t.owner(5461).expect("owned").addr, "::1:30002");
        let unknown = NODES.replace("127.0.0.1:30002@31002,node2", ":0@0");
        assert!(topology(&unknown).is_err());
    }

    #[test]
    fn a_changed_epoch_or_migration_is_another_topology() {
        let t = topology(NODES).expect("parses");
        let failed_over = NODES.replace("master - 0 1426238318243 3", "master - 0 1426238318243 7");
        assert_ne!(topology(&failed_over).expect("parses"), t);
        let settled = NODES.replace(" [93->-292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f]", "");
        assert_ne!(topology(&settled).expect("parses"), t);
        let pinged = NODES.replace("1426238316232", "1426238399999");
        assert_eq!(
            topology(&pinged).expect("parses"),
            t,
            "ping times do not count"
        );
    }
}
