//! Evicting one scope's entries from a Redis holding a million keys: the Redis backend
//! against a plain `SCAN MATCH` + `UNLINK` loop.

use std::time::{Duration, Instant};

use cachecast_agent::{CacheBackend, RedisBackend, RedisConfig};
use cachecast_proto::{EnvId, ResponseSelector};

pub(crate) const SCOPES: usize = 100;
pub(crate) const PER_SCOPE: usize = 10_000;

/// Writes `PER_SCOPE` keys of `scope` (`pdp:bench:s<scope>:u<identity>:<n>`).
async fn load_scope(
    conn: &mut redis::aio::MultiplexedConnection,
    scope: usize,
) -> anyhow::Result<()> {
    for chunk in (0..PER_SCOPE).collect::<Vec<_>>().chunks(5000) {
        let mut cmd = redis::cmd("MSET");
        for n in chunk {
            cmd.arg(format!("pdp:bench:s{scope}:u{}:{n}", n % 500))
                .arg("permit");
        }
        let () = cmd.query_async(conn).await?;
    }
    Ok(())
}

/// The floor: what any eviction by pattern must do.
async fn scan_unlink(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> anyhow::Result<u64> {
    let mut cursor = 0u64;
    let mut removed = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
            removed += n;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

/// Median times of the backend and of the floor, over `runs` alternating runs.
pub(crate) async fn measure(redis_url: &str, runs: usize) -> anyhow::Result<(Duration, Duration)> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    for scope in 0..SCOPES {
        load_scope(&mut conn, scope).await?;
    }
    let backend = RedisBackend::new(&RedisConfig {
        url: redis_url.to_owned(),
        key_template: "pdp:{env}:{scopeClientId}:{identityId}:*".into(),
        command_timeout: Duration::from_secs(30),
        ..RedisConfig::default()
    })?;
    let env = EnvId::new("bench")?;
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let scope = run % SCOPES;
        let selector = ResponseSelector {
            scope_client_ids: vec![format!("s{scope}")],
            identity_id: None,
        };
        let t = Instant::now();
        let removed = backend.evict_responses(&env, &selector).await?;
        ours.push(t.elapsed());
        anyhow::ensure!(removed == PER_SCOPE as u64, "the backend removed {removed}");
        load_scope(&mut conn, scope).await?;

        let t = Instant::now();
        let removed = scan_unlink(&mut conn, &format!("pdp:bench:s{scope}:*")).await?;
        floor.push(t.elapsed());
        anyhow::ensure!(removed == PER_SCOPE as u64, "the floor removed {removed}");
        load_scope(&mut conn, scope).await?;
    }
    ours.sort();
    floor.sort();
    Ok((ours[runs / 2], floor[runs / 2]))
}
