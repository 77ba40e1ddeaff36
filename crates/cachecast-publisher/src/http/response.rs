//! The HTTP rendering of the API's answers.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::REQUEST_ID_RESPONSE_HEADER;
use crate::api::outcome_body;
use crate::outcome::Outcome;

/// Adds the request id header to an answer.
pub(crate) fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(id) = HeaderValue::from_str(request_id) {
        response
            .headers_mut()
            .insert(REQUEST_ID_RESPONSE_HEADER, id);
    }
    response
}

/// The HTTP answer to `outcome`: `200` when every expected agent confirmed, else `424`.
/// `cluster_name` is set for keyed caches, which answer Elasticsearch's way.
pub(crate) fn outcome(outcome: &Outcome, cluster_name: Option<&str>) -> Response {
    let body = outcome_body(outcome, cluster_name);
    let status = StatusCode::from_u16(body.status).unwrap_or(StatusCode::FAILED_DEPENDENCY);
    with_request_id(
        (status, axum::Json(body)).into_response(),
        &outcome.request_id,
    )
}
