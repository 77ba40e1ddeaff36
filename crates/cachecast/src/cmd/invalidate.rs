//! `cachecast invalidate`: one invalidation over NATS, with live progress and each agent's
//! outcome.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cachecast_proto::{IdentitySelector, KeyedSelector, ResponseSelector, Target};
use cachecast_publisher::{AgentOutcome, InvalidationRequest, Outcome, PublishError};

use crate::cli::{CacheKind, InvalidateArgs, ProgressMode};
use crate::config::Config;

/// Bad arguments (as clap's own usage errors).
const EXIT_BAD_ARGUMENTS: u8 = 2;
/// Some agent failed or did not answer in time.
const EXIT_NOT_CONFIRMED: u8 = 3;
/// The bus was unavailable: nothing published.
const EXIT_UNAVAILABLE: u8 = 4;

pub(crate) async fn run(config: Config, args: InvalidateArgs) -> anyhow::Result<ExitCode> {
    let target = match target(&args) {
        Ok(target) => target,
        Err(message) => {
            eprintln!("error: {message}");
            return Ok(ExitCode::from(EXIT_BAD_ARGUMENTS));
        }
    };
    let publisher = match super::publisher_once(&config.bus()).await {
        Ok(p) => p,
        Err(err) => {
            eprintln!("error: {err:#}");
            return Ok(ExitCode::from(EXIT_UNAVAILABLE));
        }
    };
    let request = InvalidationRequest {
        env: args.env.clone(),
        target,
        request_id: args
            .request_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        timeout: args.timeout,
        caller: Some(format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )),
    };
    let mut in_flight = match publisher.begin(request).await {
        Ok(in_flight) => in_flight,
        Err(PublishError::Unavailable(reason)) => {
            eprintln!(
                "error: the bus is unavailable ({reason}); nothing was published, retry shortly"
            );
            return Ok(ExitCode::from(EXIT_UNAVAILABLE));
        }
        Err(PublishError::Invalid(message)) => {
            eprintln!("error: {message}");
            return Ok(ExitCode::from(EXIT_BAD_ARGUMENTS));
        }
    };
    let show_progress = match args.progress {
        ProgressMode::Always => true,
        ProgressMode::Never => false,
        ProgressMode::Auto => !args.json && std::io::stderr().is_terminal(),
    };
    let mut progress = Progress::new(show_progress, in_flight.agents().len());
    while let Some((_, outcome)) = in_flight.next_ack().await {
        progress.record(&outcome);
    }
    let outcome = in_flight.finish();
    progress.done(&outcome);
    if args.json {
        // A keyed cache answers Elasticsearch's way, as the API does.
        let cluster_name =
            (args.kind == CacheKind::Keyed).then_some(config.api.cluster_name.as_str());
        let body = cachecast_publisher::api::outcome_body(&outcome, cluster_name);
        println!("{}", serde_json::to_string(&body)?);
    } else {
        print_table(&outcome);
    }
    Ok(if outcome.confirmed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_CONFIRMED)
    })
}

/// What the arguments ask to evict, or what is wrong with them.
fn target(args: &InvalidateArgs) -> Result<Target, String> {
    let misplaced = |flag: &str, kind: &str| Err(format!("{flag} does not apply to --kind {kind}"));
    match args.kind {
        CacheKind::Response => {
            if args.identity_template.is_some() {
                return misplaced("--identity-template", "response (use --kind identity)");
            }
            if args.cache.is_some() || args.ids.is_some() {
                return misplaced("--cache and --ids", "response (use --kind keyed)");
            }
            let mut scopes = args.scopes.clone();
            scopes.sort();
            scopes.dedup();
            Ok(Target::Response(ResponseSelector {
                scope_client_ids: scopes,
                identity_id: args.identity.clone(),
            }))
        }
        CacheKind::Identity => {
            if !args.scopes.is_empty() || args.cache.is_some() || args.ids.is_some() {
                return misplaced("--scope, --cache and --ids", "identity");
            }
            if args.identity.is_none() && args.identity_template.is_none() {
                return Err("--kind identity needs --identity-template, --identity or both".into());
            }
            Ok(Target::Identity(IdentitySelector {
                identity_template: args.identity_template.clone(),
                identity_id: args.identity.clone(),
            }))
        }
        CacheKind::Keyed => {
            if !args.scopes.is_empty()
                || args.identity.is_some()
                || args.identity_template.is_some()
            {
                return misplaced("--scope, --identity and --identity-template", "keyed");
            }
            let (Some(cache), Some(ids)) = (&args.cache, &args.ids) else {
                return Err(
                    "--kind keyed needs --cache NAME and --ids ID[,ID...] (or --ids '*')".into(),
                );
            };
            let (ids, all) = if ids == "*" {
                (Vec::new(), true)
            } else {
                let mut ids: Vec<String> = ids.split(',').map(str::to_owned).collect();
                ids.sort();
                ids.dedup();
                (ids, false)
            };
            Ok(Target::Keyed(KeyedSelector {
                cache: cache.clone(),
                ids,
                all,
            }))
        }
    }
}

/// The progress line on stderr: `412/1000 agents confirmed`, redrawn at most every 50 ms.
struct Progress {
    enabled: bool,
    expected: usize,
    confirmed: usize,
    failed: usize,
    drawn_at: Option<Instant>,
}

impl Progress {
    const WIDTH: usize = 30;

    fn new(enabled: bool, expected: usize) -> Self {
        let mut progress = Self {
            enabled,
            expected,
            confirmed: 0,
            failed: 0,
            drawn_at: None,
        };
        progress.draw(true);
        progress
    }

    fn record(&mut self, outcome: &AgentOutcome) {
        if outcome.is_applied() {
            self.confirmed += 1;
        } else {
            self.failed += 1;
        }
        self.draw(self.confirmed + self.failed == self.expected);
    }

    fn draw(&mut self, force: bool) {
        if !self.enabled
            || (!force
                && self
                    .drawn_at
                    .is_some_and(|at| at.elapsed() < Duration::from_millis(50)))
        {
            return;
        }
        self.drawn_at = Some(Instant::now());
        let filled = (self.confirmed + self.failed)
            .checked_mul(Self::WIDTH)
            .and_then(|n| n.checked_div(self.expected))
            .unwrap_or(Self::WIDTH);
        let failed = if self.failed > 0 {
            format!(", {} failed", self.failed)
        } else {
            String::new()
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{}{}] {}/{} agents confirmed{failed}",
            "#".repeat(filled),
            "-".repeat(Self::WIDTH - filled),
            self.confirmed,
            self.expected,
        );
        let _ = err.flush();
    }

    /// The last line: every agent counted, those that never answered too.
    fn done(&mut self, outcome: &Outcome) {
        if !self.enabled {
            return;
        }
        self.draw(true);
        let silent = self.expected - self.confirmed - self.failed;
        if silent > 0 {
            eprint!(", {silent} did not answer in time");
        }
        eprintln!();
        debug_assert_eq!(outcome.successful(), self.confirmed);
    }
}

fn print_table(outcome: &Outcome) {
    println!(
        "{:<40} {:<10} {:>8} {:>10}  ERROR",
        "AGENT", "STATUS", "EVICTED", "LATENCY"
    );
    for (id, o) in &outcome.agents {
        let evicted = match o {
            AgentOutcome::Applied { evicted, .. } => evicted.to_string(),
            _ => "-".into(),
        };
        println!(
            "{:<40} {:<10} {:>8} {:>7.1} ms  {}",
            id.as_str(),
            o.status(),
            evicted,
            o.latency().as_secs_f64() * 1000.0,
            o.reason().unwrap_or_default()
        );
    }
    println!(
        "{} of {} agents confirmed in {} (sequence {}, request {})",
        outcome.successful(),
        outcome.agents.len(),
        outcome.env,
        outcome.sequence,
        outcome.request_id
    );
}
