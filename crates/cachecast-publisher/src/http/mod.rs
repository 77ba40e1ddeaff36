//! The HTTP API, compatible with PlainID's "invalidate PDP response cache" call.
//!
//! `POST /api/1.0/runtime/caches/response/{envId}/invalidate` with a JSON body (`{}` for
//! everything, or `scopeClientId` / `scopeClientIds` and/or `identityId`). `200` only when every
//! agent live in the environment confirmed; `424` naming each one that did not; `503` when the
//! bus could not take the event. Every answer carries the request id.

mod authz;
mod error;
mod limits;
pub mod rate_limit;
mod request;
mod response;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use cachecast_proto::EnvId;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

pub use self::authz::authorize;
pub use self::error::ApiError;
pub use self::response::outcome_json;

use crate::auth::{Reach, Verifier};
use crate::publisher::{InvalidationRequest, PublishError, Publisher};

/// The response header that echoes the request id.
pub const REQUEST_ID_RESPONSE_HEADER: &str = "requestid";

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
        }
    }
}

/// What the handlers share.
#[derive(Debug)]
struct Api {
    publisher: Publisher,
    verifier: Verifier,
    limiter: rate_limit::RateLimiter,
    config: ApiConfig,
}

/// The API's routes.
pub fn router(publisher: Publisher, verifier: Verifier, config: ApiConfig) -> Router {
    let api = Arc::new(Api {
        publisher,
        verifier,
        limiter: rate_limit::RateLimiter::new(
            config.rate_limit_per_second,
            config.rate_limit_burst,
        ),
        config,
    });
    Router::new()
        .route(
            "/api/1.0/runtime/caches/response/{env_id}/invalidate",
            post(invalidate_response),
        )
        .fallback(|headers: HeaderMap| async move {
            refuse(
                &headers,
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
            )
        })
        .method_not_allowed_fallback(|headers: HeaderMap| async move {
            refuse(
                &headers,
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "use POST for invalidations",
                ),
            )
        })
        .with_state(api)
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Answers are small and latency is the point: no Nagle delay.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// An error answer carrying the caller's request id (or a new one).
fn refuse(headers: &HeaderMap, err: ApiError) -> Response {
    match request::request_id(headers) {
        Ok(id) => err.with_request_id(&id).into_response(),
        Err(invalid_id) => invalid_id.into_response(),
    }
}

async fn invalidate_response(
    State(api): State<Arc<Api>>,
    env: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = match request::request_id(&headers) {
        Ok(id) => id,
        Err(err) => return err.into_response(),
    };
    // A path that does not even decode (bad percent-encoding) is an invalid environment id.
    let env = env.map(|Path(env)| env).unwrap_or_default();
    let span = tracing::info_span!("request", request_id = %request_id, env = %env);
    match api
        .invalidate_response(&request_id, &env, query.as_deref(), &headers, body)
        .instrument(span.clone())
        .await
    {
        Ok(response) => response,
        Err(err) => {
            span.in_scope(|| {
                if err.status.is_server_error() {
                    tracing::warn!(status = err.status.as_u16(), code = err.code, message = %err.message, "request not served");
                } else {
                    tracing::info!(status = err.status.as_u16(), code = err.code, "request refused");
                }
            });
            metrics::counter!("cachecast_http_refused_total", "code" => err.code).increment(1);
            err.with_request_id(&request_id).into_response()
        }
    }
}

impl Api {
    async fn invalidate_response(
        &self,
        request_id: &str,
        env: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Response, ApiError> {
        let grant = authz::authenticate(&self.verifier, &self.limiter, headers).await?;
        let env = EnvId::new(env)
            .map_err(|err| ApiError::bad_request("invalid_env_id", err.to_string()))?;
        authz::environment(&grant, env.as_str())?;
        let timeout = request::timeout(query, &self.config)?;
        request::check_content_type(headers)?;
        limits::check_content_encoding(headers)?;
        let body = read_body(body, self.config.max_body_bytes).await?;
        let selector = request::response_selector(&body, &self.config)?;
        authz::authorize(&grant, env.as_str(), Reach::of_response(&selector))?;

        let outcome = self
            .publisher
            .invalidate(InvalidationRequest {
                env,
                selector,
                request_id: request_id.to_owned(),
                timeout,
            })
            .await
            .map_err(|err| match err {
                PublishError::Unavailable(reason) => ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "bus_unavailable",
                        format!(
                            "the invalidation was not published ({reason}); it is safe to retry"
                        ),
                    )
                },
                PublishError::Invalid(message) => ApiError::bad_request("invalid_value", message),
            })?;
        tracing::info!(
            sequence = outcome.sequence,
            total = outcome.agents.len(),
            successful = outcome.successful(),
            took_ms = outcome.took.as_millis() as u64,
            "invalidation answered"
        );
        Ok(response::outcome(&outcome))
    }
}

/// Parses the body of a response-cache invalidation as the API does (for fuzzing and property
/// tests): a selector, or the error the API would answer, whose `code` is one of
/// [`BODY_ERROR_CODES`]. Never panics.
pub fn parse_response_body(
    body: &[u8],
    config: &ApiConfig,
) -> Result<cachecast_proto::ResponseSelector, ApiError> {
    request::response_selector(body, config)
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

/// How long a client may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let read = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit));
    match read.await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(err)) if is_length_limit(&err) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body exceeds {limit} bytes"),
        )),
        Ok(Err(err)) => Err(ApiError::bad_request(
            "invalid_body",
            format!("the body could not be read: {err}"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the body did not arrive within {BODY_TIMEOUT:?}"),
        )),
    }
}

fn is_length_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}
