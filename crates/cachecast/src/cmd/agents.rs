//! `cachecast agents`: the live agents of an environment.

use std::process::ExitCode;

use crate::cli::AgentsArgs;
use crate::config::Config;

pub(crate) async fn run(config: Config, args: AgentsArgs) -> anyhow::Result<ExitCode> {
    let publisher = super::publisher_once(&config.bus()).await?;
    let agents = publisher.live_agents(&args.env);
    if args.json {
        let list: Vec<_> = agents
            .iter()
            .map(|a| {
                serde_json::json!({
                    "id": a.id.as_str(),
                    "backend": a.backend,
                    "version": a.version,
                    "lastSeenMs": a.last_seen.as_millis() as u64,
                    "cacheId": a.cache_id.as_ref().map(|c| c.as_str()),
                    "appliedSequence": a.progress.applied_sequence,
                    "lagEvents": a.progress.lag_events,
                    "lagMs": a.progress.lag.as_millis() as u64,
                    "lagging": a.lagging,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "envId": args.env.as_str(), "agents": list })
        );
    } else {
        println!(
            "{:<40} {:<8} {:<8} {:>10} {:>8}  LAST SEEN",
            "AGENT", "BACKEND", "VERSION", "POSITION", "LAG"
        );
        for a in &agents {
            let lagging = a
                .lagging
                .as_ref()
                .map(|r| format!("  LAGGING: {r}"))
                .unwrap_or_default();
            println!(
                "{:<40} {:<8} {:<8} {:>10} {:>8}  {} ms ago{lagging}",
                a.id.as_str(),
                a.backend,
                a.version,
                a.progress.applied_sequence,
                a.progress.lag_events,
                a.last_seen.as_millis()
            );
        }
        println!("{} live agent(s) in {}", agents.len(), args.env);
    }
    Ok(ExitCode::SUCCESS)
}
