//! `cachecast invalidate`: one invalidation over NATS, with each agent's outcome.

use std::process::ExitCode;

use cachecast_proto::ResponseSelector;
use cachecast_publisher::{AgentOutcome, InvalidationRequest, Outcome, PublishError};

use crate::cli::InvalidateArgs;
use crate::config::Config;

/// Some agent failed or did not answer in time.
const EXIT_NOT_CONFIRMED: u8 = 3;
/// The bus was unavailable: nothing published.
const EXIT_UNAVAILABLE: u8 = 4;

pub(crate) async fn run(config: Config, args: InvalidateArgs) -> anyhow::Result<ExitCode> {
    let publisher = match super::publisher_once(&config.bus()).await {
        Ok(p) => p,
        Err(err) => {
            eprintln!("error: {err:#}");
            return Ok(ExitCode::from(EXIT_UNAVAILABLE));
        }
    };
    let mut scopes = args.scopes.clone();
    scopes.sort();
    scopes.dedup();
    let request = InvalidationRequest {
        env: args.env.clone(),
        selector: ResponseSelector {
            scope_client_ids: scopes,
            identity_id: args.identity.clone(),
        },
        request_id: args
            .request_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        timeout: args.timeout,
    };
    let outcome = match publisher.invalidate(request).await {
        Ok(outcome) => outcome,
        Err(PublishError::Unavailable(reason)) => {
            eprintln!(
                "error: the bus is unavailable ({reason}); nothing was published, retry shortly"
            );
            return Ok(ExitCode::from(EXIT_UNAVAILABLE));
        }
        Err(PublishError::Invalid(message)) => anyhow::bail!("{message}"),
    };
    if args.json {
        let (_, body) = cachecast_publisher::http::outcome_json(&outcome);
        println!("{body}");
    } else {
        print_table(&outcome);
    }
    Ok(if outcome.confirmed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_CONFIRMED)
    })
}

fn print_table(outcome: &Outcome) {
    println!(
        "{:<40} {:<8} {:>8} {:>10}  ERROR",
        "AGENT", "STATUS", "EVICTED", "LATENCY"
    );
    for (id, o) in &outcome.agents {
        let (status, evicted, latency, error) = match o {
            AgentOutcome::Applied { evicted, latency } => {
                ("applied", evicted.to_string(), *latency, "")
            }
            AgentOutcome::Failed { reason, latency } => {
                ("failed", "-".into(), *latency, reason.as_str())
            }
            AgentOutcome::TimedOut { after } => {
                ("timeout", "-".into(), *after, "no acknowledgement")
            }
        };
        println!(
            "{:<40} {:<8} {:>8} {:>7.1} ms  {}",
            id.as_str(),
            status,
            evicted,
            latency.as_secs_f64() * 1000.0,
            error
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
