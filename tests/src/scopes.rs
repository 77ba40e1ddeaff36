//! Library-path requests against one scope of environment `dev`, and a memory cache entry per
//! scope to see them applied: for tests that watch how an event reaches an agent.

use std::time::Duration;

use bytes::Bytes;
use cachecast_agent::MemoryCache;
use cachecast_proto::{ResponseSelector, Target};
use cachecast_publisher::{InvalidationRequest, Outcome};

/// A request to evict scope `scope` of `dev`, waiting at most `timeout`.
pub fn scope_request(scope: &str, timeout: Duration) -> InvalidationRequest {
    InvalidationRequest {
        env: crate::env_id("dev"),
        target: Target::Response(ResponseSelector {
            scope_client_ids: vec![scope.into()],
            identity_id: None,
        }),
        request_id: format!("scope-{scope}"),
        timeout,
        caller: None,
    }
}

/// Caches one entry of scope `scope`, under the key `<scope>/k`.
pub fn fill_scope(cache: &MemoryCache, scope: &str) {
    cache.insert(
        &format!("{scope}/k"),
        scope,
        "u1",
        Bytes::from_static(b"permit"),
    );
}

/// Whether some agent was expected and every one applied the eviction.
pub fn all_applied(outcome: &Outcome) -> bool {
    !outcome.agents.is_empty() && outcome.agents.values().all(|a| a.is_applied())
}
