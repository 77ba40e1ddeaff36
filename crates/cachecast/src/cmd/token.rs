//! `cachecast token`: a signed JWT for the API.

use std::process::ExitCode;

use cachecast_bus::Secret;
use cachecast_publisher::auth::{DEV_SECRET, issue_hs256};

use crate::cli::TokenArgs;
use crate::config::Config;

pub(crate) fn run(config: &Config, args: &TokenArgs) -> anyhow::Result<ExitCode> {
    let secret = match &config.auth.hs256_secret {
        Some(secret) => secret.clone(),
        None => {
            tracing::info!(
                "auth.hs256_secret is not set: signing with the dev secret of `cachecast up`"
            );
            Secret::new(DEV_SECRET)
        }
    };
    let token = issue_hs256(
        &secret,
        &config.auth.envs_claim,
        &args.envs,
        &args.subject,
        args.ttl,
    )?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}
