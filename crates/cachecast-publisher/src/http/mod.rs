//! The HTTP API.
//!
//! - `POST /api/1.0/runtime/caches/response/{envId}/invalidate`, compatible with PlainID's
//!   "invalidate PDP response cache" call: a JSON body (`{}` for everything, or
//!   `scopeClientId` / `scopeClientIds` and/or `identityId`).
//! - `POST /api/1.0/runtime/caches/identity/{envId}/invalidate`: `identityTemplate` and/or
//!   `identityId`.
//! - `POST /api/1.0/runtime/caches/keyed/{envId}/{cache}/{ids}/_clear_cache`: Elasticsearch's
//!   clear-cache semantics (comma-separated ids, `*` for all).
//! - `GET /api/1.0/requests/{requestId}`: the status of a `?wait_for_completion=false` request.
//! - `GET /openapi.json`: the OpenAPI 3.1 document of all of the above.
//!
//! `200` only when every agent expected confirmed; `424` naming each one that did not; `503`
//! when the bus could not take the event. Every answer carries the request id.

mod authz;
mod error;
mod openapi;
pub mod rate_limit;
mod requests;
mod response;
mod ui;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cachecast_proto::{EnvId, Target};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

pub use self::authz::authorize;
pub use self::openapi::openapi_json;

use crate::api::answer::{AcceptedBody, RequestStatusBody};
use crate::api::{ApiConfig, Class, ErrorBody, InventoryBody, Refusal, limits, parse};
use crate::auth::{Reach, Verifier};
use crate::publisher::{InvalidationRequest, Publisher};

/// The response header that echoes the request id.
pub const REQUEST_ID_RESPONSE_HEADER: &str = "requestid";

/// What the handlers share.
#[derive(Debug)]
struct Api {
    publisher: Publisher,
    verifier: Verifier,
    limiter: rate_limit::RateLimiter,
    config: ApiConfig,
    requests: Arc<requests::Requests>,
}

/// The API's routes, and the work that answers other replicas asking about this one's
/// asynchronous requests (a status `GET` may reach any replica): the caller runs it next to
/// the routes and stops it with them.
pub fn router(
    publisher: Publisher,
    verifier: Verifier,
    config: ApiConfig,
) -> (Router, impl Future<Output = ()> + Send + 'static) {
    let api = Arc::new(Api {
        publisher,
        verifier,
        requests: Arc::new(requests::Requests::new(
            config.async_retention,
            config.async_max_requests,
        )),
        limiter: rate_limit::RateLimiter::new(
            config.rate_limit_per_second,
            config.rate_limit_burst,
        ),
        config,
    });
    let peers = requests::answer_peers(
        api.publisher.client().clone(),
        Arc::downgrade(&api.requests),
    );
    let routes = Router::new()
        .route(
            "/api/1.0/runtime/caches/response/{env_id}/invalidate",
            post(invalidate_response),
        )
        .route(
            "/api/1.0/runtime/caches/identity/{env_id}/invalidate",
            post(invalidate_identity),
        )
        .route(
            "/api/1.0/runtime/caches/keyed/{env_id}/{cache}/{ids}/_clear_cache",
            post(clear_keyed),
        )
        .route("/api/1.0/requests/{request_id}", get(request_status))
        .route(
            "/api/1.0/runtime/caches/{env_id}/{cache_id}",
            axum::routing::delete(forget_cache),
        )
        .route("/api/1.0/runtime/caches/{env_id}", get(inventory))
        .route("/api/1.0/runtime/environments", get(environments))
        .route("/api/1.0/runtime/invalidations/{env_id}", get(invalidations))
        .route("/openapi.json", get(openapi::serve))
        .merge(ui::routes())
        .fallback(|headers: HeaderMap| async move {
            refuse(
                &headers,
                Refusal::new(
                    Class::NotFound,
                    "not_found",
                    "no such endpoint; see /openapi.json",
                ),
            )
        })
        .method_not_allowed_fallback(|headers: HeaderMap| async move {
            refuse(
                &headers,
                Refusal::new(
                    Class::MethodNotAllowed,
                    "method_not_allowed",
                    "use POST for invalidations, GET for request status and an environment's caches, DELETE to forget a cache; see /openapi.json",
                ),
            )
        })
        .with_state(api);
    (routes, peers)
}

/// Serves `router` on `listener` within the API's connection limits until `shutdown` resolves,
/// then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    config: &ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    cachecast_admin::server::serve(listener, router, config.connection_limits(), shutdown).await
}

/// The caller's request id header (`RequestID`, else `X-Request-ID`); `""` when not text.
fn request_id_header(headers: &HeaderMap) -> Option<&str> {
    header_text(headers, "requestid").or_else(|| header_text(headers, "x-request-id"))
}

/// A header's value; `""` when it is not text.
fn header_text(headers: &HeaderMap, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
    headers.get(name).map(|v| v.to_str().unwrap_or_default())
}

/// An error answer carrying the caller's request id (or a new one).
fn refuse(headers: &HeaderMap, err: Refusal) -> Response {
    match parse::request_id(request_id_header(headers)) {
        Ok(id) => err.with_request_id(&id).into_response(),
        Err(invalid_id) => invalid_id.into_response(),
    }
}

/// Which cache an invalidation is for, with what its path named.
#[derive(Debug)]
enum Kind {
    Response,
    Identity,
    Keyed { cache: String, ids: String },
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Self::Response => "response",
            Self::Identity => "identity",
            Self::Keyed { .. } => "keyed",
        }
    }
}

/// The parts every invalidation handler receives.
struct Call {
    request_id: String,
    env: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Body,
}

/// Runs an invalidation of `kind` once the request id is read (a bad one is refused at once).
async fn enter(
    api: &Arc<Api>,
    kind: Kind,
    env: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match parse::request_id(request_id_header(&headers)) {
        Ok(request_id) => {
            let call = Call {
                request_id,
                env,
                query,
                headers,
                body,
            };
            api.handle(kind, call).await
        }
        Err(invalid_request_id) => invalid_request_id.into_response(),
    }
}

/// Invalidates PDP response cache entries of an environment (PlainID-compatible).
#[utoipa::path(
    post,
    path = "/api/1.0/runtime/caches/response/{envId}/invalidate",
    tag = "invalidation",
    params(openapi::EnvPath, openapi::InvalidateQuery),
    request_body(content = openapi::ResponseInvalidation, content_type = "application/json"),
    responses(openapi::InvalidationAnswers)
)]
async fn invalidate_response(
    State(api): State<Arc<Api>>,
    env: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // A path that does not even decode (bad percent-encoding) is an invalid environment id.
    let env = env.map(|Path(env)| env).unwrap_or_default();
    enter(&api, Kind::Response, env, query, headers, body).await
}

/// Invalidates identity cache entries of an environment: those of a template, of an
/// identity id, or both.
#[utoipa::path(
    post,
    path = "/api/1.0/runtime/caches/identity/{envId}/invalidate",
    tag = "invalidation",
    params(openapi::EnvPath, openapi::InvalidateQuery),
    request_body(content = openapi::IdentityInvalidation, content_type = "application/json"),
    responses(openapi::InvalidationAnswers)
)]
async fn invalidate_identity(
    State(api): State<Arc<Api>>,
    env: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let env = env.map(|Path(env)| env).unwrap_or_default();
    enter(&api, Kind::Identity, env, query, headers, body).await
}

/// Clears ids of a keyed cache (Elasticsearch clear-cache semantics): a comma-separated id
/// list, or `*` for every entry. Only agents serving the cache are expected.
#[utoipa::path(
    post,
    path = "/api/1.0/runtime/caches/keyed/{envId}/{cache}/{ids}/_clear_cache",
    tag = "invalidation",
    params(openapi::KeyedPath, openapi::InvalidateQuery),
    responses(openapi::InvalidationAnswers)
)]
async fn clear_keyed(
    State(api): State<Arc<Api>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (env, cache, ids) = path.map(|Path(p)| p).unwrap_or_default();
    enter(&api, Kind::Keyed { cache, ids }, env, query, headers, body).await
}

/// The status of an asynchronous request: each expected agent's state, then the outcome.
#[utoipa::path(
    get,
    path = "/api/1.0/requests/{requestId}",
    tag = "invalidation",
    params(openapi::RequestPath),
    responses(
        (status = 200, description = "The request's state", body = RequestStatusBody),
        (status = 400, description = "Bad request id header", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 404, description = "No such request here (expired, another replica, or not granted)", body = ErrorBody),
        (status = 429, description = "Too many requests for this token", body = ErrorBody),
        (status = 503, description = "The token's keys could not be fetched (JWKS): retry after `Retry-After`", body = ErrorBody),
    )
)]
async fn request_status(
    State(api): State<Arc<Api>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let request_id = match parse::request_id(request_id_header(&headers)) {
        Ok(id) => id,
        Err(err) => return err.into_response(),
    };
    let wanted = id.map(|Path(id)| id).unwrap_or_default();
    let answer = match authz::authenticate(&api.verifier, &api.limiter, &headers).await {
        Ok(grant) => {
            let visible = |env: &str| grant.allows(env);
            let local = api.requests.status(&wanted, |env| visible(env.as_str()));
            let status = match local {
                Some(status) => Some(status),
                None => requests::ask_peers(api.publisher.client(), &wanted)
                    .await
                    .filter(|status| visible(&status.env_id)),
            };
            status.ok_or_else(|| {
                Refusal::new(
                    Class::NotFound,
                    "unknown_request",
                    format!(
                        "no asynchronous request {wanted:?}: it finished more than {} ago, was never made with wait_for_completion=false, its replica stopped, or it is in an environment the token does not grant",
                        humantime::format_duration(api.config.async_retention)
                    ),
                )
            })
        }
        Err(err) => Err(err),
    };
    match answer {
        Ok(status) => response::with_request_id(axum::Json(status).into_response(), &request_id),
        Err(err) => err.with_request_id(&request_id).into_response(),
    }
}

/// Lists an environment's persistent caches and live agents: each cache's state (attended,
/// lagging, or unattended and since when), how far it and each agent are in the stream, and
/// what they serve. Needs the read right.
#[utoipa::path(
    get,
    path = "/api/1.0/runtime/caches/{envId}",
    tag = "caches",
    params(openapi::EnvPath),
    responses(
        (status = 200, description = "The environment's caches and agents", body = InventoryBody),
        (status = 400, description = "Bad environment id", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token lacks the environment or the read right", body = ErrorBody),
        (status = 429, description = "Too many requests for this token", body = ErrorBody),
        (status = 503, description = "This publisher's view of the agents and caches is not complete, or the token's keys could not be fetched: retry", body = ErrorBody),
    )
)]
async fn inventory(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let env = path.map(|Path(p)| p).unwrap_or_default();
    answer_json(&api, &headers, async |grant| {
        let env = env_id(&env)?;
        authz::authorize_read(&grant, env.as_str())?;
        ready(&api)?;
        Ok(InventoryBody::new(
            &env,
            &api.publisher.caches(&env),
            &api.publisher.live_agents(&env),
        ))
    })
    .await
}

/// The environments this publisher knows (a live agent or a registered cache) that the token
/// may read. Needs the read right.
#[utoipa::path(
    get,
    path = "/api/1.0/runtime/environments",
    tag = "caches",
    responses(
        (status = 200, description = "The environments", body = EnvironmentsBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token lacks the read right", body = ErrorBody),
        (status = 429, description = "Too many requests for this token", body = ErrorBody),
        (status = 503, description = "This publisher's view is not complete, or the token's keys could not be fetched: retry", body = ErrorBody),
    )
)]
async fn environments(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    answer_json(&api, &headers, async |grant| {
        ready(&api)?;
        let known = api.publisher.environments();
        let readable = authz::readable(&grant, &known)?;
        Ok(EnvironmentsBody {
            environments: readable.into_iter().map(ToString::to_string).collect(),
        })
    })
    .await
}

/// The environments a token may read.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvironmentsBody {
    pub environments: Vec<String>,
}

/// Pages through the environment's audit trail, newest first: each invalidation's caller (the
/// token's `sub`), target, request and event ids, stream sequence and outcome, with each cache
/// that did not confirm and why. Records are kept `audit.max_age`. Needs the read right.
#[utoipa::path(
    get,
    path = "/api/1.0/runtime/invalidations/{envId}",
    tag = "audit",
    params(openapi::EnvPath, openapi::AuditQuery),
    responses(
        (status = 200, description = "A page of records, newest first", body = crate::audit::AuditPage),
        (status = 400, description = "Bad environment id or query", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token lacks the environment or the read right", body = ErrorBody),
        (status = 429, description = "Too many requests for this token", body = ErrorBody),
        (status = 503, description = "The audit trail cannot be read now, or the token's keys could not be fetched: retry", body = ErrorBody),
    )
)]
async fn invalidations(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let env = path.map(|Path(p)| p).unwrap_or_default();
    answer_json(&api, &headers, async |grant| {
        let env = env_id(&env)?;
        authz::authorize_read(&grant, env.as_str())?;
        let (limit, before) = parse::audit_query(query.as_deref())?;
        api.publisher
            .invalidations(&env, limit, before)
            .await
            .map_err(|why| {
                Refusal::new(
                    Class::Unavailable,
                    "audit_unavailable",
                    format!("{why}; retry shortly"),
                )
                .retry_after(1)
            })
    })
    .await
}

/// The shape of every endpoint that answers JSON from a verified token (all but the
/// invalidations themselves): the request id, authentication, then `answer`, rendered with the
/// request id.
async fn answer_json<T: Serialize>(
    api: &Api,
    headers: &HeaderMap,
    answer: impl AsyncFnOnce(crate::auth::Grant) -> Result<T, Refusal>,
) -> Response {
    let request_id = match parse::request_id(request_id_header(headers)) {
        Ok(id) => id,
        Err(err) => return err.into_response(),
    };
    let answered = match authz::authenticate(&api.verifier, &api.limiter, headers).await {
        Ok(grant) => answer(grant).await,
        Err(err) => Err(err),
    };
    match answered {
        Ok(body) => response::with_request_id(axum::Json(body).into_response(), &request_id),
        Err(err) => err.with_request_id(&request_id).into_response(),
    }
}

/// An environment id from a path.
fn env_id(env: &str) -> Result<EnvId, Refusal> {
    EnvId::new(env).map_err(|err| Refusal::bad_request("invalid_env_id", err.to_string()))
}

/// `503` while this publisher's view of the agents and caches is not complete.
fn ready(api: &Api) -> Result<(), Refusal> {
    api.publisher.readiness().map_err(|why| {
        Refusal::new(
            Class::Unavailable,
            "not_ready",
            format!("{why}; retry shortly"),
        )
        .retry_after(1)
    })
}

/// The answer to forgetting a persistent cache.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForgottenBody {
    pub env_id: String,
    pub cache_id: String,
    /// Always true: requests no longer expect this cache.
    pub forgotten: bool,
}

/// Forgets a persistent cache that is gone for good (decommissioned): requests stop
/// expecting it, so they no longer answer `424 unattended` for it. Needs the flush right. An
/// agent that attends the cache again registers it again.
#[utoipa::path(
    delete,
    path = "/api/1.0/runtime/caches/{envId}/{cacheId}",
    tag = "caches",
    params(openapi::CachePath),
    responses(
        (status = 200, description = "Forgotten", body = ForgottenBody),
        (status = 400, description = "Bad environment or cache id", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token lacks the environment or the flush right", body = ErrorBody),
        (status = 404, description = "No such cache is registered", body = ErrorBody),
        (status = 429, description = "Too many requests for this token", body = ErrorBody),
        (status = 503, description = "NATS is unavailable, or the token's keys could not be fetched: retry", body = ErrorBody),
    )
)]
async fn forget_cache(
    State(api): State<Arc<Api>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let (env, cache) = path.map(|Path(p)| p).unwrap_or_default();
    answer_json(&api, &headers, async |grant| {
        let env = env_id(&env)?;
        let cache = cachecast_proto::CacheId::new(cache.as_str())
            .map_err(|err| Refusal::bad_request("invalid_cache_id", err.to_string()))?;
        authorize(&grant, env.as_str(), Reach::Flush)?;
        match api.publisher.forget_cache(&env, &cache).await {
            Ok(true) => Ok(ForgottenBody {
                env_id: env.to_string(),
                cache_id: cache.to_string(),
                forgotten: true,
            }),
            Ok(false) => Err(Refusal::new(
                Class::NotFound,
                "unknown_cache",
                format!("no cache {cache} is registered in {env}; `cachecast caches --env {env}` lists them"),
            )),
            Err(err) => Err(Refusal::from(err)),
        }
    })
    .await
}

impl Api {
    async fn handle(self: &Arc<Self>, kind: Kind, call: Call) -> Response {
        let span = tracing::info_span!("request", request_id = %call.request_id, env = %call.env, kind = kind.name());
        let request_id = call.request_id.clone();
        match self.invalidate(kind, call).instrument(span.clone()).await {
            Ok(response) => response,
            Err(err) => {
                span.in_scope(|| {
                    if err.status() >= 500 {
                        tracing::warn!(status = err.status(), code = err.code, message = %err.message, "request not served");
                    } else {
                        tracing::info!(status = err.status(), code = err.code, "request refused");
                    }
                });
                metrics::counter!("cachecast_http_refused_total", "code" => err.code).increment(1);
                err.with_request_id(&request_id).into_response()
            }
        }
    }

    async fn invalidate(self: &Arc<Self>, kind: Kind, call: Call) -> Result<Response, Refusal> {
        let grant = authz::authenticate(&self.verifier, &self.limiter, &call.headers).await?;
        let env = EnvId::new(call.env.as_str())
            .map_err(|err| Refusal::bad_request("invalid_env_id", err.to_string()))?;
        authz::environment(&grant, env.as_str())?;
        let query = parse::query(call.query.as_deref(), &self.config)?;
        let keyed = matches!(kind, Kind::Keyed { .. });
        if !keyed {
            parse::check_content_type(header_text(&call.headers, header::CONTENT_TYPE))?;
        }
        limits::check_content_encoding(
            call.headers
                .get_all(header::CONTENT_ENCODING)
                .iter()
                .map(|v| v.to_str().ok()),
        )?;
        let body = read_body(call.body, self.config.max_body_bytes).await?;
        let target = match &kind {
            Kind::Response => Target::Response(parse::response_selector(&body, &self.config)?),
            Kind::Identity => Target::Identity(parse::identity_selector(&body)?),
            Kind::Keyed { cache, ids } => {
                parse::empty_body(&body)?;
                Target::Keyed(parse::keyed_selector(cache, ids, &self.config)?)
            }
        };
        let reach = if target.is_full_flush() {
            Reach::Flush
        } else {
            Reach::Scoped
        };
        authz::authorize(&grant, env.as_str(), reach)?;
        let cluster_name = keyed.then(|| self.config.cluster_name.clone());
        if !query.wait_for_completion {
            self.requests
                .check(&call.request_id)
                .map_err(register_error)?;
        }
        let request = InvalidationRequest {
            env: env.clone(),
            target,
            request_id: call.request_id,
            timeout: query.timeout,
            caller: grant.subject.clone(),
        };
        let in_flight = self.publisher.begin(request).await.map_err(Refusal::from)?;
        if !query.wait_for_completion {
            return self.accept(in_flight, &env, kind.name(), cluster_name);
        }
        let outcome = {
            let mut in_flight = in_flight;
            while in_flight.next_ack().await.is_some() {}
            in_flight.finish()
        };
        tracing::info!(
            sequence = outcome.sequence,
            total = outcome.agents.len(),
            successful = outcome.successful(),
            took_ms = outcome.took.as_millis() as u64,
            "invalidation answered"
        );
        Ok(response::outcome(&outcome, cluster_name.as_deref()))
    }

    /// Answers `202` for a published request and follows its acks in the background.
    fn accept(
        self: &Arc<Self>,
        in_flight: crate::InFlight,
        env: &EnvId,
        kind: &'static str,
        cluster_name: Option<String>,
    ) -> Result<Response, Refusal> {
        let request_id = in_flight.request_id().to_owned();
        // The check before publishing makes a refusal here rare (two requests racing with one
        // id); the event is published either way, and invalidating twice is harmless.
        self.requests
            .register(&in_flight, env, kind, cluster_name)
            .map_err(register_error)?;
        let location = format!("/api/1.0/requests/{}", path_segment(&request_id));
        let body = AcceptedBody {
            status: 202,
            request_id: request_id.clone(),
            env_id: env.to_string(),
            event_id: in_flight.event_id().to_owned(),
            sequence: in_flight.sequence(),
            expected: in_flight.agents().len(),
            location: location.clone(),
        };
        let api = Arc::clone(self);
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                let outcome = api.requests.follow(in_flight).await;
                tracing::info!(
                    total = outcome.agents.len(),
                    successful = outcome.successful(),
                    took_ms = outcome.took.as_millis() as u64,
                    "asynchronous invalidation finished"
                );
            }
            .instrument(span),
        );
        let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, value);
        }
        Ok(response::with_request_id(response, &request_id))
    }
}

/// `value` percent-encoded as one path segment (a request id may hold `/`, `?`, `#`, `%`...).
fn path_segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn register_error(err: requests::RegisterError) -> Refusal {
    match err {
        requests::RegisterError::Duplicate(_) => {
            Refusal::new(Class::Conflict, "request_id_in_use", err.to_string())
        }
        requests::RegisterError::Full(_) => Refusal::new(
            Class::Unavailable,
            "too_many_async_requests",
            err.to_string(),
        )
        .retry_after(1),
    }
}

/// How long a client may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of an oversized body is read and dropped so that the client, still sending, gets
/// the `413` instead of a connection reset (closing a socket with unread data resets it).
const DRAIN_LIMIT: usize = 8 * 1024 * 1024;

async fn read_body(mut body: Body, limit: usize) -> Result<bytes::Bytes, Refusal> {
    use http_body_util::BodyExt as _;
    let read = async {
        let mut kept = bytes::BytesMut::new();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|err| {
                Refusal::bad_request("invalid_body", format!("the body could not be read: {err}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            seen = seen.saturating_add(data.len());
            if seen <= limit {
                kept.extend_from_slice(&data);
            } else if seen > DRAIN_LIMIT {
                break;
            }
        }
        if seen > limit {
            return Err(Refusal::new(
                Class::TooLarge,
                "body_too_large",
                format!("the body exceeds {limit} bytes"),
            ));
        }
        Ok(kept.freeze())
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(Refusal::new(
                Class::RequestTimeout,
                "body_timeout",
                format!("the body did not arrive within {BODY_TIMEOUT:?}"),
            ))
        })
}
