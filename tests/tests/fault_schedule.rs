//! A seeded fault schedule, checked by looking into the caches themselves
//! (`cachecast_e2e::history` says what correct is).
//!
//! The world: one NATS server, or for every fourth seed a 3-node JetStream cluster with
//! everything replicated three times (`CACHECAST_FAULT_WORLD=single|cluster` chooses); the
//! publisher, restarted at times, and at times a second one;
//! two memory caches in this process, each with its agent behind its own proxy; two Redis
//! caches, each attended by a `cachecast agent` process. The schedule plays the PDP: it fills
//! every cache before each request, and fills the memory caches while requests are in flight
//! (with fill tickets, as a PDP must), so fills race evictions.
//!
//! Every fault kind asked (`CACHECAST_FAULTS=kind,kind`, default all) is injected at least
//! once, in a seeded order, some lasting over the next steps (so faults overlap). A run fails
//! on a violation, and unless it saw a `200`, a `424` and a `503`. It prints the seed; the
//! same `CACHECAST_FAULT_SEED=<seed>` replays the same schedule (`random` draws a new one).
//! Its last line, `fault-schedule-result {json}`, is what `scripts/soak` sums up.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};
use async_nats::jetstream::stream::RawMessageErrorKind;
use cachecast_agent::{AgentConfig, FillTicket};
use cachecast_e2e::history::{self, Contents, Entry, Request, Selector};
use cachecast_e2e::{
    AgentHandle, ChildProcess, EvictionMode, FaultyCache, NatsServer, RedisCache, RedisServer,
    Signal, Stack, TcpProxy, env_id, redis_agent,
};
use cachecast_proto::{ResponseSelector, Target};
use cachecast_publisher::{InvalidationRequest, Outcome, PublishError, Publisher};
use cachecast_testkit::NatsCluster;
use prost::Message;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};

const HEARTBEAT: Duration = Duration::from_millis(250);
const PRESENCE_MAX_AGE: Duration = Duration::from_millis(1500);
/// Short, so that an agent paused past it misses events for good.
const STREAM_MAX_AGE: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_millis(400);
/// How long a healed fleet may take to catch up.
const SETTLE: Duration = Duration::from_secs(30);
const SCOPES: [&str; 3] = ["s0", "s1", "s2"];
/// For probes that must cover whatever the cache holds.
const EVERYTHING: Selector = Selector {
    scope: None,
    identity: None,
};
const IDENTITIES: [&str; 3] = ["i0", "i1", "i2"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// A Redis cache's agent SIGKILLed; a new one starts some steps later.
    AgentKill,
    /// A Redis cache's agent SIGSTOPped, resumed some steps later.
    AgentPause,
    /// A Redis cache's agent stopped with SIGTERM; a new one starts some steps later.
    AgentTerm,
    /// A memory agent's evictions take longer than a request waits.
    SlowEviction,
    /// A memory agent's evictions and flushes fail.
    FailingEviction,
    /// A Redis restarted from a snapshot taken before the last eviction.
    RedisRestart,
    /// The stream deleted (the next publish creates it anew).
    StreamDeleted,
    /// A Redis cache's agent paused past the stream's max age: it missed events for good.
    StreamExpiry,
    /// The publisher replaced by a new one.
    PublisherRestart,
    /// Two publishers invalidating at once.
    TwoPublishers,
    /// nats-server SIGKILLed, a request sent while it is down, then started again.
    NatsKill,
    /// A memory agent's link black-holed: open, silent.
    Partition,
    /// A node of the cluster SIGKILLed (never the one the memory agents' links go to), started
    /// again some steps later. Cluster worlds only.
    NodeLost,
    /// A memory agent's link closed.
    Cut,
    /// A Redis cache's agent paused, and a new process started with its id.
    IdReused,
    /// nats-server frozen while a request is sent, past one publish attempt and within the
    /// publish's whole budget: the publish is retried, and both attempts are stored (events
    /// carry no `Nats-Msg-Id`). Single-server worlds only.
    NatsPause,
}

impl Fault {
    const ALL: [Fault; 16] = [
        Fault::AgentKill,
        Fault::AgentPause,
        Fault::AgentTerm,
        Fault::SlowEviction,
        Fault::FailingEviction,
        Fault::RedisRestart,
        Fault::StreamDeleted,
        Fault::StreamExpiry,
        Fault::PublisherRestart,
        Fault::TwoPublishers,
        Fault::NatsKill,
        Fault::Partition,
        Fault::Cut,
        Fault::IdReused,
        Fault::NodeLost,
        Fault::NatsPause,
    ];

    /// Whether it keeps a cache from applying for a while (so a `424` must come).
    fn hits_a_cache(self) -> bool {
        !matches!(
            self,
            Fault::RedisRestart
                | Fault::StreamDeleted
                | Fault::PublisherRestart
                | Fault::TwoPublishers
                | Fault::NatsKill
                | Fault::NodeLost
                | Fault::NatsPause
        )
    }

    /// Whether the world can take it: a lost node needs a cluster; a paused server is one
    /// process only in a single-server world.
    fn fits(self, clustered: bool) -> bool {
        match self {
            Fault::NodeLost => clustered,
            Fault::NatsPause => !clustered,
            _ => true,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fault::AgentKill => "agent_kill",
            Fault::AgentPause => "agent_pause",
            Fault::AgentTerm => "agent_term",
            Fault::SlowEviction => "slow_eviction",
            Fault::FailingEviction => "failing_eviction",
            Fault::RedisRestart => "redis_restart",
            Fault::StreamDeleted => "stream_deleted",
            Fault::StreamExpiry => "stream_expiry",
            Fault::PublisherRestart => "publisher_restart",
            Fault::TwoPublishers => "two_publishers",
            Fault::NatsKill => "nats_kill",
            Fault::Partition => "partition",
            Fault::Cut => "cut",
            Fault::IdReused => "id_reused",
            Fault::NodeLost => "node_lost",
            Fault::NatsPause => "nats_pause",
        }
    }

    /// `CACHECAST_FAULTS`: `all` or a comma-separated list of names. `all` leaves out what
    /// the world cannot take ([`Fault::fits`]).
    fn asked(clustered: bool) -> Vec<Fault> {
        let asked: Vec<Fault> = match std::env::var("CACHECAST_FAULTS").as_deref() {
            Err(_) | Ok("all") | Ok("") => Self::ALL
                .into_iter()
                .filter(|f| f.fits(clustered))
                .collect(),
            Ok(list) => list
                .split(',')
                .map(|name| {
                    Self::ALL
                        .into_iter()
                        .find(|f| f.name() == name.trim())
                        .unwrap_or_else(|| {
                            let names: Vec<_> = Self::ALL.iter().map(|f| f.name()).collect();
                            panic!("CACHECAST_FAULTS: unknown fault {name:?}; known: {names:?}")
                        })
                })
                .collect(),
        };
        if let Some(unfit) = asked.iter().find(|f| !f.fits(clustered)) {
            panic!(
                "CACHECAST_FAULTS: {} does not fit this world (node_lost needs CACHECAST_FAULT_WORLD=cluster, nats_pause a single server)",
                unfit.name()
            );
        }
        asked
    }
}

/// Whether the world of `seed` runs on a 3-node cluster: every fourth seed, unless
/// `CACHECAST_FAULT_WORLD` says `single` or `cluster`.
fn clustered(seed: u64) -> bool {
    match std::env::var("CACHECAST_FAULT_WORLD").as_deref() {
        Ok("cluster") => true,
        Ok("single") => false,
        Err(_) | Ok("") => seed % 4 == 3,
        Ok(other) => panic!("CACHECAST_FAULT_WORLD is single or cluster, not {other:?}"),
    }
}

/// A fault that lasts until a later step.
#[derive(Debug, Clone, Copy)]
enum Ongoing {
    RedisAgentDown(usize),
    RedisAgentPaused(usize),
    Eviction(usize),
    Link(usize),
    /// A cluster node (index in `World::nodes`) down.
    NodeDown(usize),
}

impl Ongoing {
    /// The Redis slot it holds, if any.
    fn redis_slot(&self) -> Option<usize> {
        match self {
            Ongoing::RedisAgentDown(s) | Ongoing::RedisAgentPaused(s) => Some(*s),
            _ => None,
        }
    }

    /// The memory slot it holds, if any.
    fn memory_slot(&self) -> Option<usize> {
        match self {
            Ongoing::Eviction(s) | Ongoing::Link(s) => Some(*s),
            _ => None,
        }
    }
}

struct MemorySlot {
    id: String,
    proxy: TcpProxy,
    cache: FaultyCache,
    _agent: AgentHandle,
}

struct RedisSlot {
    /// The cache's id, as answers name it.
    cache_id: String,
    agent_id: String,
    server: RedisServer,
    view: RedisCache,
    agent: Option<ChildProcess>,
}

/// Handles to read every cache, cloned out of the world so a read can run right when an answer
/// arrives, while fills are still going on.
#[derive(Clone)]
struct Caches {
    memory: Vec<(String, FaultyCache)>,
    redis: Vec<(String, RedisCache)>,
}

impl Caches {
    /// What every cache serves now (a memory cache whose agent cannot vouch for it serves
    /// nothing, whatever it still holds).
    async fn read(&mut self) -> Contents {
        let mut contents = Contents::new();
        for (id, cache) in &self.memory {
            let served = if cache.cache.is_serving() {
                cache.cache.keys().into_iter().collect()
            } else {
                Default::default()
            };
            contents.insert(id.clone(), served);
        }
        for (id, view) in &mut self.redis {
            contents.insert(id.clone(), view.keys().await.into_iter().collect());
        }
        contents
    }
}

/// A `424` cache that still held what it was asked to evict, waiting to be seen clean.
struct StaleCache {
    request: usize,
    cache: String,
    since: Instant,
}

struct World {
    seed: u64,
    /// How every agent of the schedule takes its events (by seed).
    delivery: Delivery,
    rng: StdRng,
    stack: Stack,
    /// The cluster's other nodes (none for a single server). The memory agents' links go to
    /// the stack's node, which only `NatsKill` takes down.
    nodes: Vec<NatsServer>,
    second_publisher: Option<Publisher>,
    memory: Vec<MemorySlot>,
    redis: Vec<RedisSlot>,
    step: usize,
    /// Requests sent, for their ids.
    sent: u64,
    serial: u64,
    entries: Vec<Entry>,
    /// Answered requests, and `503`s whose event was found in the stream.
    published: Vec<Request>,
    /// `503`s by request id, until found in the stream.
    unavailable: BTreeMap<String, Request>,
    /// Each request's event as first seen in the stream (its id, the stream's creation time
    /// and the sequence): a request is one event, however many times the publisher retried
    /// (a retry may store that event twice).
    seen_at: BTreeMap<String, (String, (i128, u64))>,
    /// Requests whose event was seen at two places (a publish retried after its first attempt
    /// was stored): counted, so a soak shows whether it met any.
    stored_twice: BTreeSet<String>,
    ongoing: Vec<(usize, Ongoing)>,
    /// Each answered request (by index in `published`) and the caches its answer named failed.
    vouched: Vec<(usize, BTreeSet<String>)>,
    /// Stale entries already reported: (step, cache, key).
    reported: BTreeSet<(usize, String, String)>,
    /// Probes that found nothing to check (the cache held nothing they covered).
    vacuous: usize,
    stale: Vec<StaleCache>,
    windows: Vec<Duration>,
    answers: BTreeMap<&'static str, usize>,
    faults: BTreeMap<&'static str, usize>,
    violations: Vec<String>,
}

/// How the agents of a schedule take their events: every three seeds cover all three.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    /// `agent.live_events`: the stream's live copies, a consumer to catch up.
    live_events: bool,
    /// `agent.fast_path`: each event as published too.
    fast_path: bool,
}

impl Delivery {
    fn of(seed: u64) -> Self {
        match seed % 3 {
            0 => Self {
                live_events: true,
                fast_path: false,
            },
            1 => Self {
                live_events: true,
                fast_path: true,
            },
            _ => Self {
                live_events: false,
                fast_path: false,
            },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_schedule_keeps_every_promise() {
    let seed = match std::env::var("CACHECAST_FAULT_SEED").as_deref() {
        Ok("random") => rand::rng().random::<u64>(),
        Ok(value) => value
            .parse()
            .expect("CACHECAST_FAULT_SEED is a number or `random`"),
        Err(_) => 20261130,
    };
    let clustered = clustered(seed);
    let asked = Fault::asked(clustered);
    let world_kind = if clustered {
        "a 3-node cluster"
    } else {
        "one server"
    };
    eprintln!(
        "fault schedule: seed {seed} (CACHECAST_FAULT_SEED={seed} replays it), on {world_kind}, agents taking events as {:?}",
        Delivery::of(seed)
    );
    let mut world = World::start(seed, clustered).await;
    let mut plan = asked.clone();
    plan.shuffle(&mut world.rng);
    for fault in plan {
        if world.rng.random_bool(0.3) {
            world.step(None).await;
        }
        world.step(Some(fault)).await;
    }
    world.heal().await;
    world.settle().await;
    world.finish(&asked);
}

impl World {
    async fn start(seed: u64, clustered: bool) -> World {
        cachecast_e2e::init_logs();
        let (nats, nodes, urls) = if clustered {
            let mut cluster = formed_cluster().await;
            let urls = cluster.urls();
            let first = cluster.nodes.remove(0);
            (first, cluster.nodes, Some(urls))
        } else {
            (cachecast_testkit::nats().await, Vec::new(), None)
        };
        let replicas = if clustered { 3 } else { 1 };
        let stack = Stack::builder()
            .nats(nats)
            .bus(|bus| {
                if let Some(urls) = urls {
                    bus.nats.url = urls;
                }
                bus.stream.replicas = replicas;
                bus.presence.replicas = replicas;
                bus.caches.replicas = replicas;
                bus.presence.max_age = PRESENCE_MAX_AGE;
                bus.stream.max_age = STREAM_MAX_AGE;
            })
            .start()
            .await;
        let delivery = Delivery::of(seed);
        let config = AgentConfig {
            heartbeat: HEARTBEAT,
            fast_path: delivery.fast_path,
            live_events: delivery.live_events,
            ..AgentConfig::default()
        };
        let mut memory = Vec::new();
        for n in 0..2 {
            let id = format!("m{n}");
            let proxy = TcpProxy::start(stack.nats.port()).await;
            let cache = FaultyCache::default();
            let agent = stack
                .agent_builder("dev", &id)
                .via(&proxy.nats_url())
                .config(config.clone())
                .start(cache.clone())
                .await;
            memory.push(MemorySlot {
                id,
                proxy,
                cache,
                _agent: agent,
            });
        }
        let mut redis = Vec::new();
        for n in 0..2 {
            let server = RedisServer::start().await;
            let view = RedisCache::open(&server.url()).await;
            redis.push(RedisSlot {
                cache_id: format!("r{n}"),
                agent_id: format!("ra{n}"),
                server,
                view,
                agent: None,
            });
        }
        let mut world = World {
            seed,
            delivery,
            rng: StdRng::seed_from_u64(seed),
            stack,
            nodes,
            second_publisher: None,
            memory,
            redis,
            step: 0,
            sent: 0,
            serial: 0,
            entries: Vec::new(),
            published: Vec::new(),
            unavailable: BTreeMap::new(),
            seen_at: BTreeMap::new(),
            stored_twice: BTreeSet::new(),
            ongoing: Vec::new(),
            vouched: Vec::new(),
            reported: BTreeSet::new(),
            vacuous: 0,
            stale: Vec::new(),
            windows: Vec::new(),
            answers: BTreeMap::new(),
            faults: BTreeMap::new(),
            violations: Vec::new(),
        };
        for slot in 0..world.redis.len() {
            world.start_redis_agent(slot).await;
        }
        world.stack.wait_for_agents("dev", 4).await;
        world
    }

    /// One step: faults due to end end, the caches are filled, `fault` begins, and requests go.
    async fn step(&mut self, fault: Option<Fault>) {
        self.step += 1;
        let due: Vec<Ongoing> = self
            .ongoing
            .extract_if(.., |(until, _)| *until <= self.step)
            .map(|(_, o)| o)
            .collect();
        for ongoing in due {
            self.end(ongoing).await;
        }
        if !self.unavailable.is_empty() {
            self.find_published().await;
        }
        self.fill().await;
        eprintln!("step {}: {fault:?}", self.step);
        match fault {
            Some(fault) => {
                self.inject(fault).await;
                *self.faults.entry(fault.name()).or_default() += 1;
            }
            None => {
                self.request().await;
            }
        }
        self.watch_stale().await;
    }

    async fn inject(&mut self, fault: Fault) {
        let lasts = self.step + self.rng.random_range(1..=3);
        match fault {
            Fault::AgentKill | Fault::AgentTerm => {
                let slot = self.free_redis_slot().await;
                let agent = self.redis[slot].agent.as_mut().expect("running");
                if fault == Fault::AgentKill {
                    agent.kill().await;
                } else {
                    agent.signal(Signal::SIGTERM);
                    let exit = agent.wait_exit(Duration::from_secs(10)).await;
                    assert!(
                        exit.is_some(),
                        "seed {}: SIGTERM did not stop the agent",
                        self.seed
                    );
                }
                self.redis[slot].agent = None;
                self.ongoing.push((lasts, Ongoing::RedisAgentDown(slot)));
                self.request().await;
            }
            Fault::AgentPause => {
                let slot = self.free_redis_slot().await;
                self.redis[slot]
                    .agent
                    .as_ref()
                    .expect("running")
                    .signal(Signal::SIGSTOP);
                self.ongoing.push((lasts, Ongoing::RedisAgentPaused(slot)));
                self.request().await;
            }
            Fault::StreamExpiry => {
                let slot = self.free_redis_slot().await;
                let agent = self.redis[slot].agent.as_ref().expect("running");
                agent.signal(Signal::SIGSTOP);
                let paused = Instant::now();
                self.request().await;
                // The fault is the length of the pause: past the stream's max age.
                tokio::time::sleep(
                    (STREAM_MAX_AGE + HEARTBEAT * 2).saturating_sub(paused.elapsed()),
                )
                .await;
                self.request().await;
                self.redis[slot]
                    .agent
                    .as_ref()
                    .expect("running")
                    .signal(Signal::SIGCONT);
            }
            Fault::IdReused => {
                let slot = self.free_redis_slot().await;
                let old = self.redis[slot].agent.take().expect("running");
                old.signal(Signal::SIGSTOP);
                self.start_redis_agent(slot).await;
                old.signal(Signal::SIGCONT);
                let mut old = old;
                let exit = old.wait_exit(Duration::from_secs(10)).await;
                if exit.is_none_or(|status| status.success()) {
                    self.violation(format!(
                        "the agent taken over while paused did not exit with an error ({exit:?}): {}",
                        old.output()
                    ));
                }
                self.request().await;
            }
            Fault::RedisRestart => {
                let slot = self.free_redis_slot().await;
                self.redis[slot].view.save().await;
                self.request_for(EVERYTHING).await;
                let redis = &mut self.redis[slot];
                redis.server.start_again().await;
                redis.view = RedisCache::open(&redis.server.url()).await;
                // It serves what the request evicted again, and no event may come for hours:
                // its agent must notice by itself.
                let (cache, restarted) = (redis.cache_id.clone(), Instant::now());
                let mut first = true;
                loop {
                    let contents = self.contents().await;
                    let held = self.published.iter().any(|r| {
                        history::stale(r, &self.entries, &contents).any(|e| e.cache == cache)
                    });
                    if !held {
                        if first {
                            self.vacuous += 1; // the snapshot brought nothing evicted back
                        } else {
                            self.windows.push(restarted.elapsed());
                        }
                        break;
                    }
                    first = false;
                    if restarted.elapsed() > HEARTBEAT * 40 {
                        self.violation(format!(
                            "step {}: {cache}, restarted from a snapshot, still serves invalidated entries after {:?} with no event",
                            self.step,
                            restarted.elapsed()
                        ));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Fault::SlowEviction | Fault::FailingEviction => {
                let slot = self.free_memory_slot().await;
                self.memory[slot]
                    .cache
                    .set_mode(if fault == Fault::SlowEviction {
                        EvictionMode::Slow(REQUEST_TIMEOUT + Duration::from_millis(400))
                    } else {
                        EvictionMode::Failing
                    });
                self.ongoing.push((lasts, Ongoing::Eviction(slot)));
                self.request().await;
            }
            Fault::Partition | Fault::Cut => {
                let slot = self.free_memory_slot().await;
                let proxy = &self.memory[slot].proxy;
                if fault == Fault::Partition {
                    proxy.black_hole();
                } else {
                    proxy.cut();
                }
                self.ongoing.push((lasts, Ongoing::Link(slot)));
                self.request().await;
                // The dangerous moment: publishers stop expecting it, and answer without it.
                let id = env_id("dev");
                let agent = self.memory[slot].id.clone();
                let gone = Instant::now() + SETTLE;
                while self
                    .stack
                    .publisher
                    .live_agents(&id)
                    .iter()
                    .any(|a| a.id.as_str() == agent)
                {
                    assert!(
                        Instant::now() < gone,
                        "seed {}: the publisher still expects {agent}",
                        self.seed
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                self.request_for(EVERYTHING).await;
            }
            Fault::StreamDeleted => {
                // Every 503 looked up first: the deletion takes the evidence along.
                self.find_all_published().await;
                let js = async_nats::jetstream::new(self.observer().await);
                let name = self.stack.bus.stream.name.clone();
                // A busy cluster may time out: ask again (a deletion already done answers
                // "not found").
                let deadline = Instant::now() + SETTLE;
                loop {
                    match js.delete_stream(&name).await {
                        Ok(_) => break,
                        Err(err) if stream_not_found(&err) => break,
                        Err(err) => assert!(
                            Instant::now() < deadline,
                            "seed {}: could not delete the stream: {err}",
                            self.seed
                        ),
                    }
                }
                // A publish creates it anew (until then, an agent that starts waits for it).
                let deadline = Instant::now() + SETTLE;
                loop {
                    self.request().await;
                    if js.get_stream(&name).await.is_ok() {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "seed {}: the stream was not created again",
                        self.seed
                    );
                }
            }
            Fault::PublisherRestart => {
                self.stack.publisher = self.new_publisher("restarted-publisher").await;
                self.request().await;
            }
            Fault::TwoPublishers => {
                if self.second_publisher.is_none() {
                    self.second_publisher = Some(self.new_publisher("second-publisher").await);
                }
                let second = self.second_publisher.clone().expect("started");
                let (a, b) = (self.draw_request(), self.draw_request());
                let first = self.stack.publisher.clone();
                let (ra, rb) = tokio::join!(
                    send(&first, &a, REQUEST_TIMEOUT, self.caches()),
                    send(&second, &b, REQUEST_TIMEOUT, self.caches())
                );
                self.answered(a, ra).await;
                self.answered(b, rb).await;
            }
            Fault::NatsKill => {
                // Every node: the bus is gone.
                self.end_where(|o| matches!(o, Ongoing::NodeDown(_))).await;
                self.stack.nats.kill().await;
                for node in &mut self.nodes {
                    node.kill().await;
                }
                self.request().await;
                let seed = self.seed;
                let starts = std::iter::once(&mut self.stack.nats)
                    .chain(self.nodes.iter_mut())
                    .map(|node| node.start_again());
                for started in futures::future::join_all(starts).await {
                    if let Err(err) = started {
                        panic!("seed {seed}: nats-server did not start again: {err}");
                    }
                }
            }
            Fault::NatsPause => {
                // Past one attempt (half of `nats.request_timeout`, 500 ms) and within the
                // publish's budget (1 s): the first attempt is stored when the server goes on,
                // and so is the retry. The request waits for acks past the pause, so a `200`
                // can vouch for the event stored twice.
                let paused = self.stack.nats.pause_held().expect("pause nats-server");
                let resume = async move {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    paused.resume()
                };
                let selector = self.draw_selector();
                let (resumed, _) = tokio::join!(
                    resume,
                    self.request_within(selector, Duration::from_secs(2))
                );
                if let Err(err) = resumed {
                    panic!("seed {}: nats-server did not go on: {err}", self.seed);
                }
            }
            Fault::NodeLost => {
                // One at a time: the cluster keeps its quorum.
                self.end_where(|o| matches!(o, Ongoing::NodeDown(_))).await;
                let node = self.rng.random_range(0..self.nodes.len());
                self.nodes[node].kill().await;
                self.ongoing.push((lasts, Ongoing::NodeDown(node)));
                self.request().await;
            }
        }
    }

    async fn end(&mut self, ongoing: Ongoing) {
        match ongoing {
            Ongoing::RedisAgentDown(slot) => self.start_redis_agent(slot).await,
            Ongoing::RedisAgentPaused(slot) => {
                self.redis[slot]
                    .agent
                    .as_ref()
                    .expect("running")
                    .signal(Signal::SIGCONT);
            }
            Ongoing::Eviction(slot) => self.memory[slot].cache.set_mode(EvictionMode::Normal),
            Ongoing::Link(slot) => self.memory[slot].proxy.restore(),
            Ongoing::NodeDown(node) => {
                if let Err(err) = self.nodes[node].start_again().await {
                    panic!(
                        "seed {}: cluster node {node} did not start again: {err}",
                        self.seed
                    );
                }
            }
        }
    }

    /// Ends the ongoing faults that `which` picks now.
    async fn end_where(&mut self, which: fn(&Ongoing) -> bool) {
        let due: Vec<Ongoing> = self
            .ongoing
            .extract_if(.., |(_, o)| which(o))
            .map(|(_, o)| o)
            .collect();
        for ongoing in due {
            self.end(ongoing).await;
        }
    }

    /// A Redis slot no ongoing fault holds, ending the oldest fault if all are held.
    async fn free_redis_slot(&mut self) -> usize {
        self.free_slot(self.redis.len(), Ongoing::redis_slot).await
    }

    /// Like [`World::free_redis_slot`], for the memory caches.
    async fn free_memory_slot(&mut self) -> usize {
        self.free_slot(self.memory.len(), Ongoing::memory_slot)
            .await
    }

    async fn free_slot(&mut self, slots: usize, holds: fn(&Ongoing) -> Option<usize>) -> usize {
        loop {
            let held: BTreeSet<usize> = self.ongoing.iter().filter_map(|(_, o)| holds(o)).collect();
            let free: Vec<usize> = (0..slots).filter(|s| !held.contains(s)).collect();
            if !free.is_empty() {
                return free[self.rng.random_range(0..free.len())];
            }
            let at = self
                .ongoing
                .iter()
                .position(|(_, o)| holds(o).is_some())
                .expect("a held slot has its fault");
            let (_, ongoing) = self.ongoing.remove(at);
            self.end(ongoing).await;
        }
    }

    async fn start_redis_agent(&mut self, slot: usize) {
        let heartbeat = format!("{}ms", HEARTBEAT.as_millis());
        let presence = format!("{}ms", PRESENCE_MAX_AGE.as_millis());
        let stream = format!("{}ms", STREAM_MAX_AGE.as_millis());
        let replicas = self.stack.bus.stream.replicas.to_string();
        let fast_path = self.delivery.fast_path.to_string();
        let live_events = self.delivery.live_events.to_string();
        let redis = &mut self.redis[slot];
        let agent = redis_agent(
            &self.stack.bus.nats.url,
            &redis.server.url(),
            &redis.agent_id,
            &["--cache-id", &redis.cache_id, "--heartbeat", &heartbeat],
            &[
                ("CACHECAST_PRESENCE__MAX_AGE", &presence),
                ("CACHECAST_STREAM__MAX_AGE", &stream),
                ("CACHECAST_STREAM__REPLICAS", &replicas),
                ("CACHECAST_PRESENCE__REPLICAS", &replicas),
                ("CACHECAST_CACHES__REPLICAS", &replicas),
                ("CACHECAST_AGENT__FAST_PATH", &fast_path),
                ("CACHECAST_AGENT__LIVE_EVENTS", &live_events),
            ],
        )
        .await;
        redis.agent = Some(agent);
    }

    /// A new publisher; its start is retried for a minute, as a restarted `serve` would be (a
    /// cluster that just lost a node may not answer its first JetStream requests in time).
    async fn new_publisher(&self, name: &str) -> Publisher {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let client = cachecast_bus::connect(&self.stack.bus.nats, name)
                .await
                .expect("publisher's NATS client");
            match Publisher::start(client, &self.stack.bus).await {
                Ok(publisher) => return publisher,
                Err(err) => {
                    assert!(
                        Instant::now() < deadline,
                        "seed {}: no publisher started within a minute: {err}",
                        self.seed
                    );
                    eprintln!("a publisher did not start ({err}); starting it again");
                }
            }
        }
    }

    async fn observer(&self) -> async_nats::Client {
        cachecast_bus::connect(&self.stack.bus.nats, "observer")
            .await
            .expect("observer's NATS client")
    }

    /// The PDP caches a few decisions in every cache, each under a key of its own.
    async fn fill(&mut self) {
        for slot in 0..self.memory.len() {
            for _ in 0..3 {
                let (ticket, written, key, scope, identity) = self.ticket(slot);
                let cache = &self.memory[slot].cache.cache;
                if cache.insert_if_current(ticket, &key, &scope, &identity, "permit".into()) {
                    self.record(&self.memory[slot].id.clone(), key, scope, identity, written);
                }
            }
        }
        for slot in 0..self.redis.len() {
            let drawn: Vec<(String, String, String)> = (0..3).map(|_| self.draw_key()).collect();
            let keys: Vec<&str> = drawn.iter().map(|(k, _, _)| k.as_str()).collect();
            self.redis[slot].view.set(&keys).await;
            let written = Instant::now();
            let cache = self.redis[slot].cache_id.clone();
            for (key, scope, identity) in drawn {
                self.record(&cache, key, scope, identity, written);
            }
        }
    }

    fn draw_key(&mut self) -> (String, String, String) {
        self.serial += 1;
        let scope = SCOPES[self.rng.random_range(0..SCOPES.len())].to_string();
        let identity = IDENTITIES[self.rng.random_range(0..IDENTITIES.len())].to_string();
        let key = format!("pdp:dev:{scope}:{identity}:{}", self.serial);
        (key, scope, identity)
    }

    /// A fill ticket for memory cache `slot`, taken now, and the key it is for.
    fn ticket(&mut self, slot: usize) -> (FillTicket, Instant, String, String, String) {
        let (key, scope, identity) = self.draw_key();
        let ticket = self.memory[slot].cache.cache.ticket();
        (ticket, Instant::now(), key, scope, identity)
    }

    fn record(
        &mut self,
        cache: &str,
        key: String,
        scope: String,
        identity: String,
        written: Instant,
    ) {
        self.entries.push(Entry {
            cache: cache.to_owned(),
            key,
            scope,
            identity,
            written,
        });
    }

    fn draw_request(&mut self) -> Request {
        let selector = self.draw_selector();
        self.new_request(selector)
    }

    fn new_request(&mut self, selector: Selector) -> Request {
        self.sent += 1;
        Request {
            id: format!("seed{}-request{}", self.seed, self.sent),
            step: self.step,
            selector,
            sent: Instant::now(),
        }
    }

    fn draw_selector(&mut self) -> Selector {
        let scope = Some(SCOPES[self.rng.random_range(0..SCOPES.len())].to_string());
        let identity = Some(IDENTITIES[self.rng.random_range(0..IDENTITIES.len())].to_string());
        match self.rng.random_range(0..10) {
            0..5 => Selector {
                scope,
                identity: None,
            },
            5..7 => Selector {
                scope: None,
                identity,
            },
            7..9 => Selector { scope, identity },
            _ => EVERYTHING,
        }
    }

    /// One request through the publisher, while the PDP fills the memory caches; what it
    /// answered.
    async fn request(&mut self) -> String {
        let selector = self.draw_selector();
        self.request_for(selector).await
    }

    /// Like [`World::request`], for `selector`.
    async fn request_for(&mut self, selector: Selector) -> String {
        self.request_within(selector, REQUEST_TIMEOUT).await
    }

    /// Like [`World::request_for`], waiting for acks until `timeout`.
    async fn request_within(&mut self, selector: Selector, timeout: Duration) -> String {
        let racing: Vec<_> = (0..self.memory.len())
            .flat_map(|slot| [slot, slot])
            .map(|slot| (slot, self.ticket(slot), self.rng.random_range(0..40)))
            .collect();
        let request = self.new_request(selector);
        let publisher = self.stack.publisher.clone();
        let looker = self.caches();
        let caches: Vec<FaultyCache> = self.memory.iter().map(|m| m.cache.clone()).collect();
        let fills = async {
            let mut kept = Vec::new();
            for (slot, (ticket, written, key, scope, identity), delay) in racing {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                if caches[slot].cache.insert_if_current(
                    ticket,
                    &key,
                    &scope,
                    &identity,
                    "permit".into(),
                ) {
                    kept.push((slot, written, key, scope, identity));
                }
            }
            kept
        };
        let (answer, kept) = tokio::join!(send(&publisher, &request, timeout, looker), fills);
        for (slot, written, key, scope, identity) in kept {
            self.record(&self.memory[slot].id.clone(), key, scope, identity, written);
        }
        self.answered(request, answer).await
    }

    /// Checks an answer against the caches' contents; what it answered.
    async fn answered(
        &mut self,
        request: Request,
        (result, seen): (Result<Outcome, PublishError>, Contents),
    ) -> String {
        let sent = format!(
            "step {}: {} {:?}",
            request.step, request.id, request.selector
        );
        let answer = self.check_answer(request, result, seen).await;
        eprintln!("{sent}: {answer}");
        answer
    }

    /// `seen` is what the caches held the moment the answer came; they are read again after the
    /// fills that raced the request (a fill the cache should have refused shows there).
    async fn check_answer(
        &mut self,
        request: Request,
        result: Result<Outcome, PublishError>,
        seen: Contents,
    ) -> String {
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(err @ PublishError::Unavailable(_)) => {
                *self.answers.entry("503").or_default() += 1;
                self.unavailable.insert(request.id.clone(), request);
                return format!("503: {err}");
            }
            Err(err) => {
                self.violation(format!("step {}: not an answer: {err}", request.step));
                return err.to_string();
            }
        };
        *self
            .answers
            .entry(if outcome.confirmed() { "200" } else { "424" })
            .or_default() += 1;
        let named: BTreeSet<String> = outcome.failures().map(|(id, _)| id.to_string()).collect();
        let caches = self.cache_names();
        for unknown in history::unknown_names(&named, &caches) {
            self.violation(format!(
                "step {}: the answer names {unknown}, no cache",
                request.step
            ));
        }
        let contents = self.contents().await;
        for held in [&seen, &contents] {
            for violation in history::stale_after_answer(&request, &named, &self.entries, held) {
                self.report(violation);
            }
        }
        let index = self.published.len();
        self.vouched.push((index, named.clone()));
        for cache in &named {
            if history::stale(&request, &self.entries, &contents).any(|e| &e.cache == cache) {
                self.stale.push(StaleCache {
                    request: index,
                    cache: cache.clone(),
                    since: Instant::now(),
                });
            }
        }
        self.published.push(request);
        let failures: Vec<String> = outcome
            .failures()
            .map(|(id, o)| format!("{id}: {}", o.reason().unwrap_or_default()))
            .collect();
        format!("{failures:?}")
    }

    fn cache_names(&self) -> BTreeSet<String> {
        let memory = self.memory.iter().map(|m| m.id.clone());
        memory
            .chain(self.redis.iter().map(|r| r.cache_id.clone()))
            .collect()
    }

    fn caches(&self) -> Caches {
        Caches {
            memory: self
                .memory
                .iter()
                .map(|m| (m.id.clone(), m.cache.clone()))
                .collect(),
            redis: self
                .redis
                .iter()
                .map(|r| (r.cache_id.clone(), r.view.clone()))
                .collect(),
        }
    }

    /// What every cache holds now.
    async fn contents(&mut self) -> Contents {
        self.caches().read().await
    }

    /// Notes when a cache a `424` named is seen holding nothing of that request any more.
    /// Also holds every answer to its word again: an entry an answer vouched for must not come
    /// back (a Redis restarted from a snapshot is waited on where it restarts).
    async fn watch_stale(&mut self) {
        let contents = self.contents().await;
        let mut found = Vec::new();
        for (index, named) in &self.vouched {
            let request = &self.published[*index];
            found.extend(history::stale_after_answer(
                request,
                named,
                &self.entries,
                &contents,
            ));
        }
        for violation in found {
            self.report(violation);
        }
        let (published, entries) = (&self.published, &self.entries);
        let windows = &mut self.windows;
        self.stale.retain(|s| {
            let held = history::stale(&published[s.request], entries, &contents)
                .any(|e| e.cache == s.cache);
            if !held {
                windows.push(s.since.elapsed());
            }
            held
        });
    }

    /// The request ids of every event in the stream now: a `503` whose event is there was
    /// published after all, and must be applied like any other.
    /// Looks up the unresolved `503`s in the stream; false when the stream could not be read
    /// through (a busy cluster timing out), so some may be left to look up.
    async fn find_published(&mut self) -> bool {
        let js = async_nats::jetstream::new(self.observer().await);
        let mut stream = match js.get_stream(&self.stack.bus.stream.name).await {
            Ok(stream) => stream,
            // Deleted, and nothing published since.
            Err(err) if stream_not_found(&err) => return true,
            Err(_) => return false,
        };
        let Ok(info) = stream.info().await else {
            return false;
        };
        let (state, created) = (info.state.clone(), info.created.unix_timestamp_nanos());
        let mut read_through = true;
        // An empty stream says first 0, last 0: there is no message 0 to ask for.
        for sequence in state.first_sequence.max(1)..=state.last_sequence {
            let message = match stream.get_raw_message(sequence).await {
                Ok(message) => message,
                // Expired or deleted since the info: nothing to find there.
                Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => continue,
                Err(_) => {
                    read_through = false;
                    continue;
                }
            };
            let Ok(event) = cachecast_proto::Invalidation::decode(message.payload) else {
                continue;
            };
            let at = (created, sequence);
            let (first_event, first_at) = self
                .seen_at
                .entry(event.request_id.clone())
                .or_insert_with(|| (event.event_id.clone(), at))
                .clone();
            if first_event == event.event_id && first_at != at {
                self.stored_twice.insert(event.request_id.clone());
            }
            if first_event != event.event_id {
                self.violation(format!(
                    "step {}: request {} is two events in the stream: {first_event} (stream created {}, sequence {}) and {} at {at:?}",
                    self.step, event.request_id, first_at.0, first_at.1, event.event_id
                ));
            }
            if let Some(request) = self.unavailable.remove(&event.request_id) {
                self.published.push(request);
            }
        }
        read_through
    }

    /// [`World::find_published`] until it reads the stream through; a fleet that cannot be
    /// asked within [`SETTLE`] is a violation (its `503`s would go unchecked).
    async fn find_all_published(&mut self) {
        let deadline = Instant::now() + SETTLE;
        while !self.find_published().await {
            if Instant::now() > deadline {
                self.violation(format!(
                    "step {}: the stream could not be read through for {SETTLE:?}",
                    self.step
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Ends every fault and brings every agent back.
    async fn heal(&mut self) {
        for (_, ongoing) in std::mem::take(&mut self.ongoing) {
            self.end(ongoing).await;
        }
        for slot in 0..self.redis.len() {
            if self.redis[slot].agent.is_none() {
                self.start_redis_agent(slot).await;
            }
        }
        let live = self
            .stack
            .publisher
            .wait_for_live_agents(&env_id("dev"), 4, SETTLE)
            .await;
        if !live {
            self.violation(format!(
                "after healing, the publisher does not see 4 live agents: {:?}",
                self.stack.publisher.live_agents(&env_id("dev"))
            ));
        }
    }

    /// Every cache applies every published event or flushes after it; then a request is `200`.
    async fn settle(&mut self) {
        self.find_all_published().await;
        let deadline = Instant::now() + SETTLE;
        loop {
            let contents = self.contents().await;
            let left: Vec<String> = self
                .published
                .iter()
                .flat_map(|r| history::stale(r, &self.entries, &contents).map(move |e| (r.step, e)))
                .map(|(step, e)| format!("step {step}: {} still holds {}", e.cache, e.key))
                .collect();
            self.watch_stale().await;
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                self.violation(format!(
                    "healed for {SETTLE:?}, the caches still hold invalidated entries: {left:?}"
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A healed fleet answers `200` again; a `503` says to retry shortly (a publisher
        // reads its view again after a reconnect), so the caller retries.
        let deadline = Instant::now() + SETTLE;
        loop {
            self.step += 1;
            self.fill().await;
            let confirmed = self.answers.get("200").copied().unwrap_or(0);
            let answer = self.request().await;
            if self.answers.get("200").copied().unwrap_or(0) > confirmed {
                return;
            }
            if Instant::now() > deadline {
                self.violation(format!("a healed fleet did not answer 200: {answer}"));
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Reports a stale entry once, however many reads find it.
    fn report(&mut self, violation: history::Violation) {
        let key = (
            violation.step,
            violation.cache.clone(),
            violation.key.clone(),
        );
        if self.reported.insert(key) {
            self.violation(violation.to_string());
        }
    }

    fn violation(&mut self, what: String) {
        eprintln!("seed {}: VIOLATION {what}", self.seed);
        self.violations.push(what);
    }

    /// Prints the result line; fails on a violation, or when a kind of answer or fault is missing.
    fn finish(mut self, asked: &[Fault]) {
        // A `503` comes from a server down, a `424` from a cache that cannot apply.
        let mut expected = vec!["200"];
        if asked.contains(&Fault::NatsKill) {
            expected.push("503");
        }
        if asked.iter().any(|f| f.hits_a_cache()) {
            expected.push("424");
        }
        for answer in expected {
            if !self.answers.contains_key(answer) {
                self.violation(format!("no {answer} in the whole schedule"));
            }
        }
        for fault in asked {
            if !self.faults.contains_key(fault.name()) {
                self.violation(format!("fault {} was asked and not injected", fault.name()));
            }
        }
        let result = serde_json::json!({
            "seed": self.seed,
            "world": if self.nodes.is_empty() { "single" } else { "cluster" },
            "steps": self.step,
            "violations": self.violations,
            "answers": self.answers,
            "faults": self.faults,
            "vacuous_probes": self.vacuous,
            "stored_twice": self.stored_twice.len(),
            "stale_windows_ms": self.windows.iter().map(|w| w.as_millis() as u64).collect::<Vec<_>>(),
        });
        println!("fault-schedule-result {result}");
        assert!(
            self.violations.is_empty(),
            "seed {}: {} violation(s), replay with CACHECAST_FAULT_SEED={}: {:#?}",
            self.seed,
            self.violations.len(),
            self.seed,
            self.violations
        );
    }
}

/// Sends `request`, and reads every cache the moment the answer is in.
async fn send(
    publisher: &Publisher,
    request: &Request,
    timeout: Duration,
    mut caches: Caches,
) -> (Result<Outcome, PublishError>, Contents) {
    let result = publisher
        .invalidate(InvalidationRequest {
            env: env_id("dev"),
            target: Target::Response(ResponseSelector {
                scope_client_ids: request.selector.scope.iter().cloned().collect(),
                identity_id: request.selector.identity.clone(),
            }),
            request_id: request.id.clone(),
            timeout,
            caller: None,
        })
        .await;
    (result, caches.read().await)
}

/// A 3-node cluster that can hold a stream replicated three times. Under a loaded machine its
/// nodes sometimes never elect JetStream leaders (soak seed 587): such a cluster is stopped and
/// another one started, three tries in all.
async fn formed_cluster() -> NatsCluster {
    let mut last = String::new();
    for _ in 0..3 {
        let cluster = NatsCluster::start(3).await;
        match jetstream_ready(&cluster.urls()).await {
            Ok(()) => return cluster,
            Err(err) => {
                eprintln!("a new cluster did not form JetStream, starting another: {err}");
                last = err;
            }
        }
    }
    panic!("three clusters could not hold a replicated stream within a minute each: {last}");
}

/// Waits (at most a minute) until the cluster at `urls` can hold a stream replicated three
/// times: its nodes elect their JetStream leaders after they are up.
async fn jetstream_ready(urls: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut bus = cachecast_bus::BusConfig::default();
    bus.nats.url = urls.to_owned();
    let client = cachecast_bus::connect(&bus.nats, "cluster-probe")
        .await
        .map_err(|err| format!("no client of the cluster: {err}"))?;
    let js = async_nats::jetstream::new(client);
    let probe = async_nats::jetstream::stream::Config {
        name: "CLUSTER_READY".into(),
        subjects: vec!["cluster-ready".into()],
        num_replicas: 3,
        ..Default::default()
    };
    loop {
        match js.create_stream(probe.clone()).await {
            Ok(_) => break,
            Err(err) if Instant::now() >= deadline => return Err(err.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    js.delete_stream("CLUSTER_READY").await.ok();
    Ok(())
}

/// Whether JetStream answered that the stream does not exist.
fn stream_not_found(err: &GetStreamError) -> bool {
    matches!(err.kind(), GetStreamErrorKind::JetStream(e)
        if e.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND)
}
