//! `cachecast token`: a signed JWT for the API, with environments and rights.

use std::process::ExitCode;

use anyhow::Context;
use cachecast_bus::Secret;
use cachecast_publisher::auth::{DEV_SECRET, Right, Signer, TokenSpec};

use crate::cli::{RightArg, TokenArgs};
use crate::config::Config;

pub(crate) fn run(config: &Config, args: &TokenArgs) -> anyhow::Result<ExitCode> {
    let signer = match &args.private_key {
        Some(path) => {
            let pem = std::fs::read(path).with_context(|| {
                format!(
                    "could not read --private-key {}: pass a readable PEM file",
                    path.display()
                )
            })?;
            Signer::from_pem(&pem, args.kid.as_deref())?
        }
        None => match &config.auth.hs256_secret {
            Some(secret) => Signer::hs256(secret),
            None => {
                tracing::info!(
                    "auth.hs256_secret is not set: signing with the dev secret of `cachecast up`"
                );
                Signer::hs256(&Secret::new(DEV_SECRET))
            }
        },
    };
    let rights = if args.rights.is_empty() {
        vec![Right::Scoped, Right::Flush, Right::Read]
    } else {
        let mut rights: Vec<Right> = args
            .rights
            .iter()
            .map(|r| match r {
                RightArg::Scoped => Right::Scoped,
                RightArg::Flush => Right::Flush,
                RightArg::Read => Right::Read,
            })
            .collect();
        rights.dedup();
        rights
    };
    let spec = TokenSpec {
        subject: args.subject.clone(),
        envs: args.envs.clone(),
        rights,
        ttl: args.ttl,
    };
    println!("{}", signer.sign(&config.auth, &spec)?);
    Ok(ExitCode::SUCCESS)
}
