//! A Redis Cluster cache: every eviction reaches every master, a slot caught mid-migration is
//! evicted on both sides, and a failover to a replica that lagged behind an eviction is
//! flushed before anything more is confirmed. The test looks into every master itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cachecast_agent::{RedisBackend, RedisConfig};
use cachecast_e2e::Stack;
use cachecast_proto::CacheName;
use cachecast_testkit::RedisCluster;
use redis::aio::MultiplexedConnection;

const RESPONSES: &str = "/api/1.0/runtime/caches/response/dev/invalidate";
const IDENTITIES: &str = "/api/1.0/runtime/caches/identity/dev/invalidate";

/// The cluster as the PDP and the test see it: writes land on each key's master, reads look
/// at every node that is a master now.
struct Pdp<'a> {
    cluster: &'a RedisCluster,
    conns: HashMap<u16, MultiplexedConnection>,
}

impl<'a> Pdp<'a> {
    fn new(cluster: &'a RedisCluster) -> Self {
        Self {
            cluster,
            conns: HashMap::new(),
        }
    }

    async fn conn(&mut self, port: u16) -> MultiplexedConnection {
        if let Some(conn) = self.conns.get(&port) {
            return conn.clone();
        }
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("URL");
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("a connection to a cluster node");
        self.conns.insert(port, conn.clone());
        conn
    }

    /// Caches `keys`, each on the master of its slot (following `MOVED` from the first node).
    async fn set(&mut self, keys: &[String]) {
        let first = self.cluster.nodes[0].port();
        for key in keys {
            let mut conn = self.conn(first).await;
            let written: redis::RedisResult<()> = redis::cmd("SET")
                .arg(key)
                .arg("permit")
                .query_async(&mut conn)
                .await;
            if let Err(err) = written {
                let (addr, _) = err
                    .redirect_node()
                    .unwrap_or_else(|| panic!("SET {key}: {err}"));
                let port = port_of(addr);
                let mut conn = self.conn(port).await;
                let () = redis::cmd("SET")
                    .arg(key)
                    .arg("permit")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("SET {key} on its master: {e}"));
            }
        }
    }

    /// The ports of the nodes that are masters now.
    async fn masters(&mut self) -> Vec<u16> {
        let mut masters = Vec::new();
        for node in &self.cluster.nodes {
            let info = self
                .cluster
                .cli(node.port(), &["INFO", "replication"])
                .await;
            if info.contains("role:master") {
                masters.push(node.port());
            }
        }
        masters
    }

    /// Every cached key on `port` (not cachecast's own).
    async fn keys_on(&mut self, port: u16) -> BTreeSet<String> {
        let mut conn = self.conn(port).await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        keys.into_iter()
            .filter(|k| !k.starts_with("cachecast:"))
            .collect()
    }

    /// Every cached key on every master.
    async fn keys(&mut self) -> BTreeSet<String> {
        let mut all = BTreeSet::new();
        for port in self.masters().await {
            all.extend(self.keys_on(port).await);
        }
        all
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("not host:port: {addr}"))
}

async fn agent_on(stack: &Stack, cluster: &RedisCluster) -> cachecast_e2e::AgentHandle {
    let config = RedisConfig {
        url: cluster.url(),
        keyed_caches: BTreeMap::from([(
            CacheName::new("apikeys").expect("valid"),
            "apikey:{env}:{id}".to_owned(),
        )]),
        // Small scans: an eviction takes many steps on each master.
        scan_count: 10,
        ..RedisConfig::default()
    };
    let backend = RedisBackend::new(&config).expect("redis backend");
    let agent = stack.agent("dev", "redis-cluster", backend).await;
    stack.wait_for_agents("dev", 1).await;
    agent
}

fn responses(scopes: &[&str], identities: &[&str]) -> Vec<String> {
    let mut keys = Vec::new();
    for scope in scopes {
        for identity in identities {
            keys.push(format!("pdp:dev:{scope}:{identity}:h"));
        }
    }
    keys
}

fn confirmed(answer: &cachecast_e2e::Answer, what: &str) {
    assert_eq!(answer.status, 200, "{what}: {}", answer.body);
    assert_eq!(
        answer.body["_nodes"]["successful"], 1,
        "{what}: {}",
        answer.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_identity_and_keyed_evictions_reach_every_master() {
    let cluster = RedisCluster::start(3, 0).await;
    let stack = Stack::start().await;
    let _agent = agent_on(&stack, &cluster).await;
    let mut pdp = Pdp::new(&cluster);

    let identities: Vec<String> = (0..12).map(|n| format!("u{n}")).collect();
    let ids: Vec<&str> = identities.iter().map(String::as_str).collect();
    let mut keys = responses(&["s0", "s1", "s2"], &ids);
    keys.extend(ids.iter().map(|i| format!("pdp-identity:dev:User:{i}")));
    keys.extend((0..12).map(|n| format!("apikey:dev:k{n}")));
    keys.push("pdp:qa:s1:u1:h".into());
    pdp.set(&keys).await;
    for port in pdp.masters().await {
        assert!(
            !pdp.keys_on(port).await.is_empty(),
            "the keys spread over every master (none on {port})"
        );
    }
    let mut expected: BTreeSet<String> = keys.iter().cloned().collect();

    let answer = stack
        .post_as("dev", RESPONSES, r#"{"scopeClientId":"s1"}"#)
        .await;
    confirmed(&answer, "scope s1");
    expected.retain(|k| !k.starts_with("pdp:dev:s1:"));
    assert_eq!(
        pdp.keys().await,
        expected,
        "scope s1 is gone from every master, the rest stays"
    );

    let answer = stack
        .post_as("dev", IDENTITIES, r#"{"identityId":"u2"}"#)
        .await;
    confirmed(&answer, "identity u2");
    expected.remove("pdp-identity:dev:User:u2");
    let answer = stack
        .post_as(
            "dev",
            IDENTITIES,
            r#"{"identityTemplate":"User","identityId":"u3"}"#,
        )
        .await;
    confirmed(&answer, "identity User/u3 (one exact key)");
    expected.remove("pdp-identity:dev:User:u3");
    assert_eq!(pdp.keys().await, expected);

    let answer = stack
        .post_as(
            "dev",
            "/api/1.0/runtime/caches/keyed/dev/apikeys/k1,k7,k11/_clear_cache",
            "",
        )
        .await;
    confirmed(&answer, "keyed ids");
    for n in [1, 7, 11] {
        expected.remove(&format!("apikey:dev:k{n}"));
    }
    assert_eq!(pdp.keys().await, expected);
    let answer = stack
        .post_as(
            "dev",
            "/api/1.0/runtime/caches/keyed/dev/apikeys/*/_clear_cache",
            "",
        )
        .await;
    confirmed(&answer, "keyed *");
    expected.retain(|k| !k.starts_with("apikey:dev:"));

    let answer = stack.post_as("dev", RESPONSES, "{}").await;
    confirmed(&answer, "everything");
    expected.retain(|k| !k.starts_with("pdp:dev:"));
    assert_eq!(
        pdp.keys().await,
        expected,
        "only other environments' keys and identities stay"
    );
}

/// The node id and port of every master, from a node's `CLUSTER NODES`.
async fn master_ids(cluster: &RedisCluster, port: u16) -> BTreeMap<u16, String> {
    cluster
        .cli(port, &["CLUSTER", "NODES"])
        .await
        .lines()
        .filter(|l| l.contains("master") && !l.contains("fail"))
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let port = port_of(fields[1].split('@').next().unwrap_or_default());
            (port, fields[0].to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_caught_mid_migration_is_evicted_on_both_sides() {
    let cluster = RedisCluster::start(3, 0).await;
    let stack = Stack::start().await;
    let _agent = agent_on(&stack, &cluster).await;
    let mut pdp = Pdp::new(&cluster);

    // Identities with the hash tag `{t}` put their keys in one slot, which then migrates.
    let tagged: Vec<String> = (0..8).map(|n| format!("{{t}}u{n}")).collect();
    let tagged_ids: Vec<&str> = tagged.iter().map(String::as_str).collect();
    let mut keys = responses(&["s1", "s2"], &tagged_ids);
    keys.extend(responses(&["s1", "s2"], &["a", "b", "c", "d"]));
    keys.extend(tagged.iter().map(|i| format!("pdp-identity:dev:User:{i}")));
    pdp.set(&keys).await;

    let Migration {
        slot,
        from,
        to,
        masters,
    } = start_migration(&cluster, &mut pdp).await;
    let to_id = masters[&to].clone();
    // Half the slot's keys move: the slot now lives on both masters.
    let mut slot_keys: Vec<String> = pdp
        .keys_on(from)
        .await
        .into_iter()
        .filter(|k| k.contains("{t}"))
        .collect();
    slot_keys.sort();
    let moving: Vec<&str> = slot_keys.iter().step_by(2).map(String::as_str).collect();
    let mut migrate = vec!["MIGRATE", "127.0.0.1"];
    let to_port = to.to_string();
    migrate.extend([to_port.as_str(), "", "0", "5000", "KEYS"]);
    migrate.extend(&moving);
    let moved = cluster.cli(from, &migrate).await;
    assert!(moved.contains("OK"), "MIGRATE: {moved}");
    assert!(
        pdp.keys_on(to).await.iter().any(|k| k.contains("{t}"))
            && pdp.keys_on(from).await.iter().any(|k| k.contains("{t}")),
        "the slot's keys are on both masters"
    );
    assert!(
        pdp.keys_on(to)
            .await
            .contains("pdp-identity:dev:User:{t}u0")
    );
    assert!(
        pdp.keys_on(from)
            .await
            .contains("pdp-identity:dev:User:{t}u1")
    );
    let mut expected: BTreeSet<String> = keys.iter().cloned().collect();

    let answer = stack
        .post_as("dev", RESPONSES, r#"{"scopeClientId":"s1"}"#)
        .await;
    confirmed(&answer, "scope s1 while a slot migrates");
    expected.retain(|k| !k.starts_with("pdp:dev:s1:"));
    assert_eq!(
        pdp.keys().await,
        expected,
        "scope s1 is gone from both sides of the migration"
    );

    // Exact keys, one already on the target (u0: sorted first, so it moved) and one still
    // on the source (u1).
    for id in ["{t}u0", "{t}u1"] {
        let body = format!(r#"{{"identityTemplate":"User","identityId":"{id}"}}"#);
        let answer = stack.post_as("dev", IDENTITIES, &body).await;
        confirmed(&answer, &body);
        expected.remove(&format!("pdp-identity:dev:User:{id}"));
    }
    let mut left = pdp.keys_on(from).await;
    left.extend(pdp.keys_on(to).await);
    assert!(
        !left.contains("pdp-identity:dev:User:{t}u0")
            && !left.contains("pdp-identity:dev:User:{t}u1"),
        "{left:?}"
    );

    // The migration ends: everything left is where the cluster says, and stays evictable.
    let rest: Vec<String> = pdp
        .keys_on(from)
        .await
        .into_iter()
        .filter(|k| k.contains("{t}"))
        .collect();
    if !rest.is_empty() {
        let mut migrate = vec![
            "MIGRATE",
            "127.0.0.1",
            to_port.as_str(),
            "",
            "0",
            "5000",
            "KEYS",
        ];
        migrate.extend(rest.iter().map(String::as_str));
        cluster.cli(from, &migrate).await;
    }
    // The target learns first, as the Redis Cluster specification orders it.
    let mut ports: Vec<u16> = vec![to, from];
    ports.extend(masters.keys().filter(|p| **p != to && **p != from));
    for port in ports {
        cluster
            .cli(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id])
            .await;
    }
    let answer = stack.post_as("dev", RESPONSES, "{}").await;
    confirmed(&answer, "everything after the migration");
    expected.retain(|k| !k.starts_with("pdp:dev:"));
    assert_eq!(pdp.keys().await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_replica_that_lagged_is_flushed_before_the_next_200() {
    let cluster = RedisCluster::start(3, 1).await;
    let stack = Stack::start().await;
    let _agent = agent_on(&stack, &cluster).await;
    let mut pdp = Pdp::new(&cluster);

    // `DEBUG POPULATE 1 <prefix>` writes `<prefix>:0`; the hash tag picks its slot.
    let prefix = "pdp:dev:s5:{x}u1:h";
    let stale = format!("{prefix}:0");
    let mut keys = responses(&["s0", "s5"], &["u1", "u2", "u3"]);
    keys.push(stale.clone());
    keys.push("apikey:qa:k1".into());
    pdp.set(&keys).await;
    let answer = stack
        .post_as("dev", RESPONSES, r#"{"scopeClientId":"s5"}"#)
        .await;
    confirmed(&answer, "scope s5");
    assert!(!pdp.keys().await.contains(&stale));

    // The replica of the master that held the key gets it back on its own: a replica that
    // had not received the eviction when its master failed.
    let slot = cluster
        .cli(cluster.nodes[0].port(), &["CLUSTER", "KEYSLOT", &stale])
        .await;
    let mut master = None;
    for port in pdp.masters().await {
        let owned = cluster
            .cli(port, &["CLUSTER", "COUNTKEYSINSLOT", slot.trim()])
            .await;
        let nodes = cluster.cli(port, &["CLUSTER", "NODES"]).await;
        let mine = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .unwrap_or_default()
            .to_owned();
        let slot: u16 = slot.trim().parse().expect("a slot");
        let serves = mine.split_whitespace().skip(8).any(|range| {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
        });
        if serves {
            assert_eq!(owned.trim(), "0", "evicted on its master");
            master = Some(port);
        }
    }
    let master = master.expect("a master serves the key's slot");
    let mut replica = None;
    for node in &cluster.nodes {
        let info = cluster.cli(node.port(), &["INFO", "replication"]).await;
        if info.contains("role:slave") && info.contains(&format!("master_port:{master}")) {
            replica = Some(node.port());
        }
    }
    let replica = replica.expect("the master has a replica");
    cluster
        .cli(replica, &["DEBUG", "POPULATE", "1", prefix])
        .await;

    cluster
        .cli(replica, &["CLUSTER", "FAILOVER", "TAKEOVER"])
        .await;
    // Every node sees the replica as a master before the next request.
    let promoted = cluster
        .cli(replica, &["CLUSTER", "MYID"])
        .await
        .trim()
        .to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for node in &cluster.nodes {
        while !master_ids(&cluster, node.port())
            .await
            .values()
            .any(|id| *id == promoted)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the failover did not spread"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    assert!(
        pdp.keys().await.contains(&stale),
        "the new master serves the stale entry"
    );

    // Any request now: the agent sees a master it did not flush and flushes before applying.
    let answer = stack
        .post_as(
            "dev",
            RESPONSES,
            r#"{"scopeClientId":"s0","identityId":"u2"}"#,
        )
        .await;
    confirmed(&answer, "after the failover");
    let left = pdp.keys().await;
    assert!(
        !left.contains(&stale),
        "a 200 after the failover left the stale entry: {left:?}"
    );
    assert!(
        left.contains("apikey:qa:k1"),
        "another environment's key stays: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_migrating_while_a_scope_is_evicted_are_all_gone_after_the_200() {
    let cluster = RedisCluster::start(3, 0).await;
    let stack = Stack::start().await;
    let _agent = agent_on(&stack, &cluster).await;
    let mut pdp = Pdp::new(&cluster);

    // Scope s1 in the slot of `{t}` (which migrates) and elsewhere; scope s2 in the same slot
    // stays.
    let tagged: Vec<String> = (0..1500).map(|n| format!("{{t}}u{n}")).collect();
    let tagged: Vec<&str> = tagged.iter().map(String::as_str).collect();
    let plain: Vec<String> = (0..1500).map(|n| format!("u{n}")).collect();
    let plain: Vec<&str> = plain.iter().map(String::as_str).collect();
    let mut keys = responses(&["s1", "s2"], &tagged);
    keys.extend(responses(&["s1"], &plain));
    pdp.set(&keys).await;

    let Migration {
        slot,
        from,
        to,
        masters,
    } = start_migration(&cluster, &mut pdp).await;

    // The migration moves the slot's keys 20 at a time while the request runs.
    let moved = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let answered = std::sync::Arc::new(tokio::sync::Notify::new());
    let migrator = {
        let (moved, answered) = (moved.clone(), answered.clone());
        let mut conn = pdp.conn(from).await;
        tokio::spawn(async move {
            loop {
                let batch: Vec<String> = redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot_number(&slot))
                    .arg(20)
                    .query_async(&mut conn)
                    .await
                    .expect("GETKEYSINSLOT");
                if batch.is_empty() {
                    return;
                }
                let () = redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(to)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("KEYS")
                    .arg(&batch)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("MIGRATE: {e}"));
                moved.fetch_add(batch.len(), std::sync::atomic::Ordering::SeqCst);
                if tokio::time::timeout(std::time::Duration::ZERO, answered.notified())
                    .await
                    .is_ok()
                {
                    return;
                }
            }
        })
    };
    let answer = stack
        .post_as("dev", RESPONSES, r#"{"scopeClientId":"s1"}"#)
        .await;
    let moved_by_then = moved.load(std::sync::atomic::Ordering::SeqCst);
    answered.notify_one();
    migrator.await.expect("the migration task");
    confirmed(&answer, "scope s1 while its keys migrate");
    assert!(moved_by_then > 0, "the migration ran while the request did");

    let mut left = BTreeSet::new();
    for port in masters.keys() {
        left.extend(pdp.keys_on(*port).await);
    }
    let s1_left: Vec<&String> = left
        .iter()
        .filter(|k| k.starts_with("pdp:dev:s1:"))
        .collect();
    assert!(s1_left.is_empty(), "a 200 left scope s1 keys: {s1_left:?}");
    let s2 = left.iter().filter(|k| k.starts_with("pdp:dev:s2:")).count();
    assert_eq!(s2, tagged.len(), "scope s2 stays, wherever it moved");
}

/// A slot set migrating between two masters.
struct Migration {
    slot: String,
    /// Ports.
    from: u16,
    to: u16,
    /// Every master's node id by port.
    masters: BTreeMap<u16, String>,
}

/// Sets the slot of the hash tag `{t}` migrating from the master that holds its keys to
/// another one (`IMPORTING` on the target, then `MIGRATING` on the source).
async fn start_migration(cluster: &RedisCluster, pdp: &mut Pdp<'_>) -> Migration {
    let slot: String = cluster
        .cli(cluster.nodes[0].port(), &["CLUSTER", "KEYSLOT", "{t}"])
        .await
        .trim()
        .to_owned();
    let masters = master_ids(cluster, cluster.nodes[0].port()).await;
    let mut from = None;
    for port in masters.keys() {
        if pdp.keys_on(*port).await.iter().any(|k| k.contains("{t}")) {
            from = Some(*port);
        }
    }
    let from = from.expect("a master holds the tagged slot");
    let to = *masters
        .keys()
        .find(|p| **p != from)
        .expect("another master");
    cluster
        .cli(
            to,
            &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &masters[&from]],
        )
        .await;
    cluster
        .cli(
            from,
            &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &masters[&to]],
        )
        .await;
    Migration {
        slot,
        from,
        to,
        masters,
    }
}

fn slot_number(slot: &str) -> u16 {
    slot.parse().expect("a slot number")
}
