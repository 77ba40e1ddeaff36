//! Reading an invalidation request: request id, query, content type, body and path ids.
//!
//! The body is validated by hand rather than by serde derive, so every mistake gets its own
//! stable error code and a message that names the field.

use std::time::Duration;

use cachecast_proto::{CacheName, IdentitySelector, KeyedSelector, ResponseSelector};
use serde_json::{Map, Value};

use super::ApiConfig;
use super::limits;
use super::refusal::{Class, Refusal};
use crate::validate;

/// The caller's request id (`given`: the `RequestID` or `X-Request-ID` header, `""` when it is
/// not text), or a new UUIDv7.
pub(crate) fn request_id(given: Option<&str>) -> Result<String, Refusal> {
    let Some(value) = given else {
        return Ok(uuid::Uuid::now_v7().to_string());
    };
    match validate::request_id(value) {
        Ok(()) => Ok(value.to_owned()),
        Err(message) => Err(Refusal::bad_request("invalid_request_id", message)
            .with_request_id(&uuid::Uuid::now_v7().to_string())),
    }
}

/// The query parameters of an invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Query {
    /// How long to wait for acks.
    pub(crate) timeout: Duration,
    /// `false`: answer `202` once published and report progress at a status resource.
    pub(crate) wait_for_completion: bool,
}

/// The `?timeout=` (within the configured cap) and `?wait_for_completion=` of a request.
pub(crate) fn query(query: Option<&str>, config: &ApiConfig) -> Result<Query, Refusal> {
    let mut parsed = Query {
        timeout: config.default_timeout,
        wait_for_completion: true,
    };
    for (name, value) in query_pairs(query) {
        match name {
            "timeout" => parsed.timeout = timeout(value, config)?,
            "wait_for_completion" => {
                parsed.wait_for_completion = match value {
                    "true" | "" => true,
                    "false" => false,
                    _ => {
                        return Err(Refusal::bad_request(
                            "invalid_parameter",
                            format!("wait_for_completion must be true or false, not {value:?}"),
                        ));
                    }
                }
            }
            other => return Err(unknown_parameter(other, "timeout and wait_for_completion")),
        }
    }
    Ok(parsed)
}

/// The query of an audit trail page: `limit` (1 to 500, default 50) and `before` (an audit
/// sequence: records older than it).
pub(crate) fn audit_query(query: Option<&str>) -> Result<(usize, Option<u64>), Refusal> {
    let (mut limit, mut before) = (50, None);
    for (name, value) in query_pairs(query) {
        match name {
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=crate::audit::MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        Refusal::bad_request(
                            "invalid_parameter",
                            format!(
                                "limit must be a number from 1 to {}, not {value:?}",
                                crate::audit::MAX_PAGE
                            ),
                        )
                    })?;
            }
            "before" => {
                before = Some(value.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    Refusal::bad_request(
                        "invalid_parameter",
                        format!("before must be a record's auditSequence (a positive number), not {value:?}"),
                    )
                })?);
            }
            other => return Err(unknown_parameter(other, "limit and before")),
        }
    }
    Ok((limit, before))
}

/// The `name=value` pairs of a query string (`name` alone has the value `""`).
fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

fn unknown_parameter(name: &str, known: &str) -> Refusal {
    Refusal::bad_request(
        "unknown_parameter",
        format!("unknown query parameter {name:?}; the parameters are {known}"),
    )
}

/// A timeout like `5s` or `500ms`, above zero and at most `api.max_timeout`.
pub(crate) fn timeout(value: &str, config: &ApiConfig) -> Result<Duration, Refusal> {
    let timeout = humantime::parse_duration(value).map_err(|_| {
        Refusal::bad_request(
            "invalid_timeout",
            format!(
                "timeout {value:?} is not a duration: use a number with a unit, like 5s or 500ms"
            ),
        )
    })?;
    if timeout.is_zero() || timeout > config.max_timeout {
        return Err(Refusal::bad_request(
            "invalid_timeout",
            format!(
                "timeout must be above 0 and at most {}",
                humantime::format_duration(config.max_timeout)
            ),
        ));
    }
    Ok(timeout)
}

/// Refuses content types other than JSON (`None`, a missing one, is taken as JSON; `""` is a
/// value that is not text).
pub(crate) fn check_content_type(value: Option<&str>) -> Result<(), Refusal> {
    let Some(value) = value else {
        return Ok(());
    };
    let value = value.to_ascii_lowercase();
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
        Err(Refusal::new(
            Class::UnsupportedMediaType,
            "unsupported_media_type",
            "send the body as Content-Type: application/json (UTF-8)",
        ))
    }
}

/// The body as a JSON object whose fields are all in `allowed` (`example` shows a valid one).
fn object_body(
    body: &[u8],
    allowed: &[&str],
    example: &str,
) -> Result<Map<String, Value>, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Refusal::bad_request(
            "missing_body",
            format!("the request body is required, like {example}"),
        ));
    }
    let fields = limits::json_object(body)?;
    if let Some(name) = fields.keys().find(|name| !allowed.contains(&name.as_str())) {
        return Err(Refusal::bad_request(
            "unknown_field",
            format!(
                "unknown field {name:?}; the fields are {}",
                allowed.join(", ")
            ),
        ));
    }
    Ok(fields)
}

/// Parses the body of a response-cache invalidation.
pub(crate) fn response_selector(
    body: &[u8],
    config: &ApiConfig,
) -> Result<ResponseSelector, Refusal> {
    let fields = object_body(
        body,
        &["scopeClientId", "scopeClientIds", "identityId"],
        "{} (every entry of the environment) or {\"scopeClientId\": \"...\"}",
    )?;
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
            return Err(Refusal::bad_request(
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

/// Parses the body of an identity-cache invalidation: `identityTemplate` and/or `identityId`.
pub(crate) fn identity_selector(body: &[u8]) -> Result<IdentitySelector, Refusal> {
    let fields = object_body(
        body,
        &["identityTemplate", "identityId"],
        "{\"identityTemplate\": \"User\", \"identityId\": \"...\"}",
    )?;
    let field = |name: &str| {
        present(&fields, name)
            .map(|v| string_value(name, v))
            .transpose()
    };
    let selector = IdentitySelector {
        identity_template: field("identityTemplate")?,
        identity_id: field("identityId")?,
    };
    if selector.identity_template.is_none() && selector.identity_id.is_none() {
        return Err(Refusal::bad_request(
            "missing_field",
            "name identityTemplate, identityId or both",
        ));
    }
    Ok(selector)
}

/// Parses the path of a keyed-cache clear: the cache name and a comma-separated id list,
/// where `*` alone means every entry and no other wildcard is accepted.
pub(crate) fn keyed_selector(
    cache: &str,
    ids: &str,
    config: &ApiConfig,
) -> Result<KeyedSelector, Refusal> {
    let cache = CacheName::new(cache)
        .map_err(|err| Refusal::bad_request("invalid_cache_name", err.to_string()))?;
    if ids == "*" {
        return Ok(KeyedSelector {
            cache: cache.to_string(),
            ids: Vec::new(),
            all: true,
        });
    }
    limits::check_count(
        "the ids",
        ids.split(',').count(),
        config.max_scopes,
        "api.max_scopes",
    )?;
    let mut list = Vec::new();
    for id in ids.split(',') {
        if id.contains('*') {
            return Err(Refusal::bad_request(
                "unsupported_wildcard",
                format!(
                    "id {id:?} is a pattern: only `*` alone (every entry) is supported; list the ids instead"
                ),
            ));
        }
        validate::keyed_id(id).map_err(|message| Refusal::bad_request("invalid_value", message))?;
        list.push(id.to_owned());
    }
    list.sort();
    list.dedup();
    Ok(KeyedSelector {
        cache: cache.to_string(),
        ids: list,
        all: false,
    })
}

/// A keyed-cache clear takes no body; an empty one or `{}` is accepted.
pub(crate) fn empty_body(body: &[u8]) -> Result<(), Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    object_body(body, &[], "{} or no body").map(|_| ())
}

/// A field's value; `null` counts as absent.
fn present<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields.get(name).filter(|v| !v.is_null())
}

fn string_value(name: &str, value: &Value) -> Result<String, Refusal> {
    let Value::String(s) = value else {
        return Err(wrong_type(name, "a string"));
    };
    validate::selector_value(name, s)
        .map_err(|message| Refusal::bad_request("invalid_value", message))?;
    Ok(s.clone())
}

fn wrong_type(name: &str, expected: &str) -> Refusal {
    Refusal::bad_request("invalid_field_type", format!("{name} must be {expected}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn audit_pages_take_a_limit_and_a_cursor() {
        use super::audit_query;
        assert_eq!(audit_query(None).ok(), Some((50, None)));
        assert_eq!(
            audit_query(Some("limit=5&before=42")).ok(),
            Some((5, Some(42)))
        );
        for bad in [
            "limit=0",
            "limit=501",
            "limit=x",
            "before=0",
            "before=-1",
            "page=2",
        ] {
            let err = audit_query(Some(bad)).expect_err(bad);
            assert_eq!(err.class, super::Class::BadRequest, "{bad}");
        }
    }

    use super::*;

    /// What a parser gives for one input: the selector (as debug text, sorted and deduplicated
    /// as it will be published) or the error code.
    fn outcome<T: std::fmt::Debug>(result: Result<T, Refusal>) -> String {
        match result {
            Ok(value) => format!("{value:?}"),
            Err(err) => format!("error {}", err.code),
        }
    }

    fn responses(body: &str) -> String {
        let config = ApiConfig {
            max_scopes: 3,
            ..ApiConfig::default()
        };
        outcome(response_selector(body.as_bytes(), &config))
    }

    #[test]
    fn response_bodies() {
        let every = r#"ResponseSelector { scope_client_ids: [], identity_id: None }"#;
        let cases: &[(&str, &str)] = &[
            ("{}", every),
            (r#"{"scopeClientId": null}"#, every),
            (
                r#"{"scopeClientId": "s1"}"#,
                r#"ResponseSelector { scope_client_ids: ["s1"], identity_id: None }"#,
            ),
            (
                r#"{"scopeClientIds": ["b", "a", "b"], "scopeClientId": "a"}"#,
                r#"ResponseSelector { scope_client_ids: ["a", "b"], identity_id: None }"#,
            ),
            (
                r#"{"identityId": "u1", "scopeClientId": "s1"}"#,
                r#"ResponseSelector { scope_client_ids: ["s1"], identity_id: Some("u1") }"#,
            ),
            ("", "error missing_body"),
            (" \n", "error missing_body"),
            ("[]", "error body_not_object"),
            ("{", "error invalid_json"),
            ("\u{feff}{}", "error invalid_encoding"),
            (r#"{"scopeClientID": "s1"}"#, "error unknown_field"),
            (
                r#"{"scopeClientId": "a", "scopeClientId": "b"}"#,
                "error duplicate_field",
            ),
            (r#"{"scopeClientId": 7}"#, "error invalid_field_type"),
            (r#"{"scopeClientIds": "s1"}"#, "error invalid_field_type"),
            (r#"{"scopeClientIds": [1]}"#, "error invalid_field_type"),
            (r#"{"scopeClientIds": []}"#, "error invalid_value"),
            (r#"{"scopeClientId": ""}"#, "error invalid_value"),
            (r#"{"identityId": "a\u0000b"}"#, "error invalid_value"),
            (
                r#"{"scopeClientIds": ["a", "b", "c", "d"]}"#,
                "error too_many_values",
            ),
            (
                r#"{"scopeClientIds": ["a", "b", "c"], "scopeClientId": "d"}"#,
                "error too_many_values",
            ),
            (
                r#"{"scopeClientIds": ["a", "b", "c"], "scopeClientId": "a"}"#,
                r#"ResponseSelector { scope_client_ids: ["a", "b", "c"], identity_id: None }"#,
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(responses(body), *expected, "body {body:?}");
        }
    }

    #[test]
    fn identity_bodies() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"identityTemplate": "User"}"#,
                r#"IdentitySelector { identity_template: Some("User"), identity_id: None }"#,
            ),
            (
                r#"{"identityTemplate": "User", "identityId": "u1"}"#,
                r#"IdentitySelector { identity_template: Some("User"), identity_id: Some("u1") }"#,
            ),
            ("{}", "error missing_field"),
            (r#"{"identityId": null}"#, "error missing_field"),
            (r#"{"scopeClientId": "s1"}"#, "error unknown_field"),
            (r#"{"identityId": ["u1"]}"#, "error invalid_field_type"),
            ("", "error missing_body"),
        ];
        for (body, expected) in cases {
            assert_eq!(
                outcome(identity_selector(body.as_bytes())),
                *expected,
                "body {body:?}"
            );
        }
    }

    #[test]
    fn keyed_paths() {
        let config = ApiConfig {
            max_scopes: 3,
            ..ApiConfig::default()
        };
        let cases: &[(&str, &str, &str)] = &[
            (
                "users",
                "*",
                r#"KeyedSelector { cache: "users", ids: [], all: true }"#,
            ),
            (
                "users",
                "b,a,b",
                r#"KeyedSelector { cache: "users", ids: ["a", "b"], all: false }"#,
            ),
            ("users", "a*", "error unsupported_wildcard"),
            ("users", "*,a", "error unsupported_wildcard"),
            ("users", "a,,b", "error invalid_value"),
            ("users", "a,b,c,d", "error too_many_values"),
            ("us ers", "a", "error invalid_cache_name"),
        ];
        for (cache, ids, expected) in cases {
            assert_eq!(
                outcome(keyed_selector(cache, ids, &config)),
                *expected,
                "cache {cache:?}, ids {ids:?}"
            );
        }
    }

    #[test]
    fn keyed_bodies() {
        for (body, expected) in [
            ("", "()"),
            ("{}", "()"),
            (r#"{"ids": ["a"]}"#, "error unknown_field"),
            ("[]", "error body_not_object"),
        ] {
            assert_eq!(
                outcome(empty_body(body.as_bytes())),
                expected,
                "body {body:?}"
            );
        }
    }

    #[test]
    fn queries() {
        let config = ApiConfig::default();
        let cases: &[(Option<&str>, &str)] = &[
            (None, "Query { timeout: 5s, wait_for_completion: true }"),
            (
                Some("timeout=500ms&wait_for_completion=false"),
                "Query { timeout: 500ms, wait_for_completion: false }",
            ),
            (
                Some("wait_for_completion"),
                "Query { timeout: 5s, wait_for_completion: true }",
            ),
            (
                Some("timeout=60s"),
                "Query { timeout: 60s, wait_for_completion: true }",
            ),
            (Some("timeout=61s"), "error invalid_timeout"),
            (Some("timeout=0s"), "error invalid_timeout"),
            (Some("timeout=5"), "error invalid_timeout"),
            (Some("wait_for_completion=yes"), "error invalid_parameter"),
            (Some("timout=5s"), "error unknown_parameter"),
        ];
        for (raw, expected) in cases {
            assert_eq!(outcome(query(*raw, &config)), *expected, "query {raw:?}");
        }
    }
}
