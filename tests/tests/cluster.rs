//! A 3-node JetStream cluster with the stream and the presence bucket replicated three times:
//! invalidations at a steady rate while one node is killed and restarted and then another is
//! paused. Every answer comes in bounded time; a `200` is backed by every agent's ack; every
//! event that was published reaches every agent in the end (applied, or covered by a flush).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cachecast_agent::AgentConfig;
use cachecast_bus::BusConfig;
use cachecast_e2e::{AgentHandle, Recorder, env_id, eventually, start_agent, start_publisher};
use cachecast_proto::{ResponseSelector, Target};
use cachecast_publisher::{InvalidationRequest, PublishError};
use cachecast_testkit::NatsCluster;

/// Two running agents `agent-0` and `agent-1` of `env`, recording what they apply.
async fn start_agents(bus: &BusConfig, env: &str) -> (Vec<Recorder>, Vec<AgentHandle>) {
    let mut recorders = Vec::new();
    let mut agents = Vec::new();
    for n in 0..2 {
        let recorder = Recorder::default();
        let id = format!("agent-{n}");
        agents.push(start_agent(bus, env, &id, AgentConfig::default(), recorder.clone()).await);
        recorders.push(recorder);
    }
    (recorders, agents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_survive_losing_one_node_at_a_time() {
    let mut cluster = NatsCluster::start(3).await;
    let mut bus = BusConfig::default();
    bus.nats.url = cluster.urls();
    bus.stream.replicas = 3;
    bus.presence.replicas = 3;
    let publisher = start_publisher(&bus, "cluster-publisher").await;
    let env = env_id("dev");
    let (recorders, agents) = start_agents(&bus, "dev").await;
    assert!(
        publisher
            .wait_for_live_agents(&env, 2, Duration::from_secs(30))
            .await
    );

    let timeout = Duration::from_secs(2);
    let mut published = BTreeSet::new();
    let mut confirmed = 0;
    for i in 0..60 {
        match i {
            10 => cluster.nodes[0].kill().await,
            25 => cluster.nodes[0]
                .start_again()
                .await
                .expect("node 0 restarts"),
            35 => cluster.nodes[1].pause().expect("pause node 1"),
            50 => cluster.nodes[1].resume().expect("resume node 1"),
            _ => {}
        }
        let scope = format!("e{i}");
        let started = Instant::now();
        let result = publisher
            .invalidate(InvalidationRequest {
                env: env.clone(),
                target: Target::Response(ResponseSelector {
                    scope_client_ids: vec![scope.clone()],
                    identity_id: None,
                }),
                request_id: scope.clone(),
                timeout,
                caller: None,
            })
            .await;
        assert!(
            started.elapsed() < timeout + Duration::from_millis(1500),
            "request {i} hung for {:?}",
            started.elapsed()
        );
        match result {
            Ok(outcome) => {
                published.insert(scope.clone());
                if outcome.confirmed() {
                    confirmed += 1;
                    // A 200 is backed by every expected agent having applied it.
                    for id in outcome.agents.keys() {
                        let n: usize = id
                            .as_str()
                            .trim_start_matches("agent-")
                            .parse()
                            .expect("agent-<n>");
                        assert!(
                            recorders[n].seen().contains(&scope),
                            "request {i} confirmed by {id} without being applied: {outcome:?}; {id} saw {:?}",
                            recorders[n].seen()
                        );
                    }
                }
            }
            Err(PublishError::Unavailable(_)) => {}
            Err(err) => panic!("request {i}: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        confirmed >= 10,
        "only {confirmed} of 60 confirmed: the test proves little"
    );

    // Every event the stream took reaches every agent: applied, or covered by a later flush.
    for (n, recorder) in recorders.iter().enumerate() {
        eventually(
            &format!("agent {n} catches up"),
            Duration::from_secs(60),
            || {
                let seen = recorder.seen();
                let flushed_later = seen.iter().skip(1).any(|s| s == "*");
                let missing = published
                    .iter()
                    .filter(|scope| !seen.contains(scope))
                    .count();
                std::future::ready(missing == 0 || flushed_later)
            },
        )
        .await;
    }
    for agent in agents {
        agent.stop().await;
    }
}

/// The node serving a publisher's presence watch (the presence bucket's leader) freezes while
/// agents sit on the other nodes. Their heartbeats fail until the bucket has a new leader, so
/// publishers may drop them, but only after they flushed; and a publisher whose watch stopped
/// delivering must not age out agents whose heartbeats land: it notices and reads the bucket
/// again, answering `503` meanwhile. So a `200` is backed by every agent: applied, or flushed
/// since the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_presence_leader_never_lets_a_publisher_confirm_without_live_agents() {
    let cluster = NatsCluster::start(3).await;
    let mut bus = BusConfig::default();
    bus.nats.url = cluster.urls();
    bus.stream.replicas = 3;
    bus.presence.replicas = 3;
    let publisher = start_publisher(&bus, "cluster-publisher").await;
    // The presence bucket's leader: the node the watch's consumer lives on.
    let observer = cachecast_bus::connect(&bus.nats, "observer")
        .await
        .expect("client");
    let leader = async_nats::jetstream::new(observer)
        .get_stream("KV_cachecast-agents")
        .await
        .expect("the presence bucket")
        .info()
        .await
        .expect("its info")
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("a leader");
    let frozen: usize = leader
        .trim_start_matches('n')
        .parse()
        .expect("nodes are n<k>");
    // Agents on the other nodes, so they stay live throughout.
    let mut agent_bus = bus.clone();
    agent_bus.nats.url = (0..3)
        .filter(|n| *n != frozen)
        .map(|n| cluster.nodes[n].url())
        .collect::<Vec<_>>()
        .join(",");
    let env = env_id("dev");
    let (recorders, agents) = start_agents(&agent_bus, "dev").await;
    assert!(
        publisher
            .wait_for_live_agents(&env, 2, Duration::from_secs(30))
            .await
    );

    let before_freeze: Vec<usize> = recorders.iter().map(|r| r.seen().len()).collect();
    cluster.nodes[frozen].pause().expect("pause the leader");
    // Well past three heartbeats (6 s): a stale view would have aged both agents out.
    let until = Instant::now() + Duration::from_secs(20);
    let (mut confirmed, mut unavailable, mut i) = (0, 0, 0);
    while Instant::now() < until {
        i += 1;
        let scope = format!("w{i}");
        let result = publisher
            .invalidate(InvalidationRequest {
                env: env.clone(),
                target: Target::Response(ResponseSelector {
                    scope_client_ids: vec![scope.clone()],
                    identity_id: None,
                }),
                request_id: scope.clone(),
                timeout: Duration::from_secs(2),
                caller: None,
            })
            .await;
        match result {
            Ok(outcome) if outcome.confirmed() => {
                confirmed += 1;
                for (n, recorder) in recorders.iter().enumerate() {
                    let seen = recorder.seen();
                    let flushed_since_freeze = seen[before_freeze[n]..].iter().any(|s| s == "*");
                    assert!(
                        seen.contains(&scope) || flushed_since_freeze,
                        "request {i} confirmed while agent-{n} neither applied it nor flushed: {outcome:?}"
                    );
                }
            }
            Ok(_) => {}
            Err(PublishError::Unavailable(_)) => unavailable += 1,
            Err(err) => panic!("request {i}: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.nodes[frozen].resume().expect("resume the leader");
    eprintln!("while frozen: {confirmed} confirmed, {unavailable} unavailable of {i}");
    for agent in agents {
        agent.stop().await;
    }
}
