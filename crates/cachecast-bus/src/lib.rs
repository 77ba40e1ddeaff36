//! How cachecast talks to NATS.
//!
//! One place for the connection settings, the invalidation stream and the presence bucket, so
//! the publisher and the agent can never disagree about them. The publisher side creates the
//! stream and the bucket ([`ensure_stream`], [`ensure_presence_bucket`]); agents only open them
//! ([`open_stream`], [`open_presence_bucket`]), which keeps agent credentials small.

mod log_limit;
mod secret;
pub mod trace_context;

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use serde::{Deserialize, Serialize};

pub use async_nats::{Client, jetstream::Context as JetStream};
pub use log_limit::LogLimiter;
pub use secret::{Secret, redact_url, serialize_redacted_url};

/// NATS header carrying the request id of a request to the NATS service, and of its answer.
pub const REQUEST_ID_HEADER: &str = "RequestID";

/// NATS header carrying the wire version of an event. An event without it is version 1, which
/// is what publishers of this version send (no header: every agent parses every header); an
/// agent ignores (and counts) an event with any other version than [`WIRE_VERSION`].
pub const WIRE_VERSION_HEADER: &str = "Cachecast-Wire-Version";

/// The wire version this build speaks: the `cachecast.v1` messages.
pub const WIRE_VERSION: &str = "1";

/// The inbox prefix NATS clients use unless told otherwise.
pub const DEFAULT_INBOX_PREFIX: &str = "_INBOX";

/// Errors talking to NATS. Each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid NATS address {url:?}: {source}; use a URL like nats://127.0.0.1:4222")]
    Address {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error(
        "JetStream stream {name:?} is not available: {reason}; check that JetStream is enabled (`nats-server -js`) and, in a cluster, that most of its servers are up (after losing a node it elects a new leader within seconds: retry)"
    )]
    Stream { name: String, reason: String },
    #[error(
        "presence bucket {name:?} is not available: {reason}; check that JetStream is enabled (`nats-server -js`) and, in a cluster, that most of its servers are up (after losing a node it elects a new leader within seconds: retry)"
    )]
    Presence { name: String, reason: String },
    #[error(
        "caches bucket {name:?} is not available: {reason}; check that JetStream is enabled (`nats-server -js`) and, in a cluster, that most of its servers are up (after losing a node it elects a new leader within seconds: retry)"
    )]
    Caches { name: String, reason: String },
    #[error("invalid NATS settings: {0}")]
    Settings(String),
}

/// Connection settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas. A password in it is never printed.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    /// How long one connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a JetStream request (including a publish acknowledgement) may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The longest wait between reconnection attempts.
    #[serde(with = "humantime_serde")]
    pub max_reconnect_delay: Duration,
    /// User name, with `password`. At most one way to authenticate: user and password,
    /// `token`, `nkey_seed` or `creds_file`.
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// An authentication token.
    pub token: Option<Secret>,
    /// A user NKey seed (`SU...`).
    pub nkey_seed: Option<Secret>,
    /// A `.creds` file (user JWT and NKey seed, as `nsc` writes it).
    pub creds_file: Option<PathBuf>,
    /// PEM bundle of the certificate authorities to trust.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to connect without TLS.
    pub require_tls: bool,
    /// What this client's reply subjects (inboxes) start with. Give every NATS user its
    /// own prefix and allow it to subscribe only to `<prefix>.>`, so no user can read the
    /// replies (JetStream deliveries included) meant for another (see deploy/nats/).
    pub inbox_prefix: String,
    /// The JetStream domain of the servers that hold the stream and the buckets, for a process
    /// that reaches them through a leaf node (a site's agents): its JetStream requests go to
    /// `$JS.<domain>.API`. Unset: the JetStream of the server it connects to (or of its cluster).
    pub jetstream_domain: Option<String>,
    /// How often the client pings its server; the client reconnects when a third ping finds two
    /// still unanswered, so a half-open connection (a WAN link that died without a close) goes
    /// unnoticed two to three times this long.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(1),
            max_reconnect_delay: Duration::from_secs(1),
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            creds_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            require_tls: false,
            inbox_prefix: DEFAULT_INBOX_PREFIX.into(),
            jetstream_domain: None,
            ping_interval: Duration::from_secs(10),
        }
    }
}

impl NatsConfig {
    /// The server URLs in `url`, which may list several separated by commas.
    pub fn servers(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// Checks the authentication and TLS settings without connecting: one way to
    /// authenticate at most, pairs complete, files readable.
    pub fn check(&self) -> Result<(), BusError> {
        let bad = |reason: String| Err(BusError::Settings(reason));
        let methods = [
            ("nats.user", self.user.is_some()),
            ("nats.token", self.token.is_some()),
            ("nats.nkey_seed", self.nkey_seed.is_some()),
            ("nats.creds_file", self.creds_file.is_some()),
        ];
        let chosen: Vec<&str> = methods
            .iter()
            .filter(|(_, set)| *set)
            .map(|(k, _)| *k)
            .collect();
        if chosen.len() > 1 {
            return bad(format!(
                "{} are set: choose one way to authenticate",
                chosen.join(" and ")
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return bad("nats.user and nats.password go together: set both or neither".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return bad(
                "nats.tls_cert_file and nats.tls_key_file go together: set both or neither".into(),
            );
        }
        let valid_token = |t: &str| {
            !t.is_empty()
                && !t
                    .chars()
                    .any(|c| c.is_whitespace() || c == '*' || c == '>' || c.is_control())
        };
        if !self.inbox_prefix.split('.').all(valid_token) {
            return bad(format!(
                "nats.inbox_prefix {:?} is not a subject prefix: use dot-separated tokens without spaces or wildcards, like _INBOX.agent-dev-1",
                self.inbox_prefix
            ));
        }
        if let Some(domain) = &self.jetstream_domain
            && (!valid_token(domain) || domain.contains('.'))
        {
            return bad(format!(
                "nats.jetstream_domain {domain:?} is not a JetStream domain: use one token without dots, spaces or wildcards, as the hub's `jetstream {{ domain: ... }}` names it"
            ));
        }
        if self.ping_interval.is_zero() {
            return bad("nats.ping_interval must be above zero (10s is the default)".into());
        }
        for (key, path) in [
            ("nats.creds_file", &self.creds_file),
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ] {
            if let Some(path) = path
                && let Err(err) = std::fs::metadata(path)
            {
                return bad(format!("{key} {}: {err}", path.display()));
            }
        }
        Ok(())
    }

    /// Connect options carrying the authentication and TLS settings.
    async fn options(&self) -> Result<async_nats::ConnectOptions, BusError> {
        self.check()?;
        let mut options = match &self.creds_file {
            Some(path) => async_nats::ConnectOptions::new()
                .credentials_file(path)
                .await
                .map_err(|err| {
                    BusError::Settings(format!("nats.creds_file {}: {err}", path.display()))
                })?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(token) = &self.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.expose().to_owned());
        }
        if let Some(ca) = &self.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options
            .require_tls(self.require_tls)
            .custom_inbox_prefix(self.inbox_prefix.clone()))
    }
}

/// The invalidation stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    /// 1 for a single server, 3 for a production cluster.
    pub replicas: usize,
    /// How long events are kept for agents that reconnect.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The most consumers the stream may have: one per live agent (and a few while agents
    /// restart). Set when the stream is created: nats-server 2.15 otherwise limits every
    /// stream to 1 000, and the 1 001st agent could not start.
    pub max_consumers: i32,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            name: "CACHECAST".into(),
            replicas: 1,
            max_age: Duration::from_secs(24 * 3600),
            max_consumers: 100_000,
        }
    }
}

/// The audit trail: a record of every invalidation and its outcome, kept `max_age`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    pub stream: String,
    pub replicas: usize,
    /// How long records are kept.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            stream: "CACHECAST_AUDIT".into(),
            replicas: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The presence bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    pub bucket: String,
    pub replicas: usize,
    /// How long the key of an agent that stopped heartbeating lingers. Must exceed three
    /// heartbeats of the slowest agent; it bounds how long a new publisher may still expect
    /// a crashed agent when no other agent writes (see docs/ARCHITECTURE.md).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Publishers forget a persistent cache that no agent attended for this long (off when
    /// unset). For autoscaled fleets whose caches end with their pods; the risk: a cache that
    /// still serves but whose agents are down that long is no longer invalidated, and requests
    /// answer `200` without it.
    #[serde(default, with = "humantime_serde")]
    pub forget_unattended_after: Option<Duration>,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            bucket: "cachecast-agents".into(),
            replicas: 1,
            max_age: Duration::from_secs(60),
            forget_unattended_after: None,
        }
    }
}

/// The bucket of persistent caches' registrations (no TTL: a registered cache stays expected
/// until it is forgotten).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CachesConfig {
    pub bucket: String,
    pub replicas: usize,
}

impl Default for CachesConfig {
    fn default() -> Self {
        Self {
            bucket: "cachecast-caches".into(),
            replicas: 1,
        }
    }
}

/// Everything a publisher or an agent needs to know about the bus.
#[derive(Debug, Clone, Default)]
pub struct BusConfig {
    pub nats: NatsConfig,
    pub stream: StreamConfig,
    pub presence: PresenceConfig,
    pub caches: CachesConfig,
    pub audit: AuditConfig,
}

/// Connects to NATS. Returns at once even when no server is up: the client keeps trying in
/// the background, so a process can start before NATS and survive NATS restarts.
pub async fn connect(config: &NatsConfig, client_name: &str) -> Result<Client, BusError> {
    Ok(connect_closable(config, client_name).await?.0)
}

/// [`connect`], with a [`Closed`] that tells when the connection has really ended after a
/// drain: `drain` only asks the client to close, and a server stopped before it has would
/// leave the client reporting a lost connection.
pub async fn connect_closable(
    config: &NatsConfig,
    client_name: &str,
) -> Result<(Client, Closed), BusError> {
    let max_delay = config.max_reconnect_delay;
    let name = client_name.to_owned();
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(false);
    config
        .options()
        .await?
        .name(client_name)
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .retry_on_initial_connect()
        .max_reconnects(None)
        // A frozen server (paused, partitioned without a close) answers no ping: with the
        // client's 60 s default it went unnoticed for minutes.
        .ping_interval(config.ping_interval)
        .reconnect_delay_callback(move |attempts| {
            (Duration::from_millis(50) * attempts.min(20) as u32).min(max_delay)
        })
        .event_callback(move |event| {
            let name = name.clone();
            if matches!(event, async_nats::Event::Closed) {
                closed_tx.send_replace(true);
            }
            async move {
                match event {
                    async_nats::Event::Connected => {
                        metrics::counter!("cachecast_nats_connects_total").increment(1);
                        tracing::info!(client = %name, "connected to NATS")
                    }
                    async_nats::Event::Disconnected => {
                        metrics::counter!("cachecast_nats_disconnects_total").increment(1);
                        tracing::warn!(client = %name, "disconnected from NATS; reconnecting")
                    }
                    async_nats::Event::Draining | async_nats::Event::Closed => {
                        tracing::debug!(client = %name, event = %event, "NATS connection closing")
                    }
                    async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
                        tracing::warn!(client = %name, "NATS refused the credentials: check nats.user and nats.password, nats.token, nats.nkey_seed or nats.creds_file")
                    }
                    async_nats::Event::ServerError(async_nats::ServerError::Other(error))
                        if error.to_lowercase().contains("permissions violation") =>
                    {
                        tracing::warn!(client = %name, %error, "NATS refused an operation this user is not allowed: check its permissions (deploy/nats/accounts.conf) and nats.inbox_prefix")
                    }
                    other => tracing::warn!(client = %name, event = %other, "NATS event"),
                }
            }
        })
        .connect(config.servers())
        .await
        .map(|client| (client, Closed(closed_rx)))
        .map_err(|source| BusError::Address {
            url: redact_url(&config.url),
            source,
        })
}

/// The end of one client's connection; see [`connect_closable`].
#[derive(Debug)]
pub struct Closed(tokio::sync::watch::Receiver<bool>);

impl Closed {
    /// Drains `client` and waits, at most `timeout` in all, until its connection has closed:
    /// after that it sends and reports nothing. False when it did not close in time.
    pub async fn drain(mut self, client: &Client, timeout: Duration) -> bool {
        let closed = async {
            if let Err(err) = client.drain().await {
                // Only a client whose connection already ended cannot take the command.
                tracing::debug!(error = %err, "the NATS connection was closed already");
                return;
            }
            // An error means the client's event task ended, which it does only after its
            // connection did (even if the `Closed` event itself was dropped).
            let _ = self.0.wait_for(|closed| *closed).await;
        };
        tokio::time::timeout(timeout, closed).await.is_ok()
    }
}

/// Sends what the client still buffers (acks, presence deletes), waiting at most `timeout`:
/// while NATS is unreachable a flush would never return.
pub async fn flush(client: &Client, timeout: Duration) {
    match tokio::time::timeout(timeout, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "could not flush to NATS"),
        Err(_) => tracing::warn!("NATS unreachable: buffered messages not sent"),
    }
}

/// A JetStream context whose requests (and publish acknowledgements) are bounded, in
/// `nats.jetstream_domain` when one is set (KV puts included: the client prefixes them too).
pub fn jetstream(client: Client, config: &NatsConfig) -> JetStream {
    let api_prefix = match &config.jetstream_domain {
        Some(domain) => format!("$JS.{domain}.API"),
        None => "$JS.API".to_owned(),
    };
    jetstream::ContextBuilder::new()
        .api_prefix(api_prefix)
        .timeout(config.request_timeout)
        .build(client)
}

/// Creates the invalidation stream, or opens it if it exists.
pub async fn ensure_stream(
    js: &JetStream,
    config: &StreamConfig,
) -> Result<stream::Stream, BusError> {
    let wanted = stream::Config {
        name: config.name.clone(),
        subjects: vec![cachecast_proto::Subjects::ALL_EVENTS.into()],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        max_age: config.max_age,
        max_consumers: config.max_consumers,
        // Agents check their progress with a direct get of their environment's last event,
        // on a subject that carries the environment (so it can be permitted per environment).
        allow_direct: true,
        republish: Some(live_republish()),
        ..Default::default()
    };
    let mut stream = js
        .get_or_create_stream(wanted)
        .await
        .map_err(|err| BusError::Stream {
            name: config.name.clone(),
            reason: err.to_string(),
        })?;
    // A stream created by an older version lacks direct gets or live copies: turn them on
    // (nothing else in its configuration changes), or say how to. A republish an operator
    // set up for something else is theirs: agents then use consumers.
    if let Ok(info) = stream.info().await {
        let current = info.config.clone();
        if let Some(other) = current
            .republish
            .as_ref()
            .filter(|_| !republishes_live(&current))
        {
            tracing::warn!(
                stream = %config.name,
                source = %other.source,
                destination = %other.destination,
                "the stream republishes elsewhere, so agents cannot take live copies of events and keep a consumer each"
            );
        }
        if !current.allow_direct || current.republish.is_none() {
            let mut updated = current;
            updated.allow_direct = true;
            updated.republish.get_or_insert_with(live_republish);
            match js.update_stream(updated).await {
                Ok(_) => {
                    tracing::info!(stream = %config.name, "direct gets (agents' progress checks) and live copies (agents' events) turned on")
                }
                Err(err) => tracing::warn!(
                    stream = %config.name,
                    error = %err,
                    "the stream lacks direct gets (agents' progress checks: without them agents report `lagging`) or live copies (agents then keep a consumer each); turn them on: nats stream edit {} --allow-direct --republish-source '{}' --republish-destination '{}'",
                    config.name,
                    cachecast_proto::Subjects::ALL_EVENTS,
                    cachecast_proto::Subjects::LIVE_TEMPLATE,
                ),
            }
        }
    }
    // An existing stream keeps its own limit (publishers may not update the stream): say so.
    if let Ok(info) = stream.info().await {
        let limit = info.config.max_consumers;
        if limit > 0 && limit < config.max_consumers {
            tracing::warn!(
                stream = %config.name,
                limit,
                wanted = config.max_consumers,
                "the stream allows fewer consumers (one per agent) than stream.max_consumers; raise it: nats stream edit {} --max-consumers {}",
                config.name,
                config.max_consumers
            );
        }
    }
    Ok(stream)
}

/// The stream's copy of each event as it stores it, for the agents of its environment: one
/// message per event, with its sequence and the sequence of the environment's previous event
/// (`Nats-Sequence`, `Nats-Last-Sequence`).
fn live_republish() -> stream::Republish {
    stream::Republish {
        source: cachecast_proto::Subjects::ALL_EVENTS.into(),
        destination: cachecast_proto::Subjects::LIVE_TEMPLATE.into(),
        headers_only: false,
    }
}

/// Whether a stream so configured sends agents the live copies of their events.
pub fn republishes_live(config: &stream::Config) -> bool {
    config.republish.as_ref() == Some(&live_republish())
}

/// Creates the audit stream, or opens it if it exists.
pub async fn ensure_audit_stream(
    js: &JetStream,
    config: &AuditConfig,
) -> Result<stream::Stream, BusError> {
    let wanted = stream::Config {
        name: config.stream.clone(),
        description: Some("cachecast audit trail: one record per invalidation".into()),
        subjects: vec![cachecast_proto::Subjects::ALL_AUDIT.into()],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        max_age: config.max_age,
        ..Default::default()
    };
    js.get_or_create_stream(wanted)
        .await
        .map_err(|err| BusError::Stream {
            name: config.stream.clone(),
            reason: err.to_string(),
        })
}

/// Opens the invalidation stream, which a publisher must have created.
pub async fn open_stream(
    js: &JetStream,
    config: &StreamConfig,
) -> Result<stream::Stream, BusError> {
    js.get_stream(&config.name)
        .await
        .map_err(|err| BusError::Stream {
            name: config.name.clone(),
            reason: format!(
                "{err} (start `cachecast serve` once to create it; a process at a site behind a leaf node sets nats.jetstream_domain to the hub's JetStream domain)"
            ),
        })
}

/// Creates the presence bucket, or opens it if it exists.
pub async fn ensure_presence_bucket(
    js: &JetStream,
    config: &PresenceConfig,
) -> Result<kv::Store, BusError> {
    let wanted = kv::Config {
        bucket: config.bucket.clone(),
        description: "cachecast agent presence: key <env>.<agentId>".into(),
        history: 1,
        num_replicas: config.replicas,
        max_age: config.max_age,
        ..Default::default()
    };
    ensure_bucket(js, wanted, |name, reason| BusError::Presence {
        name,
        reason,
    })
    .await
}

/// Creates the caches bucket, or opens it if it exists.
pub async fn ensure_caches_bucket(
    js: &JetStream,
    config: &CachesConfig,
) -> Result<kv::Store, BusError> {
    let wanted = kv::Config {
        bucket: config.bucket.clone(),
        description: "cachecast persistent caches: key <env>.<cacheId>".into(),
        history: 1,
        num_replicas: config.replicas,
        ..Default::default()
    };
    ensure_bucket(js, wanted, |name, reason| BusError::Caches { name, reason }).await
}

/// Opens the bucket `wanted` names, or creates it as `wanted` says.
async fn ensure_bucket(
    js: &JetStream,
    wanted: kv::Config,
    error: fn(String, String) -> BusError,
) -> Result<kv::Store, BusError> {
    if let Ok(store) = js.get_key_value(&wanted.bucket).await {
        return Ok(store);
    }
    let name = wanted.bucket.clone();
    js.create_key_value(wanted)
        .await
        .map_err(|err| error(name, err.to_string()))
}

/// Opens the caches bucket, which a publisher must have created.
pub async fn open_caches_bucket(
    js: &JetStream,
    config: &CachesConfig,
) -> Result<kv::Store, BusError> {
    js.get_key_value(&config.bucket)
        .await
        .map_err(|err| BusError::Caches {
            name: config.bucket.clone(),
            reason: format!("{err} (start a current `cachecast serve` once to create it)"),
        })
}

/// Opens the presence bucket, which a publisher must have created.
pub async fn open_presence_bucket(
    js: &JetStream,
    config: &PresenceConfig,
) -> Result<kv::Store, BusError> {
    js.get_key_value(&config.bucket)
        .await
        .map_err(|err| BusError::Presence {
            name: config.bucket.clone(),
            reason: format!(
                "{err} (start `cachecast serve` once to create it; a process at a site behind a leaf node sets nats.jetstream_domain to the hub's JetStream domain)"
            ),
        })
}
