//! What makes a request id and a selector value acceptable, for every way in (HTTP, CLI,
//! library): checked before anything is published.

use cachecast_proto::{CacheName, ResponseSelector, Target};

/// The longest request id accepted.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// The longest scope client id or identity id accepted.
pub const MAX_VALUE_LEN: usize = 512;

/// A request id: 1 to 128 visible ASCII characters (it travels in headers).
pub fn request_id(value: &str) -> Result<(), String> {
    if !value.is_empty()
        && value.len() <= MAX_REQUEST_ID_LEN
        && value.bytes().all(|b| b.is_ascii_graphic())
    {
        Ok(())
    } else {
        Err(format!(
            "the request id must be 1 to {MAX_REQUEST_ID_LEN} visible ASCII characters without spaces"
        ))
    }
}

/// Invisible characters that make a value look like another one in logs and answers: bidi
/// controls (the "Trojan Source" ones), zero-width characters and the byte order mark.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// A scope client id or identity id: 1 to 512 bytes without control characters, bidi
/// controls or zero-width characters. Other Unicode (look-alike letters included) is a value
/// like any other.
pub fn selector_value(name: &str, value: &str) -> Result<(), String> {
    if value.is_empty()
        || value.len() > MAX_VALUE_LEN
        || value.chars().any(|c| c.is_control() || is_invisible(c))
    {
        Err(format!(
            "{name} must be 1 to {MAX_VALUE_LEN} bytes without control, bidi or zero-width characters"
        ))
    } else {
        Ok(())
    }
}

/// Every value of a selector.
pub fn selector(selector: &ResponseSelector) -> Result<(), String> {
    for scope in &selector.scope_client_ids {
        selector_value("scopeClientId", scope)?;
    }
    if let Some(identity) = &selector.identity_id {
        selector_value("identityId", identity)?;
    }
    Ok(())
}

/// Every value of a target of any kind, and that it is well formed.
pub fn target(target: &Target) -> Result<(), String> {
    match target {
        Target::Response(response) => selector(response),
        Target::Identity(identity) => {
            if identity.identity_template.is_none() && identity.identity_id.is_none() {
                return Err("name identityTemplate, identityId or both".into());
            }
            if let Some(template) = &identity.identity_template {
                selector_value("identityTemplate", template)?;
            }
            if let Some(id) = &identity.identity_id {
                selector_value("identityId", id)?;
            }
            Ok(())
        }
        Target::Keyed(keyed) => {
            CacheName::new(keyed.cache.as_str()).map_err(|err| err.to_string())?;
            if keyed.all != keyed.ids.is_empty() {
                return Err("name either ids or all (`*`), not both or neither".into());
            }
            for id in &keyed.ids {
                keyed_id(id)?;
            }
            Ok(())
        }
    }
}

/// An id of a keyed cache: a selector value that is not a wildcard and holds no comma (the
/// path separates ids with commas).
pub fn keyed_id(id: &str) -> Result<(), String> {
    selector_value("id", id)?;
    if id.contains(['*', ',']) {
        return Err(format!(
            "id {id:?} contains '*' or ','; wildcards other than `*` alone (every entry) are not supported"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked() {
        assert!(selector_value("identityId", "alice@example.com").is_ok());
        assert!(selector_value("identityId", "").is_err());
        assert!(selector_value("identityId", "a\nb").is_err());
        assert!(selector_value("identityId", &"x".repeat(513)).is_err());
        assert!(selector_value("identityId", "adm\u{202E}nimda").is_err());
        assert!(selector_value("identityId", "al\u{200B}ice").is_err());
        assert!(
            selector_value("identityId", "аlice").is_ok(),
            "a Cyrillic a is a value"
        );
        assert!(request_id("r-1").is_ok());
        assert!(request_id("has space").is_err());
        assert!(request_id("").is_err());
    }
}
