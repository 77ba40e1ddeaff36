//! What a request body may be before its fields are read: encoding, size of its parts, and
//! the JSON shape every endpoint shares.
//!
//! - `Content-Encoding` other than `identity`: `415 unsupported_content_encoding` (cachecast
//!   does not decompress: a small gzip body can expand without bound).
//! - Not UTF-8, a byte order mark, or NUL bytes (UTF-16): `400 invalid_encoding`.
//! - Not JSON, or nested deeper than serde_json's limit of 128: `400 invalid_json` (no stack
//!   overflow: the parser refuses before recursing further).
//! - The same field twice: `400 duplicate_field` (parsers disagree on which one wins).
//! - More values in one list than the configured limit: `400 too_many_values`, naming the key.

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::refusal::{Class, Refusal};

/// Refuses compressed bodies: every `Content-Encoding` value (`None`: not text) must be
/// `identity` or empty.
pub(crate) fn check_content_encoding<'a>(
    values: impl IntoIterator<Item = Option<&'a str>>,
) -> Result<(), Refusal> {
    for value in values {
        let identity = value.is_some_and(|v| {
            v.split(',')
                .all(|c| c.trim().is_empty() || c.trim().eq_ignore_ascii_case("identity"))
        });
        if !identity {
            return Err(Refusal::new(
                Class::UnsupportedMediaType,
                "unsupported_content_encoding",
                "send the body uncompressed (no Content-Encoding header); it is small",
            ));
        }
    }
    Ok(())
}

/// The body as a JSON object: every check that comes before reading its fields.
pub(crate) fn json_object(body: &[u8]) -> Result<Map<String, Value>, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Refusal::bad_request(
            "missing_body",
            "the request body is required: send {} to invalidate every entry of the environment",
        ));
    }
    if body.starts_with(&[0xef, 0xbb, 0xbf])
        || body.starts_with(&[0xfe, 0xff])
        || body.starts_with(&[0xff, 0xfe])
    {
        return Err(invalid_encoding("it starts with a byte order mark"));
    }
    if body.contains(&0) {
        return Err(invalid_encoding("it holds NUL bytes (UTF-16?)"));
    }
    if std::str::from_utf8(body).is_err() {
        return Err(invalid_encoding("it is not valid UTF-8"));
    }
    let value: Value = serde_json::from_slice(body).map_err(|err| {
        Refusal::bad_request("invalid_json", format!("the body is not valid JSON: {err}"))
    })?;
    let Value::Object(fields) = value else {
        return Err(Refusal::bad_request(
            "body_not_object",
            "the body must be a JSON object, like {} or {\"scopeClientId\": \"...\"}",
        ));
    };
    // serde_json keeps the last of two equal keys; refuse instead of guessing.
    if let Ok(TopLevelKeys(Some(name))) = serde_json::from_slice::<TopLevelKeys>(body) {
        let shown: String = name.chars().take(64).collect();
        return Err(Refusal::bad_request(
            "duplicate_field",
            format!("field {shown:?} appears more than once; send it once"),
        ));
    }
    Ok(fields)
}

fn invalid_encoding(why: &str) -> Refusal {
    Refusal::bad_request(
        "invalid_encoding",
        format!("the body is not plain UTF-8 JSON: {why}; send UTF-8 without a byte order mark"),
    )
}

/// At most `max` values in `field`, or `400 too_many_values` naming the configuration key.
pub(crate) fn check_count(field: &str, count: usize, max: usize, key: &str) -> Result<(), Refusal> {
    if count > max {
        return Err(Refusal::bad_request(
            "too_many_values",
            format!(
                "{field} holds {count} values; at most {max} per request ({key}): split the request"
            ),
        ));
    }
    Ok(())
}

/// The first top-level key that appears twice, if any.
struct TopLevelKeys(Option<String>);

impl<'de> Deserialize<'de> for TopLevelKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = TopLevelKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevelKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut duplicate = None;
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    if duplicate.is_none() && !seen.insert(key.clone()) {
                        duplicate = Some(key);
                    }
                }
                Ok(TopLevelKeys(duplicate))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}
