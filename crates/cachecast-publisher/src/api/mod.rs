//! The API without a transport: the request model and its limits, parsing (every selector and
//! the NATS service's envelope, each parsed once), the one [`Refusal`] every way in answers
//! with, and the answer bodies. It knows neither axum nor the NATS service API: `http/`
//! renders it as HTTP, `service.rs` as NATS service replies.
//!
//! A request's way in reads top to bottom: bytes ([`limits`]: encoding, size of its parts),
//! a checked JSON object, a typed request ([`parse`], [`envelope`]), then authorization (by
//! the transport: a bearer token over HTTP, NATS permissions for the service), publishing, and
//! the answer ([`answer`], or a [`Refusal`]).

pub mod answer;
pub(crate) mod envelope;
pub mod inventory;
pub(crate) mod limits;
pub(crate) mod parse;
mod refusal;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::answer::{
    AcceptedBody, AgentResult, NodeFailure, NodeInfo, NodesSummary, OutcomeBody, Progress,
    RequestStatusBody, outcome_body,
};
pub use self::inventory::{AgentView, CacheView, InventoryBody};
pub use self::refusal::{Class, ErrorBody, Refusal};

/// The `[api]` configuration section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Where the API listens.
    pub listen: SocketAddr,
    /// How long a request waits for acks when it names no `?timeout=`.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// The largest `?timeout=` accepted.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The most scopes one request may name.
    pub max_scopes: usize,
    /// Requests per second one bearer token may send on average (`0`: no limit).
    pub rate_limit_per_second: f64,
    /// Requests one bearer token may send at once before the rate applies.
    pub rate_limit_burst: u32,
    /// On shutdown, how long `/readyz` answers `503` before the listener closes, so load
    /// balancers stop sending requests first (a few seconds on Kubernetes).
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// The fleet's name in keyed-cache answers (Elasticsearch's `cluster_name`).
    pub cluster_name: String,
    /// How long the status of a finished `?wait_for_completion=false` request is kept.
    #[serde(with = "humantime_serde")]
    pub async_retention: Duration,
    /// The most asynchronous request statuses kept (running ones are never dropped).
    pub async_max_requests: usize,
    /// Whether `serve` also takes requests as the `cachecast` NATS service (on
    /// `cachecast.svc.v1.<env>.invalidate`; who may call it is up to NATS permissions).
    pub nats_service: bool,
    /// How long a connection may take to send a request's headers, from when it opens or its
    /// previous answer was sent; an idle keep-alive connection is closed after as long.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// The most connections held at once; more are closed as soon as they are accepted. Keep it
    /// below the process's open-files limit (`ulimit -n`).
    pub max_connections: usize,
}

impl ApiConfig {
    /// The listener's limits on connections.
    pub fn connection_limits(&self) -> cachecast_admin::ConnectionLimits {
        cachecast_admin::ConnectionLimits {
            header_read_timeout: self.header_read_timeout,
            max_connections: self.max_connections,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            default_timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(60),
            max_body_bytes: 64 * 1024,
            max_scopes: 1000,
            rate_limit_per_second: 10.0,
            rate_limit_burst: 50,
            shutdown_delay: Duration::ZERO,
            cluster_name: "cachecast".into(),
            async_retention: Duration::from_secs(600),
            async_max_requests: 10_000,
            nats_service: true,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
        }
    }
}

/// Parses the body of a response-cache invalidation as the API does (for fuzzing and property
/// tests): a selector, or the error the API would answer, whose `code` is one of
/// [`BODY_ERROR_CODES`]. Never panics.
pub fn parse_response_body(
    body: &[u8],
    config: &ApiConfig,
) -> Result<cachecast_proto::ResponseSelector, Refusal> {
    parse::response_selector(body, config)
}

/// Every `code` [`parse_response_body`] can answer.
pub const BODY_ERROR_CODES: &[&str] = &[
    "missing_body",
    "invalid_encoding",
    "invalid_json",
    "body_not_object",
    "duplicate_field",
    "unknown_field",
    "invalid_field_type",
    "invalid_value",
    "too_many_values",
];
