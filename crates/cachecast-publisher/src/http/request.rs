//! Reading an invalidation request: request id, timeout, content type and body.
//!
//! The body is validated by hand rather than by serde derive, so every mistake gets its own
//! stable error code and a message that names the field.

use std::time::Duration;

use axum::http::{HeaderMap, header};
use cachecast_proto::ResponseSelector;
use serde_json::{Map, Value};

use super::ApiConfig;
use super::error::ApiError;
use super::limits;
use crate::validate;

/// The caller's request id (`RequestID` or `X-Request-ID`), or a new UUIDv7.
pub(crate) fn request_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let given = headers
        .get("requestid")
        .or_else(|| headers.get("x-request-id"));
    let Some(value) = given else {
        return Ok(uuid::Uuid::now_v7().to_string());
    };
    let value = value.to_str().unwrap_or_default();
    match validate::request_id(value) {
        Ok(()) => Ok(value.to_owned()),
        Err(message) => Err(ApiError::bad_request("invalid_request_id", message)
            .with_request_id(&uuid::Uuid::now_v7().to_string())),
    }
}

/// The `?timeout=` of a request, within the configured cap.
pub(crate) fn timeout(query: Option<&str>, config: &ApiConfig) -> Result<Duration, ApiError> {
    let mut timeout = config.default_timeout;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "timeout" => {
                let parsed = humantime::parse_duration(value).map_err(|_| {
                    ApiError::bad_request(
                        "invalid_timeout",
                        format!("timeout {value:?} is not a duration: use a number with a unit, like 5s or 500ms"),
                    )
                })?;
                if parsed.is_zero() || parsed > config.max_timeout {
                    return Err(ApiError::bad_request(
                        "invalid_timeout",
                        format!(
                            "timeout must be above 0 and at most {}",
                            humantime::format_duration(config.max_timeout)
                        ),
                    ));
                }
                timeout = parsed;
            }
            other => {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!("unknown query parameter {other:?}; the only one is timeout"),
                ));
            }
        }
    }
    Ok(timeout)
}

/// Refuses content types other than JSON (a missing one is taken as JSON).
pub(crate) fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let value = value.to_str().unwrap_or_default().to_ascii_lowercase();
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    // JSON is UTF-8 (RFC 8259); a charset parameter may only say so.
    let utf8 = parts.all(|p| match p.split_once('=') {
        Some((name, charset)) if name.trim() == "charset" => {
            matches!(charset.trim().trim_matches('"'), "utf-8" | "utf8")
        }
        _ => true,
    });
    if essence == "application/json" && utf8 {
        Ok(())
    } else {
        Err(ApiError::new(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json (UTF-8)",
        ))
    }
}

/// Parses the body of a response-cache invalidation.
pub(crate) fn response_selector(
    body: &[u8],
    config: &ApiConfig,
) -> Result<ResponseSelector, ApiError> {
    let fields = limits::json_object(body)?;
    for name in fields.keys() {
        if !matches!(
            name.as_str(),
            "scopeClientId" | "scopeClientIds" | "identityId"
        ) {
            return Err(ApiError::bad_request(
                "unknown_field",
                format!(
                    "unknown field {name:?}; the fields are scopeClientId, scopeClientIds and identityId"
                ),
            ));
        }
    }
    let mut scopes = Vec::new();
    if let Some(value) = present(&fields, "scopeClientId") {
        scopes.push(string_value("scopeClientId", value)?);
    }
    if let Some(value) = present(&fields, "scopeClientIds") {
        let Value::Array(items) = value else {
            return Err(wrong_type("scopeClientIds", "an array of strings"));
        };
        limits::check_count(
            "scopeClientIds",
            items.len(),
            config.max_scopes,
            "api.max_scopes",
        )?;
        if items.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_value",
                "scopeClientIds must not be empty; omit it (send {}) to invalidate every scope",
            ));
        }
        for item in items {
            scopes.push(string_value("scopeClientIds[]", item)?);
        }
    }
    scopes.sort();
    scopes.dedup();
    limits::check_count(
        "the scopes",
        scopes.len(),
        config.max_scopes,
        "api.max_scopes",
    )?;
    let identity_id = present(&fields, "identityId")
        .map(|v| string_value("identityId", v))
        .transpose()?;
    Ok(ResponseSelector {
        scope_client_ids: scopes,
        identity_id,
    })
}

/// A field's value; `null` counts as absent.
fn present<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields.get(name).filter(|v| !v.is_null())
}

fn string_value(name: &str, value: &Value) -> Result<String, ApiError> {
    let Value::String(s) = value else {
        return Err(wrong_type(name, "a string"));
    };
    validate::selector_value(name, s)
        .map_err(|message| ApiError::bad_request("invalid_value", message))?;
    Ok(s.clone())
}

fn wrong_type(name: &str, expected: &str) -> ApiError {
    ApiError::bad_request("invalid_field_type", format!("{name} must be {expected}"))
}
