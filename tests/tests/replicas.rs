//! Publishers are stateless: replicas side by side each answer their own requests correctly,
//! while agents join and leave between requests.

use std::collections::BTreeSet;
use std::time::Duration;

use cachecast_e2e::{Stack, env_id};
use cachecast_proto::{ResponseSelector, Target};
use cachecast_publisher::{InvalidationRequest, Publisher};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publisher_replicas_answer_alternating_requests() {
    let stack = Stack::start().await;
    let replica = Publisher::start(
        cachecast_bus::connect(&stack.bus.nats, "replica")
            .await
            .expect("client"),
        &stack.bus,
    )
    .await
    .expect("the replica starts");
    assert_ne!(
        replica.id(),
        stack.publisher.id(),
        "each replica has its own ack subject"
    );
    let env = env_id("dev");

    let mut agents = Vec::new();
    for id in ["r-1", "r-2"] {
        agents.push((id, stack.memory_agent("dev", id).await.1));
    }
    let mut live: BTreeSet<&str> = ["r-1", "r-2"].into();

    for round in 0..6 {
        match round {
            2 => {
                agents.push(("r-3", stack.memory_agent("dev", "r-3").await.1));
                live.insert("r-3");
            }
            4 => {
                let (id, first) = agents.remove(0);
                first.stop().await;
                live.remove(id);
            }
            _ => {}
        }
        for publisher in [&stack.publisher, &replica] {
            assert!(
                publisher
                    .wait_for_live_agents(&env, live.len(), Duration::from_secs(15))
                    .await,
                "publisher {} sees {:?}, expected {live:?}",
                publisher.id(),
                publisher.live_agents(&env)
            );
        }
        let answered: BTreeSet<String> = if round % 2 == 0 {
            let answer = stack.invalidate("dev", "{}", "").await;
            assert_eq!(
                answer.status, 200,
                "round {round} via the API: {}",
                answer.body
            );
            answer.body["agents"]
                .as_object()
                .expect("agents")
                .keys()
                .cloned()
                .collect()
        } else {
            let outcome = replica
                .invalidate(InvalidationRequest {
                    env: env.clone(),
                    target: Target::Response(ResponseSelector::default()),
                    request_id: format!("round-{round}"),
                    timeout: Duration::from_secs(5),
                    caller: None,
                })
                .await
                .expect("published");
            assert!(
                outcome.confirmed(),
                "round {round} via the replica: {outcome:?}"
            );
            outcome.agents.keys().map(|id| id.to_string()).collect()
        };
        let expected: BTreeSet<String> = live.iter().map(|id| id.to_string()).collect();
        assert_eq!(answered, expected, "round {round}");
    }
    for (_, agent) in agents {
        agent.stop().await;
    }
}
