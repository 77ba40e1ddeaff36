//! Ids that become NATS subject tokens or KV keys, and the validation that keeps them safe.
//!
//! An environment or agent id is one subject token: `[A-Za-z0-9_-]{1,128}`. Anything else
//! (a dot, `*`, `>`, whitespace, a non-ASCII letter) is refused, so a caller can never turn an
//! id into a wildcard or reach another environment's subject.

use std::fmt;

/// The longest id accepted.
const MAX_ID_LEN: usize = 128;

/// An id that is not a single, safe subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{kind} {value:?} is not valid: use 1 to {MAX_ID_LEN} characters from A-Z, a-z, 0-9, '_' and '-'"
)]
pub struct InvalidId {
    kind: &'static str,
    value: String,
}

fn validate(kind: &'static str, value: &str) -> Result<(), InvalidId> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        // Keep the echoed value short: it ends up in error messages and logs.
        let value: String = value.chars().take(MAX_ID_LEN + 1).collect();
        Err(InvalidId { kind, value })
    }
}

macro_rules! token_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
        )]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value` as a single subject token.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                validate($kind, &value)?;
                Ok(Self(value))
            }

            /// The id as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

                impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

token_id!(
    /// An environment id: the unit of invalidation, one subject token.
    EnvId,
    "environment id"
);
token_id!(
    /// An agent id: unique within its environment, one subject token.
    AgentId,
    "agent id"
);
token_id!(
    /// A persistent cache's id (a Redis, an HTTP owner's cache): unique within its
    /// environment, shared by every agent that attends that cache, one subject token.
    CacheId,
    "cache id"
);
token_id!(
    /// The name of a keyed cache an agent serves (`apikeys`, `sessions`, ...). Not a subject
    /// token today, but held to the same rule so it is safe in paths, keys and labels.
    CacheName,
    "cache name"
);

/// A new event id: a UUIDv7 in simple form (32 hex digits), so ids sort by creation time and
/// are always valid subject tokens.
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// A new publisher id, unique per publisher process: `p` and the random half of a UUIDv7.
pub fn new_publisher_id() -> String {
    format!("p{}", &new_event_id()[16..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_subject_safe_tokens() {
        for ok in ["dev", "prod-eu_1", "A", &"x".repeat(128)] {
            assert!(EnvId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_wildcards_dots_and_others() {
        for bad in [
            "",
            "*",
            ">",
            "dev.prod",
            "dev prod",
            "dév",
            "a/b",
            "a\0b",
            &"x".repeat(129),
        ] {
            let err = EnvId::new(bad).expect_err(bad);
            assert!(err.to_string().contains("environment id"));
        }
    }

    #[test]
    fn event_ids_are_unique_tokens() {
        let a = new_event_id();
        let b = new_event_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(
            AgentId::new(a.clone()).is_ok(),
            "event id {a} is a valid token"
        );
        assert_eq!(&a[12..13], "7", "version nibble");
    }
}
