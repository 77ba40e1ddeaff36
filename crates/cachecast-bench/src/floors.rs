//! The floors: the least work any design with cachecast's guarantee must do, in bare
//! async-nats. Core: publish one message, collect N replies. Durable: JetStream publish
//! acknowledged by the stream, N ordered consumers receive it, N replies collected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use async_nats::{Client, HeaderMap};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Routes replies to the round waiting for them: one subscription, rounds by id.
#[derive(Debug)]
pub(crate) struct Replies {
    prefix: String,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Replies {
    pub(crate) async fn start(client: &Client, prefix: &str) -> anyhow::Result<Arc<Self>> {
        let mut sub = client.subscribe(format!("{prefix}.*")).await?;
        let replies = Arc::new(Self {
            prefix: prefix.to_owned(),
            next: AtomicU64::new(0),
            pending: Mutex::default(),
            task: Mutex::default(),
        });
        let weak = Arc::downgrade(&replies);
        let task = tokio::spawn(async move {
            while let Some(message) = sub.next().await {
                let Some(replies) = weak.upgrade() else {
                    return;
                };
                // A status (503: nobody subscribed yet) is the server's answer, not a reply.
                if message.status.is_some() {
                    continue;
                }
                let round = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|r| r.parse().ok());
                if let Some(round) = round
                    && let Some(tx) = replies.pending.lock().expect("lock").get(&round)
                {
                    tx.send(()).ok();
                }
            }
        });
        *replies.task.lock().expect("lock") = Some(task);
        Ok(replies)
    }

    /// A new round: its reply subject and the receiver of its replies.
    pub(crate) fn round(&self) -> (u64, String, mpsc::UnboundedReceiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.pending.lock().expect("lock").insert(id, tx);
        (id, format!("{}.{id}", self.prefix), rx)
    }

    /// Waits for `n` replies of round `id`.
    pub(crate) async fn collect(&self, id: u64, mut rx: mpsc::UnboundedReceiver<()>, n: usize) {
        let all = async {
            for _ in 0..n {
                rx.recv().await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .is_err()
        {
            eprintln!("warning: a floor round timed out");
        }
        self.pending.lock().expect("lock").remove(&id);
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().expect("lock").take() {
            task.abort();
        }
    }
}

/// Responders (or consumers) of a floor; stopped on drop.
#[derive(Debug, Default)]
pub(crate) struct Responders(Vec<JoinHandle<()>>);

impl Drop for Responders {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

const CORE_SUBJECT: &str = "bench.core.inval";
const DURABLE_SUBJECT: &str = "bench.durable.inval";
const REPLY_HEADER: &str = "Bench-Reply";
/// About the size of an encoded cachecast event.
const PAYLOAD: [u8; 128] = [7; 128];

/// Every fleet connection answers every core message.
pub(crate) async fn core_responders(fleet: &[Client]) -> anyhow::Result<Responders> {
    let mut tasks = Vec::new();
    for client in fleet {
        let mut sub = client.subscribe(CORE_SUBJECT).await?;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(message) = sub.next().await {
                if let Some(reply) = message.reply {
                    client.publish(reply, bytes::Bytes::new()).await.ok();
                }
            }
        }));
    }
    for client in fleet {
        client.flush().await?;
    }
    Ok(Responders(tasks))
}

/// Waits (30 s at most) until a core message from `client` reaches a responder: the interest
/// of subscribers behind a leaf node reaches the hub a link's latency after they subscribed.
pub(crate) async fn await_core_interest(client: &Client) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(CORE_SUBJECT, bytes::Bytes::new()),
        )
        .await;
        if let Ok(Ok(_)) = answer {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the core responders' interest did not reach the requester's server within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One core round: publish, collect one reply per fleet connection.
pub(crate) async fn core_round(client: &Client, replies: &Replies, n: usize) {
    let (id, reply, rx) = replies.round();
    client
        .publish_with_reply(CORE_SUBJECT, reply, bytes::Bytes::from_static(&PAYLOAD))
        .await
        .ok();
    replies.collect(id, rx, n).await;
}

/// The floor's stream, created anew.
pub(crate) async fn durable_stream(js: &jetstream::Context) -> anyhow::Result<()> {
    js.delete_stream("BENCHFLOOR").await.ok();
    js.create_stream(stream::Config {
        name: "BENCHFLOOR".into(),
        subjects: vec![DURABLE_SUBJECT.into()],
        storage: stream::StorageType::File,
        // As cachecast's stream: nats-server 2.15 allows 1 000 consumers per stream unless it
        // says otherwise, and a fleet's consumers linger a while after the next fleet's start.
        max_consumers: 100_000,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Every fleet connection consumes the floor stream with an ordered consumer and replies,
/// reaching JetStream as `nats` says (through a leaf node's domain, at a site).
pub(crate) async fn durable_consumers(
    fleet: &[Client],
    nats: &cachecast_bus::NatsConfig,
) -> anyhow::Result<Responders> {
    let mut tasks = Vec::new();
    for client in fleet {
        let js = cachecast_bus::jetstream(client.clone(), nats);
        let stream = js.get_stream("BENCHFLOOR").await?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: DURABLE_SUBJECT.into(),
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let Ok(message) = message else { continue };
                let reply = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(REPLY_HEADER))
                    .map(|v| v.as_str().to_owned());
                if let Some(reply) = reply {
                    client.publish(reply, bytes::Bytes::new()).await.ok();
                }
            }
        }));
    }
    Ok(Responders(tasks))
}

/// One durable round: JetStream publish acknowledged, one reply per consumer.
pub(crate) async fn durable_round(js: &jetstream::Context, replies: &Replies, n: usize) {
    let (id, reply, rx) = replies.round();
    let mut headers = HeaderMap::new();
    headers.insert(REPLY_HEADER, reply.as_str());
    match js
        .publish_with_headers(
            DURABLE_SUBJECT,
            headers,
            bytes::Bytes::from_static(&PAYLOAD),
        )
        .await
    {
        Ok(ack) => {
            if let Err(err) = ack.await {
                eprintln!("warning: durable floor publish not acknowledged: {err}");
            }
        }
        Err(err) => eprintln!("warning: durable floor publish failed: {err}"),
    }
    replies.collect(id, rx, n).await;
}
