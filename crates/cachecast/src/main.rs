//! The `cachecast` command: the API server, the agent, and the tools around them.

mod cli;
mod cmd;
mod config;
mod shutdown;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

// glibc's malloc took a sixth of the CPU of a publisher and its agents (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = telemetry::init(
        cli.log_format,
        cli.command.service_name(),
        cli.default_log_filter(),
    );
    let code = run(cli);
    // After the runtime is gone: the exporter's blocking client must not run inside it.
    telemetry.shutdown();
    code
}

fn run(cli: Cli) -> ExitCode {
    let config = match config::load(cli.config.as_deref(), cli.overrides()) {
        Ok(config) => config,
        Err(err) => return fail(&err),
    };
    if cli.print_config {
        return match config.to_redacted_toml() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        };
    }
    if cli.check_config {
        return match cmd::check_config(&cli.command, &config) {
            Ok(()) => {
                println!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        };
    }
    // Before anything records: connection events happen first.
    cachecast_admin::install_metrics();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => return fail(&err.into()),
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(_) => cmd::serve::run(config).await,
            Command::Agent(_) => cmd::agent::run(config).await,
            Command::Invalidate(args) => cmd::invalidate::run(config, args).await,
            Command::Agents(args) => cmd::agents::run(config, args).await,
            Command::Caches(args) => cmd::caches::run(config, args).await,
            Command::Token(args) => cmd::token::run(&config, &args),
            Command::Up(args) => cmd::up::run(config, args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => fail(&err),
    }
}

fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::FAILURE
}
