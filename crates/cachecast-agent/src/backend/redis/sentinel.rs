//! A Redis behind Sentinel: before each command sequence the agent asks the sentinels which
//! node is the master (a majority must agree, and the node must say it is one), and talks to
//! that one; an eviction counts only if the same node is master after it. A failover puts another process there; the
//! backend's continuity (the master's `run_id`) then changes, and the agent flushes, since a
//! promoted replica may lag behind evictions its old master applied.

use std::collections::HashMap;
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

    /// The node a majority of the sentinels name master now, and its connection, once the
    /// node itself says it is a master. A minority of sentinels cut off with an old master
    /// could name it still: the PDPs on the majority's side read the new one.
    pub(super) async fn master(&self) -> Result<(String, ConnectionManager), BackendError> {
        let addr = self.master_addr().await?;
        let known = self
            .master
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .filter(|(known, _)| *known == addr);
        let mut conn = match known {
            Some((_, conn)) => conn,
            None => {
                tracing::info!(master = %addr, name = %self.master_name, "the sentinels name this node master");
                let conn = super::connect_to(&self.master_info, &addr, &self.config)?.ok_or(
                    BackendError::Protocol(
                        "a sentinel named the master at an address that is not host:port",
                    ),
                )?;
                *self.master.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((addr.clone(), conn.clone()));
                conn
            }
        };
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        let role: Option<String> = role
            .first()
            .and_then(|r| redis::from_redis_value(r.clone()).ok());
        if role.as_deref() != Some("master") {
            return Err(BackendError::RedisUnsettled(format!(
                "the sentinels name {addr} master, but it says it is {} (a failover under way)",
                role.as_deref().unwrap_or("unknown")
            )));
        }
        Ok((addr, conn))
    }

    /// The address a majority of the sentinels give for the master.
    pub(super) async fn master_addr(&self) -> Result<String, BackendError> {
        let asks = self.sentinels.iter().map(|(addr, conn)| async move {
            let named: redis::RedisResult<Option<(String, String)>> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&self.master_name)
                .query_async(&mut conn.clone())
                .await;
            match named {
                Ok(Some((host, port))) => Answer::Names(format!("{host}:{port}")),
                Ok(None) => Answer::Unknown,
                Err(err) => Answer::Failed(format!("{addr}: {err}")),
            }
        });
        let answers = futures::future::join_all(asks).await;
        elect(&answers, &self.master_name)
    }
}

/// What one sentinel said of the master.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Names(String),
    /// It knows no master of that name.
    Unknown,
    Failed(String),
}

/// The master a majority of the sentinels (every one asked counts) names.
fn elect(answers: &[Answer], name: &str) -> Result<String, BackendError> {
    let majority = answers.len() / 2 + 1;
    let mut votes: HashMap<&str, usize> = HashMap::new();
    for answer in answers {
        if let Answer::Names(addr) = answer {
            *votes.entry(addr.as_str()).or_default() += 1;
        }
    }
    if let Some((addr, _)) = votes.iter().find(|(_, n)| **n >= majority) {
        return Ok((*addr).to_owned());
    }
    let unknown = answers.iter().filter(|a| **a == Answer::Unknown).count();
    if unknown >= majority {
        return Err(BackendError::Unsupported(format!(
            "the sentinels know no master named {name:?}; set redis.sentinel_master to the name in their `sentinel monitor` line"
        )));
    }
    let failures: Vec<&str> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Failed(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    if failures.len() >= majority {
        return Err(BackendError::SentinelsUnreachable(failures.join("; ")));
    }
    Err(BackendError::RedisUnsettled(format!(
        "no majority of the {} sentinels names one master (they name {votes:?}; {unknown} know none; {} did not answer)",
        answers.len(),
        failures.len()
    )))
}

#[cfg(test)]
mod tests {
    use super::super::host_port;
    use super::{Answer, BackendError, elect};

    #[test]
    fn a_majority_of_the_sentinels_names_the_master() {
        let names = |addr: &str| Answer::Names(addr.to_owned());
        let failed = Answer::Failed("s3: timed out".into());
        assert_eq!(
            elect(&[names("a:6379"), names("a:6379"), names("b:6379")], "m").ok(),
            Some("a:6379".to_owned()),
            "a sentinel cut off with the old master is outvoted"
        );
        assert!(matches!(
            elect(&[names("a:6379"), names("b:6379"), failed.clone()], "m"),
            Err(BackendError::RedisUnsettled(_))
        ));
        assert!(matches!(
            elect(&[names("a:6379"), failed.clone(), failed.clone()], "m"),
            Err(BackendError::SentinelsUnreachable(_))
        ));
        assert!(matches!(
            elect(&[Answer::Unknown, Answer::Unknown, names("a:6379")], "m"),
            Err(BackendError::Unsupported(reason)) if reason.contains("redis.sentinel_master")
        ));
        assert_eq!(
            elect(&[names("a:6379")], "m").ok(),
            Some("a:6379".to_owned())
        );
    }

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
