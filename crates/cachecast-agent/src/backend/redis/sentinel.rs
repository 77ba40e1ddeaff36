//! A Redis behind Sentinel: before each command sequence the agent asks the sentinels which
//! node is the master, and talks to that one. A failover puts another process there; the
//! backend's continuity (the master's `run_id`) then changes, and the agent flushes, since a
//! promoted replica may lag behind evictions its old master applied.

use std::sync::{Mutex, PoisonError};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, ConnectionInfo};

use crate::backend::BackendError;

/// The sentinels of one master, and the connection to wherever they say it is.
pub(super) struct Sentinel {
    /// `host:port` of each sentinel, with its connection.
    sentinels: Vec<(String, ConnectionManager)>,
    master_name: String,
    /// The master's credentials and database (from `redis.url`).
    master_info: ConnectionInfo,
    config: ConnectionManagerConfig,
    /// The master's address and connection, as last named.
    master: Mutex<Option<(String, ConnectionManager)>>,
}

impl std::fmt::Debug for Sentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinel")
            .field("master_name", &self.master_name)
            .finish_non_exhaustive()
    }
}

impl Sentinel {
    /// Checks the sentinel addresses (`host:port`) without connecting.
    pub(super) fn new(
        sentinels: &[String],
        master_name: &str,
        master_info: ConnectionInfo,
        config: ConnectionManagerConfig,
    ) -> Result<Self, BackendError> {
        let sentinels = sentinels
            .iter()
            .map(|addr| {
                let (host, port) = super::host_port(addr).ok_or_else(|| {
                    BackendError::Setting(format!(
                        "redis.sentinels has {addr:?}; give each sentinel as host:port"
                    ))
                })?;
                let client = redis::Client::open(ConnectionAddr::Tcp(host.to_owned(), port))?;
                let conn = ConnectionManager::new_lazy_with_config(client, config.clone())?;
                Ok((addr.clone(), conn))
            })
            .collect::<Result<_, BackendError>>()?;
        Ok(Self {
            sentinels,
            master_name: master_name.to_owned(),
            master_info,
            config,
            master: Mutex::new(None),
        })
    }

    /// The connection to the node the sentinels name master now.
    pub(super) async fn master(&self) -> Result<ConnectionManager, BackendError> {
        let addr = self.master_addr().await?;
        let mut master = self.master.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((known, conn)) = master.as_ref()
            && *known == addr
        {
            return Ok(conn.clone());
        }
        tracing::info!(master = %addr, name = %self.master_name, "the sentinels name this node master");
        let conn = super::connect_to(&self.master_info, &addr, &self.config)?.ok_or(
            BackendError::Protocol(
                "a sentinel named the master at an address that is not host:port",
            ),
        )?;
        *master = Some((addr, conn.clone()));
        Ok(conn)
    }

    /// Asks each sentinel in turn until one names the master.
    async fn master_addr(&self) -> Result<String, BackendError> {
        let mut failures = Vec::new();
        for (addr, conn) in &self.sentinels {
            let named: redis::RedisResult<Option<(String, String)>> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&self.master_name)
                .query_async(&mut conn.clone())
                .await;
            match named {
                Ok(Some((host, port))) => return Ok(format!("{host}:{port}")),
                Ok(None) => {
                    return Err(BackendError::Unsupported(format!(
                        "the sentinel at {addr} knows no master named {:?}; set redis.sentinel_master to the name in its `sentinel monitor` line",
                        self.master_name
                    )));
                }
                Err(err) => failures.push(format!("{addr}: {err}")),
            }
        }
        Err(BackendError::SentinelsUnreachable(failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::super::host_port;

    #[test]
    fn sentinels_are_host_and_port() {
        assert_eq!(host_port("10.0.0.5:26379"), Some(("10.0.0.5", 26379)));
        assert_eq!(host_port("[::1]:26379"), Some(("::1", 26379)));
        assert_eq!(
            host_port("sentinel-0.redis:26379"),
            Some(("sentinel-0.redis", 26379))
        );
        assert_eq!(host_port("sentinel-0"), None);
        assert_eq!(host_port(":26379"), None);
        assert_eq!(host_port("host:port"), None);
    }
}
