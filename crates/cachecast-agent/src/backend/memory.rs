//! An in-process PDP response cache with secondary indexes by scope and by identity.
//!
//! This is what a Rust service embeds: it caches through [`MemoryCache`] and hands a clone to
//! its agent. The indexes make an eviction cost what it removes, not the size of the cache.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use cachecast_proto::{EnvId, ResponseSelector};

use super::{BackendError, CacheBackend};

/// A shared, indexed, in-process response cache. Clones share the same entries.
#[derive(Debug, Clone, Default)]
pub struct MemoryCache {
    inner: Arc<Mutex<Index>>,
}

#[derive(Debug)]
struct Entry {
    scope: Arc<str>,
    identity: Arc<str>,
    value: Bytes,
}

/// Taken before computing a decision to cache: [`MemoryCache::insert_if_current`] refuses the
/// decision if an eviction ran meanwhile, since it may have been computed from what that
/// eviction invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillTicket(u64);

#[derive(Debug, Default)]
struct Index {
    /// How many evictions ran; a [`FillTicket`] is this count when it was taken.
    evictions: u64,
    entries: HashMap<Arc<str>, Entry>,
    by_scope: HashMap<Arc<str>, HashSet<Arc<str>>>,
    by_identity: HashMap<Arc<str>, HashSet<Arc<str>>>,
}

impl MemoryCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Caches `value` under `key` as the decision for `identity` within `scope`, replacing
    /// any previous entry of that key.
    pub fn insert(&self, key: &str, scope: &str, identity: &str, value: Bytes) {
        self.lock().store(key, scope, identity, value);
    }

    /// A ticket for a fill that starts now (see [`FillTicket`]).
    pub fn ticket(&self) -> FillTicket {
        FillTicket(self.lock().evictions)
    }

    /// Caches `value` like [`MemoryCache::insert`], unless an eviction ran since `ticket` was
    /// taken; returns whether it was cached.
    pub fn insert_if_current(
        &self,
        ticket: FillTicket,
        key: &str,
        scope: &str,
        identity: &str,
        value: Bytes,
    ) -> bool {
        let mut index = self.lock();
        if index.evictions != ticket.0 {
            return false;
        }
        index.store(key, scope, identity, value);
        true
    }

    /// The cached value of `key`, if any.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.lock().entries.get(key).map(|e| e.value.clone())
    }

    /// True if `key` is cached.
    pub fn contains(&self, key: &str) -> bool {
        self.lock().entries.contains_key(key)
    }

    /// How many entries are cached.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True if nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every cached key, in no particular order.
    pub fn keys(&self) -> Vec<String> {
        self.lock().entries.keys().map(|k| k.to_string()).collect()
    }

    /// Removes every entry `selector` matches; returns how many were removed.
    pub fn evict(&self, selector: &ResponseSelector) -> u64 {
        let mut index = self.lock();
        index.evictions += 1;
        if selector.is_all() {
            let removed = index.entries.len() as u64;
            let evictions = index.evictions;
            *index = Index {
                evictions,
                ..Index::default()
            };
            return removed;
        }
        let victims = index.matching(selector);
        let removed = victims.len() as u64;
        for key in victims {
            index.remove(&key);
        }
        removed
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave the index half-updated in a way that
        // matters more than losing the cache, so keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Index {
    fn store(&mut self, key: &str, scope: &str, identity: &str, value: Bytes) {
        self.remove(key);
        let key: Arc<str> = Arc::from(key);
        let scope = self.intern_scope(scope);
        let identity = self.intern_identity(identity);
        self.by_scope
            .entry(scope.clone())
            .or_default()
            .insert(key.clone());
        self.by_identity
            .entry(identity.clone())
            .or_default()
            .insert(key.clone());
        self.entries.insert(
            key,
            Entry {
                scope,
                identity,
                value,
            },
        );
    }

    /// The keys `selector` matches (which must not be "all").
    fn matching(&self, selector: &ResponseSelector) -> Vec<Arc<str>> {
        let scopes: Vec<&HashSet<Arc<str>>> = selector
            .scope_client_ids
            .iter()
            .filter_map(|s| self.by_scope.get(s.as_str()))
            .collect();
        match selector.identity_id.as_deref() {
            None => scopes.into_iter().flatten().cloned().collect(),
            Some(identity) => {
                let Some(of_identity) = self.by_identity.get(identity) else {
                    return Vec::new();
                };
                if selector.scope_client_ids.is_empty() {
                    return of_identity.iter().cloned().collect();
                }
                // Walk whichever side is smaller and filter by the other.
                let scoped_len: usize = scopes.iter().map(|s| s.len()).sum();
                if of_identity.len() <= scoped_len {
                    of_identity
                        .iter()
                        .filter(|key| {
                            let scope = &self.entries[*key].scope;
                            selector.scope_client_ids.iter().any(|s| **s == **scope)
                        })
                        .cloned()
                        .collect()
                } else {
                    scopes
                        .into_iter()
                        .flatten()
                        .filter(|key| &*self.entries[*key].identity == identity)
                        .cloned()
                        .collect()
                }
            }
        }
    }

    fn remove(&mut self, key: &str) {
        let Some(entry) = self.entries.remove(key) else {
            return;
        };
        remove_from(&mut self.by_scope, &entry.scope, key);
        remove_from(&mut self.by_identity, &entry.identity, key);
    }

    fn intern_scope(&self, scope: &str) -> Arc<str> {
        intern(&self.by_scope, scope)
    }

    fn intern_identity(&self, identity: &str) -> Arc<str> {
        intern(&self.by_identity, identity)
    }
}

/// Reuses the index's copy of a scope or identity string, so each is stored once.
fn intern(map: &HashMap<Arc<str>, HashSet<Arc<str>>>, value: &str) -> Arc<str> {
    map.get_key_value(value)
        .map(|(k, _)| k.clone())
        .unwrap_or_else(|| Arc::from(value))
}

fn remove_from(map: &mut HashMap<Arc<str>, HashSet<Arc<str>>>, group: &str, key: &str) {
    if let Some(keys) = map.get_mut(group) {
        keys.remove(key);
        if keys.is_empty() {
            map.remove(group);
        }
    }
}

impl CacheBackend for MemoryCache {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn evict_responses(
        &self,
        _env: &EnvId,
        selector: &ResponseSelector,
    ) -> Result<u64, BackendError> {
        // An embedded cache belongs to one environment: its agent's.
        Ok(self.evict(selector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded() -> MemoryCache {
        let cache = MemoryCache::new();
        for scope in ["s1", "s2", "s3"] {
            for identity in ["alice", "bob"] {
                for n in 0..2 {
                    let key = format!("{scope}/{identity}/{n}");
                    cache.insert(&key, scope, identity, Bytes::from_static(b"permit"));
                }
            }
        }
        cache
    }

    fn selector(scopes: &[&str], identity: Option<&str>) -> ResponseSelector {
        ResponseSelector {
            scope_client_ids: scopes.iter().map(|s| s.to_string()).collect(),
            identity_id: identity.map(str::to_string),
        }
    }

    fn remaining(cache: &MemoryCache) -> Vec<String> {
        let mut keys = cache.keys();
        keys.sort();
        keys
    }

    #[test]
    fn evicts_exactly_what_each_selector_matches() {
        let cases: &[(&[&str], Option<&str>, u64)] = &[
            (&[], None, 12),
            (&["s1"], None, 4),
            (&["s1", "s3"], None, 8),
            (&[], Some("alice"), 6),
            (&["s2"], Some("bob"), 2),
            (&["s2", "s3"], Some("bob"), 4),
            (&["nope"], None, 0),
            (&["s1"], Some("nobody"), 0),
        ];
        for (scopes, identity, expected) in cases {
            let cache = seeded();
            let sel = selector(scopes, *identity);
            assert_eq!(cache.evict(&sel), *expected, "{sel:?}");
            for key in remaining(&cache) {
                let mut parts = key.split('/');
                let (scope, who) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let scope_hit = scopes.is_empty() || scopes.contains(&scope);
                let identity_hit = identity.is_none_or(|i| i == who);
                assert!(
                    !(scope_hit && identity_hit),
                    "{key} should be gone for {sel:?}"
                );
            }
            assert_eq!(cache.len() as u64, 12 - expected);
        }
    }

    #[test]
    fn replacing_a_key_moves_it_between_indexes() {
        let cache = MemoryCache::new();
        cache.insert("k", "s1", "alice", Bytes::from_static(b"a"));
        cache.insert("k", "s2", "bob", Bytes::from_static(b"b"));
        assert_eq!(cache.evict(&selector(&["s1"], None)), 0);
        assert_eq!(cache.get("k"), Some(Bytes::from_static(b"b")));
        assert_eq!(cache.evict(&selector(&[], Some("bob"))), 1);
        assert!(cache.is_empty());
    }

    #[test]
    fn a_fill_that_raced_an_eviction_is_refused() {
        let cache = MemoryCache::new();
        let ticket = cache.ticket();
        assert!(cache.insert_if_current(ticket, "a", "s1", "alice", Bytes::from_static(b"1")));
        let stale = cache.ticket();
        // An eviction runs while the decision is being computed (even an unrelated one).
        cache.evict(&selector(&["s2"], None));
        assert!(!cache.insert_if_current(stale, "b", "s1", "bob", Bytes::from_static(b"2")));
        assert!(!cache.contains("b"));
        let fresh = cache.ticket();
        cache.evict(&ResponseSelector::default());
        assert!(!cache.insert_if_current(fresh, "c", "s1", "carol", Bytes::from_static(b"3")));
        assert!(cache.insert_if_current(
            cache.ticket(),
            "c",
            "s1",
            "carol",
            Bytes::from_static(b"3")
        ));
    }

    #[test]
    fn indexes_are_emptied_with_the_entries() {
        let cache = seeded();
        cache.evict(&selector(&["s1", "s2", "s3"], None));
        let index = cache.lock();
        assert!(index.by_scope.is_empty());
        assert!(index.by_identity.is_empty());
    }
}
