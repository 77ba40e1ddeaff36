//! `cachecast agents`: the live agents of an environment.

use std::process::ExitCode;

use cachecast_publisher::api::AgentView;

use crate::cli::AgentsArgs;
use crate::config::Config;

pub(crate) async fn run(config: Config, args: AgentsArgs) -> anyhow::Result<ExitCode> {
    let publisher = super::publisher_once(&config.bus()).await?;
    let agents = publisher.live_agents(&args.env);
    if args.json {
        // The agents of the API's inventory (GET /api/1.0/runtime/caches/{envId}).
        let list: Vec<AgentView> = agents.iter().map(AgentView::from).collect();
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
