//! Ids that become NATS subject tokens or KV keys, and the validation that keeps them safe.
//!
//! An environment or agent id is one subject token: `[A-Za-z0-9_-]{1,128}`. Anything else
//! (a dot, `*`, `>`, whitespace, a non-ASCII letter) is refused, so a caller can never turn an
//! id into a wildcard or reach another environment's subject.

use std::fmt;
use std::hash::BuildHasher;

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

/// The event ids seen lately, forgetting the oldest beyond a bound: an agent's acknowledged
/// events (an event that arrives twice is applied once), a publisher's finished requests (an
/// ack after its request ended is told from one for no request). An id is kept as the number
/// its 32 hex digits spell, so a lookup compares no strings.
///
/// Every agent asks this once per event, so it is laid out for the cache: the ids in a ring in
/// arrival order (written in sequence; the oldest is overwritten), found through a small hash
/// index of ring slots. Forgetting the oldest touches only the index, never a random place in
/// a large table, which mattered with a thousand agents in one process.
#[derive(Debug)]
pub struct RecentEventIds {
    bound: usize,
    /// The ids in arrival order, up to `bound`; once full, `next` is the oldest's slot.
    ring: Vec<u128>,
    next: usize,
    /// Slots of `ring`, by the hash of the id they hold.
    index: hashbrown::HashTable<u16>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl RecentEventIds {
    /// Remembers at most `bound` ids (at least one, at most 65 536); the set grows as ids
    /// come, so an idle agent holds none.
    pub fn new(bound: usize) -> Self {
        Self {
            bound: bound.clamp(1, usize::from(u16::MAX) + 1),
            ring: Vec::new(),
            next: 0,
            index: hashbrown::HashTable::new(),
            hasher: hashbrown::DefaultHashBuilder::default(),
        }
    }

    /// Whether `event_id` was inserted lately.
    pub fn contains(&self, event_id: &str) -> bool {
        event_key(event_id).is_some_and(|key| self.slot_of(key).is_some())
    }

    /// Remembers `event_id`, forgetting the oldest beyond the bound; false when it was
    /// remembered already. An id no publisher makes (not 32 hex digits) is not remembered:
    /// it is new every time, and [`Self::contains`] never finds it.
    pub fn insert(&mut self, event_id: &str) -> bool {
        let Some(key) = event_key(event_id) else {
            return true;
        };
        if self.slot_of(key).is_some() {
            return false;
        }
        let slot = if self.ring.len() < self.bound {
            self.ring.push(key);
            self.ring.len() - 1
        } else {
            let slot = self.next;
            let oldest = self.hasher.hash_one(self.ring[slot]);
            if let Ok(entry) = self.index.find_entry(oldest, |&s| usize::from(s) == slot) {
                entry.remove();
            }
            self.ring[slot] = key;
            slot
        };
        self.next = (slot + 1) % self.bound;
        let (ring, hasher) = (&self.ring, &self.hasher);
        self.index.insert_unique(
            hasher.hash_one(key),
            u16::try_from(slot).expect("the bound fits the index"),
            |&s| hasher.hash_one(ring[usize::from(s)]),
        );
        true
    }

    fn slot_of(&self, key: u128) -> Option<u16> {
        self.index
            .find(self.hasher.hash_one(key), |&s| {
                self.ring[usize::from(s)] == key
            })
            .copied()
    }

    /// How many ids it holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ring.len()
    }
}

/// An event id ([`new_event_id`]: 32 lower-case hex digits) as a number. Only that spelling:
/// `from_str_radix` alone also takes a sign and upper case, and two ids spelled differently
/// must never be taken for one (an agent would skip the second as applied).
fn event_key(event_id: &str) -> Option<u128> {
    let canonical = event_id.len() == 32
        && event_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    canonical
        .then(|| u128::from_str_radix(event_id, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> String {
        format!("{n:032x}")
    }

    #[test]
    fn remembers_recent_event_ids() {
        let mut recent = RecentEventIds::new(16);
        let event = new_event_id();
        assert!(!recent.contains(&event));
        assert!(recent.insert(&event), "new");
        assert!(recent.contains(&event));
        assert!(!recent.insert(&event), "remembered already");
        assert!(!recent.contains(&new_event_id()), "another event");
    }

    #[test]
    fn forgets_the_oldest_beyond_its_bound() {
        let mut recent = RecentEventIds::new(100);
        for n in 0..110 {
            recent.insert(&id(n));
        }
        assert_eq!(recent.len(), 100);
        assert_eq!(recent.index.len(), 100);
        assert!(!recent.contains(&id(9)), "the oldest are forgotten");
        assert!(recent.contains(&id(10)));
        assert!(recent.contains(&id(109)));
    }

    #[test]
    fn a_second_insert_does_not_push_another_out() {
        let mut recent = RecentEventIds::new(100);
        for n in 0..100 {
            recent.insert(&id(n));
        }
        recent.insert(&id(5));
        assert!(recent.contains(&id(0)), "nothing was forgotten");
        assert_eq!(recent.len(), 100);
    }

    proptest::proptest! {
        /// It answers as a list of the last `bound` distinct ids would, however the ring
        /// wraps: an id is new exactly when the list does not hold it.
        #[test]
        fn answers_as_the_last_ids_inserted(bound in 1usize..9, ids in proptest::collection::vec(0u128..12, 0..200)) {
            let mut recent = RecentEventIds::new(bound);
            let mut model: std::collections::VecDeque<u128> = std::collections::VecDeque::new();
            for n in ids {
                let new = !model.contains(&n);
                proptest::prop_assert_eq!(recent.insert(&id(n)), new);
                if new {
                    if model.len() == bound {
                        model.pop_front();
                    }
                    model.push_back(n);
                }
                for m in 0..12 {
                    proptest::prop_assert_eq!(recent.contains(&id(m)), model.contains(&m));
                }
            }
        }
    }

    #[test]
    fn ids_no_publisher_makes_are_never_remembered() {
        let mut recent = RecentEventIds::new(16);
        for odd in [
            "",
            "abc",
            "not-a-uuid-but-32-characters-xyz",
            &"f".repeat(33),
            // Numbers `from_str_radix` would read, spelled as no publisher spells an id.
            &format!("+{}", "f".repeat(31)),
            &"F".repeat(32),
        ] {
            assert!(recent.insert(odd), "{odd:?} is new every time");
            assert!(recent.insert(odd), "{odd:?} is new every time");
            assert!(!recent.contains(odd), "{odd:?}");
        }
        assert_eq!(recent.len(), 0);
        // Nor taken for the id whose number they spell.
        assert!(recent.insert(&"f".repeat(32)));
        assert!(!recent.contains(&"F".repeat(32)));
        assert!(recent.insert(&format!("0{}", "e".repeat(31))));
        assert!(!recent.contains(&format!("+{}", "e".repeat(31))));
    }

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
