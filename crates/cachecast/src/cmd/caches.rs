//! `cachecast caches`: the persistent caches of an environment, and forgetting one.

use std::process::ExitCode;

use crate::cli::{CachesAction, CachesArgs};
use crate::config::Config;

pub(crate) async fn run(config: Config, args: CachesArgs) -> anyhow::Result<ExitCode> {
    let publisher = super::publisher_once(&config.bus()).await?;
    if let Some(CachesAction::Forget { env, cache }) = args.action {
        return Ok(if publisher.forget_cache(&env, &cache).await? {
            println!("forgot cache {cache} of {env}: requests no longer expect it");
            ExitCode::SUCCESS
        } else {
            eprintln!(
                "no cache {cache} is registered in {env}; `cachecast caches --env {env}` lists them"
            );
            ExitCode::FAILURE
        });
    }
    let Some(env) = args.env else {
        anyhow::bail!("name the environment: cachecast caches --env <ENV>");
    };
    let caches = publisher.caches(&env);
    if args.json {
        let list: Vec<_> = caches
            .iter()
            .map(|c| {
                serde_json::json!({
                    "id": c.id.as_str(),
                    "backend": c.backend,
                    "state": match (c.attended_by.is_empty(), &c.lagging) {
                        (true, _) => "unattended",
                        (false, Some(_)) => "lagging",
                        (false, None) => "attended",
                    },
                    "lagging": c.lagging,
                    "attendedBy": c.attended_by.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
                    "unattendedForMs": c.unattended_for.map(|d| d.as_millis() as u64),
                    "keyedCaches": c.keyed_caches,
                    "registeredBy": c.registered_by,
                    "registeredAtUnixMs": c.registered_at_unix_ms,
                    "appliedSequence": c.progress.map(|p| p.applied_sequence),
                    "lagEvents": c.progress.map(|p| p.lag_events),
                    "lagMs": c.progress.map(|p| p.lag.as_millis() as u64),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "envId": env.as_str(), "caches": list })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<48} {:<8} {:>10} {:>10} {:>9}  STATE",
        "CACHE", "BACKEND", "POSITION", "LAG", "LAG (s)"
    );
    for c in &caches {
        let state = if !c.attended_by.is_empty() {
            let agents: Vec<&str> = c.attended_by.iter().map(|a| a.as_str()).collect();
            let lagging = c
                .lagging
                .as_ref()
                .map(|r| format!(", LAGGING: {r}"))
                .unwrap_or_default();
            format!("attended by {}{lagging}", agents.join(", "))
        } else if let Some(d) = c.unattended_for {
            format!("unattended for {} s", d.as_secs())
        } else {
            "unattended (since before this command could see)".into()
        };
        let (position, lag, lag_s) = match c.progress {
            Some(p) => (
                p.applied_sequence.to_string(),
                p.lag_events.to_string(),
                format!("{:.1}", p.lag.as_secs_f64()),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<48} {:<8} {position:>10} {lag:>10} {lag_s:>9}  {state}",
            c.id.as_str(),
            c.backend
        );
    }
    println!("{} persistent cache(s) in {env}", caches.len());
    Ok(ExitCode::SUCCESS)
}
