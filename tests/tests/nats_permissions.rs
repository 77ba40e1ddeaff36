//! The committed NATS accounts (deploy/nats/accounts.conf), run by a real nats-server with
//! the passwords it takes from the environment: the API and agents work end to end with their
//! users, and every denial the file promises holds. A denial is observed as the server's
//! `Permissions Violation` error on the offending connection, and nothing is delivered: no
//! event stored, no ack or event received, no presence written, no consumer created.

use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use cachecast_bus::{BusConfig, Secret};
use cachecast_e2e::Stack;
use cachecast_testkit::NatsServer;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::mpsc;

const API_PASSWORD: &str = "api-pw-for-tests";
const DEV_1_PASSWORD: &str = "dev-1-pw-for-tests";
const DEV_2_PASSWORD: &str = "dev-2-pw-for-tests";
const PROD_1_PASSWORD: &str = "prod-1-pw-for-tests";
const CALLER_DEV_PASSWORD: &str = "caller-dev-pw-for-tests";

/// How long a denial may take to be reported.
const DENIAL: Duration = Duration::from_secs(5);

/// A nats-server with JetStream running deploy/nats/accounts.conf as committed.
async fn server() -> NatsServer {
    cachecast_e2e::init_logs();
    let config = cachecast_testkit::workspace_root().join("deploy/nats/accounts.conf");
    NatsServer::builder(cachecast_testkit::nats_binary())
        .arg("-c")
        .arg(config.to_string_lossy())
        .env("NATS_SYS_PASSWORD", "sys-pw-for-tests")
        .env("NATS_CACHECAST_API_PASSWORD", API_PASSWORD)
        .env("NATS_CACHECAST_AGENT_DEV_1_PASSWORD", DEV_1_PASSWORD)
        .env("NATS_CACHECAST_AGENT_DEV_2_PASSWORD", DEV_2_PASSWORD)
        .env("NATS_CACHECAST_AGENT_PROD_1_PASSWORD", PROD_1_PASSWORD)
        .env("NATS_CACHECAST_CALLER_DEV_PASSWORD", CALLER_DEV_PASSWORD)
        .env("NATS_CACHECAST_SITE_A_PASSWORD", "site-a-pw-for-tests")
        .start()
        .await
        .unwrap_or_else(|e| panic!("nats-server did not start with deploy/nats/accounts.conf: {e}"))
}

/// A NATS user of the file and the inbox prefix it must use.
#[derive(Clone, Copy)]
struct User {
    name: &'static str,
    password: &'static str,
    inbox: &'static str,
}

const API: User = User {
    name: "cachecast-api",
    password: API_PASSWORD,
    inbox: "_INBOX.api",
};
const DEV_1: User = User {
    name: "cachecast-agent-dev-1",
    password: DEV_1_PASSWORD,
    inbox: "_INBOX.agent.dev.dev-agent-1",
};
const DEV_2: User = User {
    name: "cachecast-agent-dev-2",
    password: DEV_2_PASSWORD,
    inbox: "_INBOX.agent.dev.dev-agent-2",
};
const PROD_1: User = User {
    name: "cachecast-agent-prod-1",
    password: PROD_1_PASSWORD,
    inbox: "_INBOX.agent.prod.prod-agent-1",
};
const CALLER_DEV: User = User {
    name: "cachecast-caller-dev",
    password: CALLER_DEV_PASSWORD,
    inbox: "_INBOX.caller.dev",
};

impl User {
    fn configure(self, bus: &mut BusConfig) {
        bus.nats.user = Some(self.name.into());
        bus.nats.password = Some(Secret::new(self.password));
        bus.nats.inbox_prefix = self.inbox.into();
    }

    fn bus(self, nats: &NatsServer) -> BusConfig {
        let mut bus = BusConfig::default();
        bus.nats.url = nats.url();
        self.configure(&mut bus);
        bus
    }
}

/// A raw client of one user that records the errors the server sends it.
struct Probe {
    client: async_nats::Client,
    errors: mpsc::UnboundedReceiver<String>,
}

impl Probe {
    async fn connect(nats: &NatsServer, user: User) -> Self {
        let (tx, errors) = mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::with_user_and_password(
            user.name.into(),
            user.password.into(),
        )
        .custom_inbox_prefix(user.inbox)
        .request_timeout(Some(Duration::from_secs(2)))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(err) = event {
                    tx.send(err.to_string()).ok();
                }
            }
        })
        .connect(nats.url())
        .await
        .unwrap_or_else(|e| panic!("{} cannot connect: {e}", user.name));
        Self { client, errors }
    }

    /// Waits for the server's permissions violation naming `subject`.
    async fn violation(&mut self, subject: &str) {
        let wanted = format!("\"{subject}\"");
        let found = tokio::time::timeout(DENIAL, async {
            while let Some(error) = self.errors.recv().await {
                if error.to_lowercase().contains("permissions violation") && error.contains(&wanted)
                {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(found, Ok(true)),
            "no permissions violation for {subject} within {DENIAL:?}"
        );
    }

    /// Publishes on `subject`, which must be refused.
    async fn publish_refused(&mut self, subject: &str) {
        self.client
            .publish(subject.to_owned(), "forged".into())
            .await
            .expect("publish is buffered");
        self.violation(subject).await;
    }

    /// Subscribes to `subject`, which must be refused; returns the subscription to show that
    /// nothing arrives on it.
    async fn subscribe_refused(&mut self, subject: &str) -> async_nats::Subscriber {
        let subscriber = self
            .client
            .subscribe(subject.to_owned())
            .await
            .expect("subscribe is buffered");
        self.violation(subject).await;
        subscriber
    }

    /// A JetStream API request on `subject`, which must be refused: the request fails.
    async fn api_request_refused(&mut self, subject: &str, body: serde_json::Value) {
        let answer = self
            .client
            .request(subject.to_owned(), body.to_string().into())
            .await;
        assert!(answer.is_err(), "{subject} answered: {answer:?}");
        self.violation(subject).await;
    }

    /// A round trip to the server: whatever it was going to deliver before has arrived.
    async fn barrier(&self) {
        tokio::time::timeout(DENIAL, self.client.flush())
            .await
            .expect("flush in time")
            .expect("flush");
    }
}

/// Nothing has arrived on `subscriber` (after a [`Probe::barrier`]).
fn nothing_on(subscriber: &mut async_nats::Subscriber) {
    if let Some(Some(message)) = subscriber.next().now_or_never() {
        panic!("received {message:?} on a refused subscription");
    }
}

/// How many messages the stream `name` holds, read by the API user.
async fn stored(api: &Probe, name: &str) -> u64 {
    let js = async_nats::jetstream::new(api.client.clone());
    let mut stream = js.get_stream(name).await.expect("stream info");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_and_agents_work_with_their_users() {
    let nats = server().await;
    let mut stack = Stack::builder()
        .nats(nats)
        .bus(|bus| API.configure(bus))
        .start()
        .await;
    let (dev_cache, prod_cache) = (
        cachecast_agent::MemoryCache::new(),
        cachecast_agent::MemoryCache::new(),
    );
    let dev = stack
        .agent_builder("dev", "dev-agent-1")
        .bus(&DEV_1.bus(&stack.nats))
        .start(dev_cache)
        .await;
    let prod = stack
        .agent_builder("prod", "prod-agent-1")
        .bus(&PROD_1.bus(&stack.nats))
        .start(prod_cache)
        .await;
    stack.wait_for_agents("dev", 1).await;
    stack.wait_for_agents("prod", 1).await;
    // The NATS service, served with the API's user, called by a caller of `dev`.
    let service_client = cachecast_bus::connect(&stack.bus.nats, "e2e-service")
        .await
        .expect("NATS client");
    let (stop_service, service_stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(cachecast_publisher::service::run(
        service_client,
        stack.publisher.clone(),
        cachecast_publisher::api::ApiConfig::default(),
        async {
            service_stopped.await.ok();
        },
    ));
    let mut caller = Probe::connect(&stack.nats, CALLER_DEV).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while caller
        .client
        .request("$SRV.PING.cachecast", "".into())
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the service did not answer $SRV.PING within 10 s"
        );
    }
    // A caller cannot make the service reply onto the stream's API or an events subject:
    // the request is refused (not applied, not answered), then a real one goes through.
    let api = Probe::connect(&stack.nats, API).await;
    let events_before = stored(&api, "CACHECAST").await;
    for reflected in ["$JS.API.STREAM.DELETE.CACHECAST", "cachecast.v1.prod.inval"] {
        caller
            .client
            .publish_with_reply(
                "cachecast.svc.v1.dev.invalidate",
                reflected,
                r#"{"response":{}}"#.into(),
            )
            .await
            .expect("publish");
    }
    let reply = caller
        .client
        .request(
            "cachecast.svc.v1.dev.invalidate",
            r#"{"response":{"scopeClientIds":["orders-api"]}}"#.into(),
        )
        .await
        .expect("the service replies");
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(
        reply["agents"]["dev-agent-1"]["status"], "applied",
        "{reply}"
    );
    // Refused in the order received, before the real one: no event of theirs, now or later
    // (the server log is checked for the API user's violations at the end).
    assert_eq!(
        stored(&api, "CACHECAST").await,
        events_before + 1,
        "only the real request published an event, and the stream is still there"
    );
    // The caller of `dev` cannot invalidate `prod`, nor publish events.
    caller
        .api_request_refused(
            "cachecast.svc.v1.prod.invalidate",
            serde_json::json!({"response": {}}),
        )
        .await;
    caller.publish_refused("cachecast.v1.dev.inval").await;
    stop_service.send(()).ok();
    service
        .await
        .expect("the service task")
        .expect("the service ran");
    for env in ["dev", "prod"] {
        let answer = stack
            .invalidate(env, r#"{"scopeClientId": "orders-api"}"#, "")
            .await;
        assert_eq!(answer.status, 200, "{env}: {}", answer.body);
        assert_eq!(answer.body["_nodes"]["successful"], 1, "{}", answer.body);
    }
    // A server restart: the agents resume their consumers (new names, the same filter) and
    // the publisher re-reads presence, all within their permissions.
    stack
        .nats
        .start_again()
        .await
        .unwrap_or_else(|e| panic!("nats-server did not restart: {e}"));
    // Clients reconnect on their own and the API answers 503 (at once) until its view of
    // the agents is current again: retry until the agents confirm.
    for env in ["dev", "prod"] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let answer = stack
                .invalidate(env, r#"{"scopeClientId": "billing-api"}"#, "?timeout=10s")
                .await;
            if answer.status == 503 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            assert_eq!(answer.status, 200, "{env} after a restart: {}", answer.body);
            assert_eq!(answer.body["_nodes"]["successful"], 1, "{}", answer.body);
            break;
        }
    }
    // The audit trail, written and read with the API's user: the NATS caller is named by its
    // reply subject (below its own inbox prefix), the HTTP caller by its token's subject.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = stack
            .get_as(&["dev"], "/api/1.0/runtime/invalidations/dev")
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        let callers: Vec<&str> = page.body["records"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["caller"].as_str())
            .collect();
        if callers
            .iter()
            .any(|c| c.starts_with("nats-reply:_INBOX.caller.dev."))
            && callers.contains(&"e2e")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the audit trail lacks the service's and the API's requests: {}",
            page.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dev.stop().await;
    prod.stop().await;
    stack.wait_for_agents("dev", 0).await;
    // The only violations are the caller's, on purpose.
    let log = std::fs::read_to_string(stack.nats.log_file()).unwrap_or_default();
    let unexpected: Vec<&str> = log
        .lines()
        .filter(|line| line.to_lowercase().contains("violation"))
        .filter(|line| !line.contains("user:cachecast-caller-dev"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the users of deploy/nats/accounts.conf lack a permission cachecast needs:\n{}",
        unexpected.join("\n")
    );
    assert!(
        log.contains("user:cachecast-caller-dev"),
        "the server logs violations with the user's name (or this check proves nothing)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reads_and_writes_only_its_own_environment() {
    let nats = server().await;
    // The API creates the stream and the bucket.
    let stack = Stack::builder()
        .nats(nats)
        .bus(|bus| API.configure(bus))
        .start()
        .await;
    let nats = &stack.nats;
    let api = Probe::connect(nats, API).await;
    let mut agent = Probe::connect(nats, DEV_1).await;
    let mut prod_acks = api
        .client
        .subscribe("cachecast.v1.prod.ack.>")
        .await
        .expect("the API may read acks");
    api.barrier().await;
    let events_before = stored(&api, "CACHECAST").await;
    let presence_before = stored(&api, "KV_cachecast-agents").await;

    // It cannot publish invalidations, in its environment or another.
    agent.publish_refused("cachecast.v1.dev.inval").await;
    agent.publish_refused("cachecast.v1.prod.inval").await;
    // It cannot acknowledge another environment's events.
    agent
        .publish_refused("cachecast.v1.prod.ack.publisher.event")
        .await;
    // It cannot announce another agent, here or elsewhere.
    agent
        .publish_refused("$KV.cachecast-agents.dev.dev-agent-2")
        .await;
    agent
        .publish_refused("$KV.cachecast-agents.prod.prod-agent-1")
        .await;

    // It reads events through a consumer filtered to its environment, or as they are published
    // (the fast path): its own environment's only.
    let mut own_events = agent
        .client
        .subscribe("cachecast.v1.dev.inval")
        .await
        .expect("an agent may take its environment's events as they are published");
    let mut direct = agent.subscribe_refused("cachecast.v1.prod.inval").await;
    let mut everything = agent.subscribe_refused("cachecast.v1.>").await;
    // Nor the replies meant for other users.
    let mut others = agent.subscribe_refused("_INBOX.>").await;
    let mut api_inbox = agent.subscribe_refused("_INBOX.api.>").await;
    let js = async_nats::jetstream::new(agent.client.clone());
    let stream = js
        .get_stream("CACHECAST")
        .await
        .expect("an agent may read the stream's info");
    for config in [
        // Another environment's events.
        pull::OrderedConfig {
            name: Some("sneaky".into()),
            filter_subject: "cachecast.v1.prod.inval".into(),
            ..Default::default()
        },
        // Every environment's: no name, so no filter in the API subject.
        pull::OrderedConfig {
            filter_subject: "cachecast.v1.prod.inval".into(),
            ..Default::default()
        },
    ] {
        let created = tokio::time::timeout(DENIAL, stream.create_consumer(config)).await;
        assert!(
            matches!(created, Ok(Err(_))),
            "the consumer must not be created"
        );
    }
    agent
        .violation("$JS.API.CONSUMER.CREATE.CACHECAST.sneaky.cachecast.v1.prod.inval")
        .await;
    agent.violation("$JS.API.CONSUMER.CREATE.CACHECAST").await;
    // The subject names its environment, the body another: the server refuses the mismatch.
    for config in [
        serde_json::json!({"name": "sneaky2", "filter_subject": "cachecast.v1.prod.inval"}),
        serde_json::json!({"name": "sneaky2", "filter_subjects": ["cachecast.v1.prod.inval"]}),
        serde_json::json!({"name": "sneaky2", "filter_subjects": ["cachecast.v1.dev.inval", "cachecast.v1.prod.inval"]}),
    ] {
        let answer = agent
            .client
            .request(
                "$JS.API.CONSUMER.CREATE.CACHECAST.sneaky2.cachecast.v1.dev.inval",
                serde_json::json!({"stream_name": "CACHECAST", "config": config, "action": ""})
                    .to_string()
                    .into(),
            )
            .await
            .expect("the JetStream API answers");
        let answer: serde_json::Value =
            serde_json::from_slice(&answer.payload).expect("a JSON answer");
        assert!(
            answer.get("error").is_some(),
            "a consumer of {config} must be refused: {answer}"
        );
    }
    // No durable consumer, no reading stream messages directly.
    agent
        .api_request_refused(
            "$JS.API.CONSUMER.DURABLE.CREATE.CACHECAST.sneaky3",
            serde_json::json!({"stream_name": "CACHECAST", "config": {"durable_name": "sneaky3"}}),
        )
        .await;
    agent
        .api_request_refused(
            "$JS.API.STREAM.MSG.GET.CACHECAST",
            serde_json::json!({"last_by_subj": "cachecast.v1.prod.inval"}),
        )
        .await;
    agent
        .api_request_refused(
            "$JS.API.DIRECT.GET.CACHECAST",
            serde_json::json!({"last_by_subj": "cachecast.v1.prod.inval"}),
        )
        .await;
    // Its progress check may read its own environment's last event, never another's.
    agent
        .api_request_refused(
            "$JS.API.DIRECT.GET.CACHECAST.cachecast.v1.prod.inval",
            serde_json::json!({}),
        )
        .await;
    agent
        .api_request_refused("$JS.API.CONSUMER.LIST.CACHECAST", serde_json::json!({}))
        .await;
    agent
        .api_request_refused("$JS.API.STREAM.PURGE.CACHECAST", serde_json::json!({}))
        .await;

    // Real events in both environments, then a round trip: nothing reached the refused
    // subscriptions, the forged ack reached no one, no forged event or presence was stored.
    let answer = stack.invalidate("dev", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let answer = stack.invalidate("prod", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    agent.barrier().await;
    api.barrier().await;
    for subscription in [&mut direct, &mut everything, &mut others, &mut api_inbox] {
        nothing_on(subscription);
    }
    // dev's event came as published, with the reply subject where the stream acknowledged it
    // to the API: the agent cannot forge that acknowledgement.
    let event = own_events
        .next()
        .now_or_never()
        .flatten()
        .expect("dev's event reached the agent's own subscription");
    assert_eq!(event.subject.as_str(), "cachecast.v1.dev.inval");
    let reply = event
        .reply
        .expect("a published event carries its reply subject");
    agent.publish_refused(reply.as_str()).await;
    nothing_on(&mut own_events);
    nothing_on(&mut prod_acks);
    assert_eq!(stored(&api, "CACHECAST").await, events_before + 2);
    assert_eq!(stored(&api, "KV_cachecast-agents").await, presence_before);
    let consumers = async_nats::jetstream::new(api.client.clone())
        .get_stream("CACHECAST")
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .consumer_count;
    assert_eq!(consumers, 0, "no consumer was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_cannot_act_as_an_agent_or_destroy_the_stream() {
    let nats = server().await;
    let stack = Stack::builder()
        .nats(nats)
        .bus(|bus| API.configure(bus))
        .start()
        .await;
    let nats = &stack.nats;
    let mut api = Probe::connect(nats, API).await;
    let events_before = stored(&api, "CACHECAST").await;
    let presence_before = stored(&api, "KV_cachecast-agents").await;

    api.publish_refused("cachecast.v1.dev.ack.publisher.event")
        .await;
    api.publish_refused("$KV.cachecast-agents.dev.ghost").await;
    let mut events = api.subscribe_refused("cachecast.v1.dev.inval").await;
    let mut agent_inboxes = api.subscribe_refused("_INBOX.agent.>").await;
    for subject in [
        "$JS.API.STREAM.DELETE.CACHECAST",
        "$JS.API.STREAM.PURGE.CACHECAST",
        "$JS.API.STREAM.UPDATE.CACHECAST",
        "$JS.API.STREAM.DELETE.KV_cachecast-agents",
        "$JS.API.STREAM.CREATE.ELSEWHERE",
    ] {
        api.api_request_refused(subject, serde_json::json!({}))
            .await;
    }

    let answer = stack.invalidate("dev", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    api.barrier().await;
    nothing_on(&mut events);
    nothing_on(&mut agent_inboxes);
    assert_eq!(stored(&api, "CACHECAST").await, events_before + 1);
    assert_eq!(stored(&api, "KV_cachecast-agents").await, presence_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_ack_from_another_agent_of_the_environment_never_reaches_the_publisher() {
    use cachecast_proto::Wire as _;
    let nats = server().await;
    let stack = Stack::builder()
        .nats(nats)
        .bus(|bus| API.configure(bus))
        .start()
        .await;
    let nats = &stack.nats;
    // dev-agent-1 is live (its own user writes its presence) but applies nothing.
    let victim = Probe::connect(nats, DEV_1).await;
    let presence = cachecast_proto::Presence {
        agent_id: "dev-agent-1".into(),
        env: "dev".into(),
        heartbeat_ms: 60_000,
        ..Default::default()
    };
    victim
        .client
        .publish("$KV.cachecast-agents.dev.dev-agent-1", presence.to_bytes())
        .await
        .expect("publish");
    victim.barrier().await;
    stack.wait_for_agents("dev", 1).await;

    let env = cachecast_e2e::env_id("dev");
    let mut in_flight = stack
        .publisher
        .begin(cachecast_publisher::InvalidationRequest {
            env: env.clone(),
            target: cachecast_proto::Target::Response(Default::default()),
            request_id: "forged-ack".into(),
            timeout: Duration::from_secs(3),
            caller: None,
        })
        .await
        .expect("published");
    let ack_subject =
        cachecast_proto::Subjects::ack(&env, stack.publisher.id(), in_flight.event_id());
    let forged = cachecast_proto::Ack {
        event_id: in_flight.event_id().to_owned(),
        agent_id: "dev-agent-1".into(),
        status: cachecast_proto::AckStatus::Applied as i32,
        ..Default::default()
    }
    .to_bytes();
    let mut forger = Probe::connect(nats, DEV_2).await;
    // As the victim, with and without the sender token: refused by the server.
    for subject in [format!("{ack_subject}.dev-agent-1"), ack_subject.clone()] {
        forger
            .client
            .publish(subject.clone(), forged.clone())
            .await
            .expect("the publish call itself succeeds");
        forger.violation(&subject).await;
    }
    // On its own subject with the victim's name in the payload: refused by the publisher.
    forger
        .client
        .publish(format!("{ack_subject}.dev-agent-2"), forged.clone())
        .await
        .expect("publish");
    forger.barrier().await;

    // Nothing forged counted: the victim never applied, so the request is not confirmed.
    while in_flight.next_ack().await.is_some() {}
    let outcome = in_flight.finish();
    assert!(!outcome.confirmed(), "{outcome:?}");
    assert!(
        matches!(
            outcome.agents.values().next(),
            Some(cachecast_publisher::AgentOutcome::TimedOut { .. })
        ),
        "{outcome:?}"
    );
}
