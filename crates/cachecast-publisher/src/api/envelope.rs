//! The NATS service's request envelope, as bytes come in: a `cachecast.v1.InvalidateRequest`
//! in protobuf, or its JSON form `{"response" | "identity" | "keyed": {...}, "requestId",
//! "timeout"}`, whose selectors are read by the same parsers as the HTTP bodies.

use std::collections::HashMap;
use std::time::Duration;

use cachecast_proto::{InvalidateRequest, Target, Wire};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::refusal::Refusal;
use super::{ApiConfig, limits, parse};

/// The encoding a request came in, and its reply goes out in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Json,
    Protobuf,
}

impl Encoding {
    /// JSON when the payload starts an object or the content type says so; else protobuf.
    pub(crate) fn of(payload: &[u8], content_type: Option<&str>) -> Self {
        if payload.first() == Some(&b'{')
            || content_type.is_some_and(|v| v.starts_with("application/json"))
        {
            Encoding::Json
        } else {
            Encoding::Protobuf
        }
    }
}

/// A request as read, before it is published.
#[derive(Debug)]
pub(crate) struct Envelope {
    pub(crate) request_id: Option<String>,
    pub(crate) timeout: Duration,
    pub(crate) target: Target,
}

/// Reads one request in `encoding`.
pub(crate) fn parse(
    encoding: Encoding,
    payload: &[u8],
    config: &ApiConfig,
) -> Result<Envelope, Refusal> {
    match encoding {
        Encoding::Json => parse_json(payload, config),
        Encoding::Protobuf => parse_protobuf(payload, config),
    }
}

fn parse_protobuf(payload: &[u8], config: &ApiConfig) -> Result<Envelope, Refusal> {
    let request = InvalidateRequest::from_bytes(payload).map_err(|err| {
        Refusal::bad_request(
            "invalid_protobuf",
            format!("{err}; send a cachecast.v1.InvalidateRequest, or JSON"),
        )
    })?;
    let target: Target = request
        .target
        .ok_or_else(|| {
            Refusal::bad_request(
                "missing_target",
                "the request names no cache: set response, identity or keyed",
            )
        })?
        .into();
    crate::validate::target(&target).map_err(|m| Refusal::bad_request("invalid_value", m))?;
    let count = match &target {
        Target::Response(selector) => selector.scope_client_ids.len(),
        Target::Keyed(selector) => selector.ids.len(),
        Target::Identity(_) => 0,
    };
    limits::check_count("the request", count, config.max_scopes, "api.max_scopes")?;
    let timeout = match request.timeout_ms {
        0 => config.default_timeout,
        ms => {
            let timeout = Duration::from_millis(u64::from(ms));
            if timeout > config.max_timeout {
                return Err(Refusal::bad_request(
                    "invalid_timeout",
                    format!(
                        "timeout_ms must be at most {}",
                        config.max_timeout.as_millis()
                    ),
                ));
            }
            timeout
        }
    };
    Ok(Envelope {
        request_id: Some(request.request_id).filter(|id| !id.is_empty()),
        timeout,
        target,
    })
}

fn parse_json(payload: &[u8], config: &ApiConfig) -> Result<Envelope, Refusal> {
    // As the HTTP API reads a body: encoding, duplicate keys, an object.
    let fields = limits::json_object(payload)?;
    // The nested objects as they were sent, so the HTTP parsers see (and refuse) exactly what
    // came, duplicate keys included.
    let raw: HashMap<String, Box<RawValue>> = serde_json::from_slice(payload)
        .map_err(|err| Refusal::bad_request("invalid_json", err.to_string()))?;
    const FIELDS: &[&str] = &["response", "identity", "keyed", "requestId", "timeout"];
    if let Some(name) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(Refusal::bad_request(
            "unknown_field",
            format!(
                "unknown field {name:?}; the fields are {}",
                FIELDS.join(", ")
            ),
        ));
    }
    let string = |name: &str| -> Result<Option<String>, Refusal> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Refusal::bad_request(
                "invalid_field_type",
                format!("{name} must be a string"),
            )),
        }
    };
    let timeout = match string("timeout")? {
        Some(value) => parse::timeout(&value, config)?,
        None => config.default_timeout,
    };
    let request_id = string("requestId")?;
    let kinds: Vec<&str> = ["response", "identity", "keyed"]
        .into_iter()
        .filter(|k| fields.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    let [kind] = kinds.as_slice() else {
        return Err(Refusal::bad_request(
            "missing_target",
            "name exactly one cache: response, identity or keyed",
        ));
    };
    let inner = &fields[*kind];
    let inner_raw = raw.get(*kind).map_or(&b""[..], |v| v.get().as_bytes());
    let target = match *kind {
        "response" => Target::Response(parse::response_selector(inner_raw, config)?),
        "identity" => Target::Identity(parse::identity_selector(inner_raw)?),
        _ => {
            limits::json_object(inner_raw)?;
            Target::Keyed(keyed_json(inner, config)?)
        }
    };
    Ok(Envelope {
        request_id,
        timeout,
        target,
    })
}

/// `{"cache": "apikeys", "ids": "k1,k2" | ["k1", "k2"] | "*"}`.
fn keyed_json(
    value: &Value,
    config: &ApiConfig,
) -> Result<cachecast_proto::KeyedSelector, Refusal> {
    let shape = || {
        Refusal::bad_request(
            "invalid_field_type",
            "keyed must be {\"cache\": \"<name>\", \"ids\": \"id1,id2\" or [\"id1\", \"id2\"] or \"*\"}",
        )
    };
    let Value::Object(fields) = value else {
        return Err(shape());
    };
    let fields: &Map<String, Value> = fields;
    if fields.keys().any(|k| k != "cache" && k != "ids") {
        return Err(shape());
    }
    let Some(Value::String(cache)) = fields.get("cache") else {
        return Err(shape());
    };
    let ids = match fields.get("ids") {
        Some(Value::String(ids)) => ids.clone(),
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                let Value::String(id) = item else {
                    return Err(shape());
                };
                if id.contains(',') {
                    return Err(Refusal::bad_request(
                        "invalid_value",
                        format!("id {id:?} contains ','"),
                    ));
                }
                ids.push(id.as_str());
            }
            ids.join(",")
        }
        _ => return Err(shape()),
    };
    parse::keyed_selector(cache, &ids, config)
}
