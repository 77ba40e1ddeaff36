//! `cachecast caches`: the persistent caches of an environment, and forgetting one.

use std::process::ExitCode;

use cachecast_publisher::api::CacheView;

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
        // The caches of the API's inventory (GET /api/1.0/runtime/caches/{envId}).
        let list: Vec<CacheView> = caches.iter().map(CacheView::from).collect();
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
