//! One agent id, one process: a second live process claiming an id refuses to start, and a
//! process whose id was taken over while it was paused stops instead of answering for it.

use std::time::Duration;

use cachecast_e2e::{ChildProcess, Signal, Stack, cachecast};

const STARTUP: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(20);

/// An agent process with the id every test here shares.
const TWIN: [&str; 7] = [
    "agent",
    "--env",
    "dev",
    "--id",
    "twin",
    "--heartbeat",
    "300ms",
];

/// Starts a `twin` and waits until it is live.
async fn live_twin(url: &str, which: &str) -> ChildProcess {
    let twin = cachecast(url, &TWIN);
    twin.wait_for_output("agent is live", STARTUP)
        .await
        .unwrap_or_else(|e| panic!("{which} agent: {e}"));
    twin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_live_id_refuses_and_one_whose_id_was_taken_over_stops() {
    let stack = Stack::start().await;
    let url = stack.nats.url();
    let mut first = live_twin(&url, "first").await;

    let mut second = cachecast(&url, &TWIN);
    let status = second.wait_exit(EXIT).await.expect("the second one exits");
    assert!(!status.success(), "{}", second.output());
    assert!(
        second
            .output()
            .contains("another live process announces agent id twin"),
        "{}",
        second.output()
    );

    // Paused, the first stops refreshing its key: a new process may take the id over.
    first.signal(Signal::SIGSTOP);
    let third = live_twin(&url, "third").await;
    first.signal(Signal::SIGCONT);
    let status = first.wait_exit(EXIT).await.expect("the paused one stops");
    assert!(!status.success(), "{}", first.output());
    assert!(
        first
            .output()
            .contains("another process announces this agent id"),
        "{}",
        first.output()
    );

    // The id is answered for by exactly one process: the third.
    stack.wait_for_agents("dev", 1).await;
    let answer = stack.invalidate("dev", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["total"], 1, "{}", answer.body);
    assert!(third.pid().is_some(), "the third still runs");
}

/// The last write of a process paused (or killed) right after it sent it can land late, while
/// the next process checks the key: that one write is no live process, and the id is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_last_write_of_a_paused_process_does_not_keep_its_id() {
    let stack = Stack::start().await;
    let url = stack.nats.url();
    let first = live_twin(&url, "first").await;
    first.signal(Signal::SIGSTOP);
    let client = cachecast_bus::connect(&stack.bus.nats, "late-writer")
        .await
        .expect("client");
    let presence = cachecast_bus::open_presence_bucket(
        &async_nats::jetstream::new(client),
        &stack.bus.presence,
    )
    .await
    .expect("presence bucket");
    let key = "dev.twin";
    let last = presence
        .entry(key)
        .await
        .expect("read")
        .expect("the first agent's key");

    let second = cachecast(&url, &TWIN);
    second
        .wait_for_output("checking that it is gone", STARTUP)
        .await
        .unwrap_or_else(|e| panic!("second agent: {e}"));
    // The paused process's write, landing now.
    presence.put(key, last.value).await.expect("late write");
    second
        .wait_for_output("agent is live", STARTUP)
        .await
        .unwrap_or_else(|e| panic!("a late write kept the id taken: {e}"));
}
