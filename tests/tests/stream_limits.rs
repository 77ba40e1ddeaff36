//! The invalidation stream takes one consumer per live agent, beyond the 1 000 that
//! nats-server 2.15 allows a stream by default.

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use cachecast_e2e::Stack;
use futures::StreamExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_thousand_agents_can_each_have_their_consumer() {
    let stack = Stack::start().await;
    let client = cachecast_bus::connect(&stack.bus.nats, "e2e-consumers")
        .await
        .expect("NATS client");
    let js = cachecast_bus::jetstream(client, &stack.bus.nats);
    let stream = cachecast_bus::open_stream(&js, &stack.bus.stream)
        .await
        .expect("the publisher created the stream");
    // What 1 001 agents create when they start: an ordered consumer each.
    let created: Vec<_> = futures::stream::iter(0..1001)
        .map(|i| {
            let stream = stream.clone();
            async move {
                stream
                    .create_consumer(pull::OrderedConfig {
                        name: Some(format!("agent-{i}")),
                        filter_subject: "cachecast.v1.dev.inval".into(),
                        deliver_policy: DeliverPolicy::New,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("consumer {i}: {e}"))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let failed: Vec<&String> = created.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        failed.first()
    );
}
