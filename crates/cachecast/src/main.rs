//! The `cachecast` command: the API server, the agent, and the tools around them.

mod cli;
mod cmd;
mod config;
mod shutdown;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
