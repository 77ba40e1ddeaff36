//! The OpenAPI 3.1 document of the HTTP API, served at `GET /openapi.json`.
//!
//! Generated from the code: the answers' schemas are the types the handlers serialize
//! (`response.rs`, `error.rs`), and each operation is declared on its handler. A test checks
//! that every documented operation is routed, and CI runs schemathesis against a live server.

use axum::Json;
use axum::response::IntoResponse;
use serde::Deserialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

use crate::api::ErrorBody;
use crate::api::answer::{
    AcceptedBody, AgentResult, NodeFailure, NodeInfo, NodesSummary, OutcomeBody, Progress,
    RequestStatusBody,
};

/// The body of a response-cache invalidation. `{}` invalidates every entry of the
/// environment; scopes and an identity narrow it (both: that identity within those scopes).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
pub(super) struct ResponseInvalidation {
    /// One Scope Client ID.
    #[schema(
        min_length = 1,
        max_length = 512,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    scope_client_id: Option<String>,
    /// Several Scope Client IDs (each like `scopeClientId`).
    #[schema(min_items = 1)]
    scope_client_ids: Option<Vec<String>>,
    /// One identity (the `entityId` of authorization requests).
    #[schema(
        min_length = 1,
        max_length = 512,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    identity_id: Option<String>,
}

/// The body of an identity-cache invalidation: at least one of the two.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(dead_code)]
pub(super) struct IdentityInvalidation {
    /// Every identity of this template (with `identityId`: that identity of this template).
    #[schema(
        min_length = 1,
        max_length = 512,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    identity_template: Option<String>,
    /// This identity in every template.
    #[schema(
        min_length = 1,
        max_length = 512,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    identity_id: Option<String>,
}

/// The environment in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code, non_snake_case)]
pub(super) struct EnvPath {
    /// The environment: 1 to 128 of A-Z, a-z, 0-9, `_` and `-`.
    #[param(pattern = "^[A-Za-z0-9_-]{1,128}$")]
    envId: String,
}

/// The query of an audit trail page.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct AuditQuery {
    /// How many records, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// Only records older than this `auditSequence` (the previous page's `nextBefore`).
    #[param(minimum = 1)]
    before: Option<u64>,
}

/// The path of a keyed-cache clear.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code, non_snake_case)]
pub(super) struct KeyedPath {
    /// The environment: 1 to 128 of A-Z, a-z, 0-9, `_` and `-`.
    #[param(pattern = "^[A-Za-z0-9_-]{1,128}$")]
    envId: String,
    /// The keyed cache, as the agents name it: 1 to 128 of A-Z, a-z, 0-9, `_` and `-`.
    #[param(pattern = "^[A-Za-z0-9_-]{1,128}$")]
    cache: String,
    /// Comma-separated ids to evict, or `*` alone for every entry. No other wildcard.
    #[param(pattern = r"^(\*|[^*,\x00-\x1f]+(,[^*,\x00-\x1f]+)*)$")]
    ids: String,
}

/// The path of a persistent cache.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code, non_snake_case)]
pub(super) struct CachePath {
    /// The environment: 1 to 128 of A-Z, a-z, 0-9, `_` and `-`.
    #[param(pattern = "^[A-Za-z0-9_-]{1,128}$")]
    envId: String,
    /// The cache id, as `cachecast caches` lists it: 1 to 128 of A-Z, a-z, 0-9, `_` and `-`.
    #[param(pattern = "^[A-Za-z0-9_-]{1,128}$")]
    cacheId: String,
}

/// The query of an invalidation.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct InvalidateQuery {
    /// How long to wait for acknowledgements, like `5s` or `500ms` (default and cap are
    /// configured: `api.default_timeout`, `api.max_timeout`).
    #[param(pattern = "^[1-9][0-9]{0,4}(ms|s)$")]
    timeout: Option<String>,
    /// `false`: answer `202` once published, with a `Location` to follow the acks.
    wait_for_completion: Option<bool>,
}

/// The path of a request's status.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code, non_snake_case)]
pub(super) struct RequestPath {
    /// The request id of a `?wait_for_completion=false` request.
    requestId: String,
}

/// What an invalidation can answer, whichever cache it is for.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(super) enum InvalidationAnswers {
    /// Every agent expected (live in the environment; for a keyed cache, serving it) applied
    /// the eviction.
    #[response(status = 200)]
    Confirmed(OutcomeBody),
    /// Published (`wait_for_completion=false`); follow `Location`.
    #[response(status = 202)]
    Accepted(AcceptedBody),
    /// Bad request: the `code` names the mistake.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No valid bearer token.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token does not grant this environment or right.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The body did not arrive in time.
    #[response(status = 408)]
    BodyTimeout(ErrorBody),
    /// The request id is in use by an asynchronous request.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The body is too large.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not JSON.
    #[response(status = 415)]
    NotJson(ErrorBody),
    /// Published, but not every expected agent confirmed: each is named.
    #[response(status = 424)]
    FailedDependency(OutcomeBody),
    /// Too many requests for this token: retry after `Retry-After`.
    #[response(status = 429)]
    TooMany(ErrorBody),
    /// Nothing published (the bus is unavailable): safe to retry after `Retry-After`.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cachecast",
        description = "Invalidates caches across a fleet and proves it did: 200 only when every live agent of the environment confirmed, 424 naming each one that did not.",
        license(name = "Apache-2.0")
    ),
    paths(
        super::invalidate_response,
        super::invalidate_identity,
        super::clear_keyed,
        super::request_status,
        super::inventory,
        super::environments,
        super::invalidations,
        super::forget_cache
    ),
    components(schemas(
        super::ForgottenBody,
        super::EnvironmentsBody,
        crate::api::InventoryBody,
        crate::api::CacheView,
        crate::api::AgentView,
        crate::audit::AuditPage,
        crate::audit::AuditRecord,
        crate::audit::AuditFailure,
        ResponseInvalidation,
        IdentityInvalidation,
        OutcomeBody,
        NodesSummary,
        NodeFailure,
        NodeInfo,
        AgentResult,
        AcceptedBody,
        RequestStatusBody,
        Progress,
        ErrorBody
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

/// Declares the bearer-token scheme every operation uses.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The OpenAPI document.
pub fn openapi_json() -> serde_json::Value {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    serde_json::to_value(doc).unwrap_or_default()
}

pub(super) async fn serve() -> impl IntoResponse {
    Json(openapi_json())
}
