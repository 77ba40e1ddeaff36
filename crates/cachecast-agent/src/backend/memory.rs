//! In-process caches: the PDP response cache (with secondary indexes by scope and by
//! identity), the identity cache, and any number of named keyed caches.
//!
//! This is what a Rust service embeds: it caches through [`MemoryCache`] and hands a clone to
//! its agent. The indexes make an eviction cost what it removes, not the size of the cache.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use cachecast_proto::{CacheName, EnvId, IdentitySelector, ResponseSelector};

use super::{BackendError, CacheBackend};

/// Shared, indexed, in-process caches. Clones share the same entries.
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
    /// The identity cache: identity template, then identity id.
    identities: HashMap<String, HashMap<String, Bytes>>,
    /// The keyed caches served, by name; entries by id.
    keyed: BTreeMap<CacheName, HashMap<String, Bytes>>,
    /// Set while its agent cannot vouch for it (cut off, lagging, stopped): nothing is cached
    /// and nothing is served, so nothing is served that an invalidation it cannot hear should
    /// have removed, even when its flush fails (soak seed 453).
    suspended: bool,
}

impl MemoryCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache that also serves the keyed caches `names` (announced in the agent's presence,
    /// so publishers expect this agent when one of them is cleared).
    pub fn with_keyed_caches(names: impl IntoIterator<Item = CacheName>) -> Self {
        let cache = Self::new();
        cache.lock().keyed = names.into_iter().map(|n| (n, HashMap::new())).collect();
        cache
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
        if index.evictions != ticket.0 || index.suspended {
            return false;
        }
        index.store(key, scope, identity, value);
        true
    }

    /// The cached value of `key`, if any; nothing while the cache does not serve.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        let index = self.lock();
        if index.suspended {
            return None;
        }
        index.entries.get(key).map(|e| e.value.clone())
    }

    /// Whether the cache serves now: not while its agent cannot vouch for it.
    pub fn is_serving(&self) -> bool {
        !self.lock().suspended
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

    /// Caches identity attributes `value` for `identity_id` of `template`.
    pub fn insert_identity(&self, template: &str, identity_id: &str, value: Bytes) {
        self.lock().store_identity(template, identity_id, value);
    }

    /// Like [`MemoryCache::insert_identity`], unless an eviction ran since `ticket` was taken;
    /// returns whether it was cached.
    pub fn insert_identity_if_current(
        &self,
        ticket: FillTicket,
        template: &str,
        identity_id: &str,
        value: Bytes,
    ) -> bool {
        let mut index = self.lock();
        if index.evictions != ticket.0 || index.suspended {
            return false;
        }
        index.store_identity(template, identity_id, value);
        true
    }

    /// The cached attributes of `identity_id` of `template`, if any; nothing while the cache
    /// does not serve.
    pub fn get_identity(&self, template: &str, identity_id: &str) -> Option<Bytes> {
        let index = self.lock();
        if index.suspended {
            return None;
        }
        index.identities.get(template)?.get(identity_id).cloned()
    }

    /// How many identities are cached, over all templates.
    pub fn identity_len(&self) -> usize {
        self.lock().identities.values().map(HashMap::len).sum()
    }

    /// Caches `value` under `id` in the keyed cache `cache`; returns false (caching nothing)
    /// when this cache does not serve a keyed cache of that name.
    pub fn insert_keyed(&self, cache: &str, id: &str, value: Bytes) -> bool {
        self.lock().store_keyed(cache, id, value)
    }

    /// Like [`MemoryCache::insert_keyed`], unless an eviction ran since `ticket` was taken.
    pub fn insert_keyed_if_current(
        &self,
        ticket: FillTicket,
        cache: &str,
        id: &str,
        value: Bytes,
    ) -> bool {
        let mut index = self.lock();
        index.evictions == ticket.0 && index.store_keyed(cache, id, value)
    }

    /// The value cached under `id` in the keyed cache `cache`, if any; nothing while the cache
    /// does not serve.
    pub fn get_keyed(&self, cache: &str, id: &str) -> Option<Bytes> {
        let index = self.lock();
        if index.suspended {
            return None;
        }
        index.keyed.get(cache)?.get(id).cloned()
    }

    /// How many entries the keyed cache `cache` holds (0 if it is not served).
    pub fn keyed_len(&self, cache: &str) -> usize {
        self.lock().keyed.get(cache).map_or(0, HashMap::len)
    }

    /// Removes every identity cache entry `selector` matches (neither part set: all of
    /// them); returns how many were removed.
    pub fn evict_identities(&self, selector: &IdentitySelector) -> u64 {
        let mut index = self.lock();
        index.evictions += 1;
        let template = selector.identity_template.as_deref();
        let id = selector.identity_id.as_deref();
        let mut removed = 0;
        index.identities.retain(|name, ids| {
            if template.is_some_and(|t| t != name) {
                return true;
            }
            match id {
                None => removed += ids.len(),
                Some(id) => removed += usize::from(ids.remove(id).is_some()),
            }
            id.is_some() && !ids.is_empty()
        });
        removed as u64
    }

    /// Removes `ids` (every entry when `None`) from the keyed cache `cache`; returns how many
    /// were removed, or `None` when this cache serves no keyed cache of that name.
    pub fn evict_keyed(&self, cache: &str, ids: Option<&[String]>) -> Option<u64> {
        let mut index = self.lock();
        index.evictions += 1;
        let entries = index.keyed.get_mut(cache)?;
        let removed = match ids {
            None => std::mem::take(entries).len(),
            Some(ids) => ids
                .iter()
                .filter(|id| entries.remove(*id).is_some())
                .count(),
        };
        Some(removed as u64)
    }

    /// Empties every cache: responses, identities and each keyed cache.
    pub fn clear(&self) -> u64 {
        let mut index = self.lock();
        index.evictions += 1;
        let mut removed =
            index.entries.len() + index.identities.values().map(HashMap::len).sum::<usize>();
        index.clear_responses();
        index.identities.clear();
        for entries in index.keyed.values_mut() {
            removed += std::mem::take(entries).len();
        }
        removed as u64
    }

    /// Removes every response entry `selector` matches; returns how many were removed.
    pub fn evict(&self, selector: &ResponseSelector) -> u64 {
        let mut index = self.lock();
        index.evictions += 1;
        if selector.is_all() {
            let removed = index.entries.len() as u64;
            index.clear_responses();
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
    fn clear_responses(&mut self) {
        self.entries.clear();
        self.by_scope.clear();
        self.by_identity.clear();
    }

    /// Caches `value` under `id` in the keyed cache `cache`; false if it is not served.
    fn store_keyed(&mut self, cache: &str, id: &str, value: Bytes) -> bool {
        if self.suspended {
            return false;
        }
        match self.keyed.get_mut(cache) {
            Some(entries) => {
                entries.insert(id.to_owned(), value);
                true
            }
            None => false,
        }
    }

    fn store_identity(&mut self, template: &str, identity_id: &str, value: Bytes) {
        if self.suspended {
            return;
        }
        self.identities
            .entry(template.to_owned())
            .or_default()
            .insert(identity_id.to_owned(), value);
    }

    fn store(&mut self, key: &str, scope: &str, identity: &str, value: Bytes) {
        if self.suspended {
            return;
        }
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

    fn set_serving(&self, serving: bool) {
        let mut index = self.lock();
        if !serving {
            // Fills that started before are refused too.
            index.evictions += 1;
        }
        index.suspended = !serving;
    }

    async fn evict_responses(
        &self,
        _env: &EnvId,
        selector: &ResponseSelector,
    ) -> Result<u64, BackendError> {
        // An embedded cache belongs to one environment: its agent's.
        Ok(self.evict(selector))
    }

    async fn evict_identities(
        &self,
        _env: &EnvId,
        selector: &IdentitySelector,
    ) -> Result<u64, BackendError> {
        Ok(MemoryCache::evict_identities(self, selector))
    }

    fn keyed_caches(&self) -> Vec<CacheName> {
        self.lock().keyed.keys().cloned().collect()
    }

    async fn evict_keyed(
        &self,
        _env: &EnvId,
        cache: &CacheName,
        ids: Option<&[String]>,
    ) -> Result<u64, BackendError> {
        MemoryCache::evict_keyed(self, cache.as_str(), ids)
            .ok_or_else(|| BackendError::no_keyed_cache(cache))
    }

    async fn flush(&self, _env: &EnvId) -> Result<u64, BackendError> {
        Ok(self.clear())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_that_may_not_serve_takes_nothing_until_it_may_again() {
        let cache =
            MemoryCache::with_keyed_caches([CacheName::new("products").expect("a valid name")]);
        let before = cache.ticket();
        cache.set_serving(false);
        cache.insert("k", "s1", "u1", Bytes::from_static(b"v"));
        cache.insert_identity("t", "u1", Bytes::from_static(b"v"));
        assert!(!cache.insert_keyed("products", "p1", Bytes::from_static(b"v")));
        assert!(cache.is_empty() && cache.identity_len() == 0);
        cache.set_serving(true);
        assert!(
            !cache.insert_if_current(before, "k", "s1", "u1", Bytes::from_static(b"v")),
            "a fill that started before the suspension"
        );
        cache.insert("k", "s1", "u1", Bytes::from_static(b"v"));
        assert!(cache.contains("k"));
    }

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
    fn identity_evictions_match_template_id_or_both() {
        let seeded = || {
            let cache = MemoryCache::new();
            for template in ["User", "Device"] {
                for id in ["alice", "bob"] {
                    cache.insert_identity(template, id, Bytes::from_static(b"attrs"));
                }
            }
            cache
        };
        let selector = |template: Option<&str>, id: Option<&str>| IdentitySelector {
            identity_template: template.map(str::to_owned),
            identity_id: id.map(str::to_owned),
        };
        let cases = [
            (
                selector(Some("User"), None),
                2,
                vec![("Device", "alice"), ("Device", "bob")],
            ),
            (
                selector(None, Some("alice")),
                2,
                vec![("User", "bob"), ("Device", "bob")],
            ),
            (
                selector(Some("User"), Some("alice")),
                1,
                vec![("User", "bob"), ("Device", "alice"), ("Device", "bob")],
            ),
            (
                selector(Some("Nope"), None),
                0,
                vec![
                    ("User", "alice"),
                    ("User", "bob"),
                    ("Device", "alice"),
                    ("Device", "bob"),
                ],
            ),
            (selector(None, None), 4, vec![]),
        ];
        for (sel, removed, left) in cases {
            let cache = seeded();
            assert_eq!(cache.evict_identities(&sel), removed, "{sel:?}");
            assert_eq!(cache.identity_len(), left.len(), "{sel:?}");
            for (template, id) in left {
                assert!(
                    cache.get_identity(template, id).is_some(),
                    "{template}/{id} after {sel:?}"
                );
            }
        }
    }

    #[test]
    fn keyed_caches_evict_ids_or_everything_and_only_serve_declared_names() {
        let name = |n: &str| CacheName::new(n).expect("valid");
        let cache = MemoryCache::with_keyed_caches([name("apikeys"), name("sessions")]);
        for id in ["k1", "k2", "k3"] {
            assert!(cache.insert_keyed("apikeys", id, Bytes::from_static(b"v")));
            assert!(cache.insert_keyed("sessions", id, Bytes::from_static(b"v")));
        }
        assert!(!cache.insert_keyed("other", "k1", Bytes::from_static(b"v")));
        let ids = ["k1".to_owned(), "k9".to_owned()];
        assert_eq!(cache.evict_keyed("apikeys", Some(&ids)), Some(1));
        assert!(cache.get_keyed("apikeys", "k1").is_none());
        assert!(cache.get_keyed("apikeys", "k2").is_some());
        assert_eq!(cache.evict_keyed("sessions", None), Some(3));
        assert_eq!(cache.keyed_len("sessions"), 0);
        assert_eq!(cache.keyed_len("apikeys"), 2);
        assert_eq!(cache.evict_keyed("other", None), None);
        let stale = cache.ticket();
        cache.evict_keyed("sessions", None);
        assert!(!cache.insert_keyed_if_current(stale, "sessions", "k1", Bytes::from_static(b"v")));
    }

    #[test]
    fn clear_empties_every_cache() {
        let cache = MemoryCache::with_keyed_caches([CacheName::new("apikeys").expect("valid")]);
        cache.insert("r", "s1", "alice", Bytes::from_static(b"permit"));
        cache.insert_identity("User", "alice", Bytes::from_static(b"attrs"));
        cache.insert_keyed("apikeys", "k", Bytes::from_static(b"v"));
        assert_eq!(cache.clear(), 3);
        assert!(cache.is_empty());
        assert_eq!(cache.identity_len(), 0);
        assert_eq!(cache.keyed_len("apikeys"), 0);
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
