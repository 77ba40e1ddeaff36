//! The history checker: what an answer promises about the caches themselves.
//!
//! The fault schedule plays the PDP: it fills every cache with entries (each key written once)
//! and records when each was written. An entry is *invalidated* by a request when the request's
//! selector covers it and it was written before the request was sent. Then:
//!
//! - after an answer (`200` or `424`), every cache the answer does not name as failed holds
//!   none of the entries the request invalidated: a `200` names none, so it vouches for all;
//! - a `424` names only caches that exist;
//! - once the faults are over, every cache holds none of the entries invalidated by any
//!   published request (applied, or flushed since).
//!
//! The checker knows every cache from its own side (the caches it fills), never from the
//! publisher's view: a publisher that expected nobody would answer `200`, and be caught here.
//! The contents are read from the caches, never taken from an agent's or publisher's word.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// One cached decision the checker wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The cache's name as answers name it (an agent id, or a persistent cache's id).
    pub cache: String,
    pub key: String,
    pub scope: String,
    pub identity: String,
    /// When it was known written: a Redis `SET`'s reply, a fill ticket's taking (the decision
    /// was computed from what held then).
    pub written: Instant,
}

/// What a request invalidates: `None` parts match everything (both `None`: the whole cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub scope: Option<String>,
    pub identity: Option<String>,
}

impl Selector {
    pub fn covers(&self, entry: &Entry) -> bool {
        self.scope.as_ref().is_none_or(|s| *s == entry.scope)
            && self.identity.as_ref().is_none_or(|i| *i == entry.identity)
    }
}

/// One request, as sent.
#[derive(Debug, Clone)]
pub struct Request {
    /// The request id it was sent with.
    pub id: String,
    pub step: usize,
    pub selector: Selector,
    pub sent: Instant,
}

impl Request {
    /// True if this request invalidated `entry`.
    pub fn invalidated(&self, entry: &Entry) -> bool {
        entry.written < self.sent && self.selector.covers(entry)
    }
}

/// Every key each cache holds, read from the caches.
pub type Contents = BTreeMap<String, BTreeSet<String>>;

/// A broken promise: `cache` still holds `key`, which `step`'s request invalidated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub step: usize,
    pub cache: String,
    pub key: String,
    pub what: &'static str,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}: {} still holds {}: {}",
            self.step, self.cache, self.key, self.what
        )
    }
}

/// The entries of `request` that a cache not in `named_failed` still holds in `contents`.
pub fn stale_after_answer(
    request: &Request,
    named_failed: &BTreeSet<String>,
    entries: &[Entry],
    contents: &Contents,
) -> Vec<Violation> {
    stale(request, entries, contents)
        .filter(|e| !named_failed.contains(&e.cache))
        .map(|e| Violation {
            step: request.step,
            cache: e.cache.clone(),
            key: e.key.clone(),
            what: "the answer vouched for this cache",
        })
        .collect()
}

/// The entries of `request` still held anywhere in `contents`.
pub fn stale<'a>(
    request: &'a Request,
    entries: &'a [Entry],
    contents: &'a Contents,
) -> impl Iterator<Item = &'a Entry> + 'a {
    entries.iter().filter(move |e| {
        request.invalidated(e)
            && contents
                .get(&e.cache)
                .is_some_and(|keys| keys.contains(&e.key))
    })
}

/// The names in a `424` that are no cache the checker knows.
pub fn unknown_names<'a>(
    named_failed: &'a BTreeSet<String>,
    caches: &'a BTreeSet<String>,
) -> impl Iterator<Item = &'a String> + 'a {
    named_failed.iter().filter(|n| !caches.contains(*n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(cache: &str, key: &str, scope: &str, identity: &str, written: Instant) -> Entry {
        Entry {
            cache: cache.into(),
            key: key.into(),
            scope: scope.into(),
            identity: identity.into(),
            written,
        }
    }

    fn contents(of: &[(&str, &[&str])]) -> Contents {
        of.iter()
            .map(|(c, keys)| (c.to_string(), keys.iter().map(|k| k.to_string()).collect()))
            .collect()
    }

    fn request(scope: Option<&str>, identity: Option<&str>, sent: Instant) -> Request {
        Request {
            id: "r7".into(),
            step: 7,
            selector: Selector {
                scope: scope.map(Into::into),
                identity: identity.map(Into::into),
            },
            sent,
        }
    }

    #[test]
    fn an_entry_written_before_the_request_and_still_held_breaks_a_200() {
        let t0 = Instant::now();
        let entries = [
            entry("m0", "k1", "s1", "i1", t0),
            entry("m0", "k2", "s2", "i1", t0),
            entry("r0", "k3", "s1", "i2", t0),
        ];
        let sent = t0 + Duration::from_millis(1);
        let held = contents(&[("m0", &["k1", "k2"]), ("r0", &[])]);
        let found = stale_after_answer(
            &request(Some("s1"), None, sent),
            &BTreeSet::new(),
            &entries,
            &held,
        );
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].cache.as_str(), found[0].key.as_str()),
            ("m0", "k1")
        );
        assert_eq!(found[0].step, 7);
    }

    #[test]
    fn a_cache_named_failed_may_still_hold_what_it_did_not_apply() {
        let t0 = Instant::now();
        let entries = [entry("r0", "k1", "s1", "i1", t0)];
        let held = contents(&[("r0", &["k1"])]);
        let named = BTreeSet::from(["r0".to_string()]);
        let request = request(None, None, t0 + Duration::from_millis(1));
        assert!(stale_after_answer(&request, &named, &entries, &held).is_empty());
        assert_eq!(stale(&request, &entries, &held).count(), 1);
    }

    #[test]
    fn an_entry_written_after_the_request_was_sent_is_not_invalidated() {
        let t0 = Instant::now();
        let entries = [entry("m0", "k1", "s1", "i1", t0 + Duration::from_millis(5))];
        let held = contents(&[("m0", &["k1"])]);
        let request = request(Some("s1"), Some("i1"), t0);
        assert!(stale_after_answer(&request, &BTreeSet::new(), &entries, &held).is_empty());
    }

    #[test]
    fn a_selector_matches_on_every_part_it_names() {
        let t0 = Instant::now();
        let e = entry("m0", "k", "s1", "i1", t0);
        let both = |s: Option<&str>, i: Option<&str>| request(s, i, t0).selector.covers(&e);
        assert!(both(None, None));
        assert!(both(Some("s1"), None));
        assert!(both(None, Some("i1")));
        assert!(both(Some("s1"), Some("i1")));
        assert!(!both(Some("s1"), Some("i2")));
        assert!(!both(Some("s2"), None));
    }

    #[test]
    fn a_424_may_name_only_known_caches() {
        let caches = BTreeSet::from(["m0".to_string(), "r0".to_string()]);
        let named = BTreeSet::from(["r0".to_string(), "ghost".to_string()]);
        assert_eq!(
            unknown_names(&named, &caches).collect::<Vec<_>>(),
            ["ghost"]
        );
    }
}
