//! The effective configuration: defaults < TOML file < `CACHECAST_*` variables < flags.
//!
//! Nested keys in variables use a double underscore: `CACHECAST_NATS__URL` sets `nats.url`,
//! `CACHECAST_AGENT__ENV` sets `agent.env`. `CACHECAST_CONFIG` names the file.

use std::path::Path;

use anyhow::{Context, bail};
use cachecast_agent::{AgentConfig, HttpConfig, KubernetesConfig, RedisConfig};
use cachecast_bus::{
    AuditConfig, BusConfig, CachesConfig, NatsConfig, PresenceConfig, StreamConfig,
};
use cachecast_publisher::api::ApiConfig;
use cachecast_publisher::auth::AuthConfig;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Everything cachecast can be configured with. Each command reads the sections it needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) nats: NatsConfig,
    pub(crate) stream: StreamConfig,
    pub(crate) presence: PresenceConfig,
    pub(crate) caches: CachesConfig,
    pub(crate) audit: AuditConfig,
    pub(crate) api: ApiConfig,
    pub(crate) auth: AuthConfig,
    pub(crate) agent: AgentConfig,
    pub(crate) redis: RedisConfig,
    pub(crate) http: HttpConfig,
    pub(crate) kubernetes: KubernetesConfig,
}

impl Config {
    /// The bus settings shared by publishers and agents.
    pub(crate) fn bus(&self) -> BusConfig {
        BusConfig {
            nats: self.nats.clone(),
            stream: self.stream.clone(),
            presence: self.presence.clone(),
            caches: self.caches.clone(),
            audit: self.audit.clone(),
        }
    }

    /// The configuration as TOML, with every secret redacted.
    pub(crate) fn to_redacted_toml(&self) -> anyhow::Result<String> {
        toml::to_string_pretty(self).context("could not render the configuration")
    }
}

/// Flag values that override configuration keys, as (dotted key, value).
#[derive(Debug, Default)]
pub(crate) struct Overrides(Vec<(&'static str, toml::Value)>);

impl Overrides {
    pub(crate) fn set(&mut self, key: &'static str, value: Option<impl Into<toml::Value>>) {
        if let Some(value) = value {
            self.0.push((key, value.into()));
        }
    }
}

/// Loads the configuration; an invalid one fails here with a message naming the key.
pub(crate) fn load(file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Config> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        if !path.is_file() {
            bail!(
                "config file {} does not exist: pass an existing file to --config (or CACHECAST_CONFIG)",
                path.display()
            );
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(
        Env::prefixed("CACHECAST_")
            .filter(|key| {
                // Every key is in a section (CACHECAST_NATS__URL). Others are not ours:
                // Kubernetes injects CACHECAST_API_PORT & co. for a Service named cachecast-api.
                let ours = key.as_str().contains("__");
                if !ours && !key.as_str().eq_ignore_ascii_case("config") {
                    tracing::warn!(
                        variable = %format!("CACHECAST_{}", key.as_str().to_uppercase()),
                        "ignored: configuration variables name a section and a key with a double underscore, like CACHECAST_NATS__URL"
                    );
                }
                ours
            })
            .split("__"),
    );
    for (key, value) in overrides.0 {
        figment = figment.merge(Serialized::default(key, value));
    }
    figment.extract().map_err(|err| {
        let mut message = String::from("invalid configuration:");
        for e in err {
            let key = e.path.join(".").to_lowercase();
            let from = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(source) => format!(" (from {source})"),
                    None => format!(" (from {})", m.name),
                })
                .unwrap_or_default();
            message.push_str(&format!("\n  - {key}: {}{from}", e.kind));
        }
        anyhow::anyhow!(message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn layers_apply_in_order_and_errors_name_the_key() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            file,
            "[nats]\nurl = \"nats://file:4222\"\n[api]\nlisten = \"127.0.0.1:9999\"\n[agent]\nenv = \"qa\""
        )
        .expect("write");
        let mut overrides = Overrides::default();
        overrides.set("agent.env", Some("prod"));
        let config = load(Some(file.path()), overrides).expect("loads");
        assert_eq!(config.nats.url, "nats://file:4222");
        assert_eq!(config.api.listen.port(), 9999);
        assert_eq!(
            config.agent.env.map(|e| e.to_string()).as_deref(),
            Some("prod")
        );

        let mut bad = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(bad, "[api]\ndefault_timeout = \"soon\"").expect("write");
        let err = load(Some(bad.path()), Overrides::default())
            .expect_err("invalid duration")
            .to_string();
        assert!(err.contains("default_timeout"), "{err}");

        let mut typo = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(typo, "[nats]\nulr = \"x\"").expect("write");
        let err = load(Some(typo.path()), Overrides::default())
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("ulr"), "{err}");

        let mut bad_env = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(bad_env, "[agent]\nenv = \"a.b\"").expect("write");
        let err = load(Some(bad_env.path()), Overrides::default())
            .expect_err("invalid env id")
            .to_string();
        assert!(err.contains("environment id"), "{err}");
    }

    #[test]
    fn printed_config_hides_secrets() {
        let mut config = Config::default();
        config.auth.hs256_secret = Some(cachecast_bus::Secret::new("hunter2"));
        config.redis.url = "redis://:swordfish@127.0.0.1:6379".into();
        let printed = config.to_redacted_toml().expect("renders");
        assert!(
            !printed.contains("hunter2") && !printed.contains("swordfish"),
            "{printed}"
        );
        assert!(printed.contains("<redacted>"));
    }
}
