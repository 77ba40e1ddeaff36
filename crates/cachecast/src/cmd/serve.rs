//! `cachecast serve`: the HTTP API.

use std::time::Duration;

use anyhow::Context;
use cachecast_admin::Health;
use cachecast_publisher::Publisher;
use cachecast_publisher::auth::Verifier;
use cachecast_publisher::server::Server;
use std::process::ExitCode;

use crate::config::Config;
use crate::shutdown::Shutdown;

/// How often `serve` looks for pod-lifetime caches whose pod is gone.
const POD_COLLECT_INTERVAL: Duration = Duration::from_secs(30);

pub(crate) async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let verifier = Verifier::new(&config.auth)?;
    super::check_api(&config.api)?;
    if config.auth.allow_hs256 {
        tracing::warn!(
            "auth.allow_hs256 is on: HS256 tokens with a shared secret are accepted; use a JWKS or a public key in production"
        );
    }
    // Fetch the provider's keys now, so the first request does not wait (a failure is
    // retried on the first request that needs them).
    if let Err(err) = verifier.prefetch().await {
        tracing::warn!(error = %err, "could not fetch the JWKS yet");
    }
    let metrics = cachecast_admin::install_metrics();
    let bus = config.bus();
    let shutdown = Shutdown::on_signals();
    let client = super::connect(&bus, "cachecast-serve").await?;
    // Keep trying until the bus is there: the API starts in any order with NATS.
    let publisher = loop {
        match Publisher::start(client.clone(), &bus).await {
            Ok(p) => break p,
            Err(err) => {
                tracing::warn!(error = %err, nats = %cachecast_bus::redact_url(&bus.nats.url), "publisher not ready; retrying in 1s");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.clone().wait() => return Ok(ExitCode::SUCCESS),
                }
            }
        }
    };
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| {
            format!(
                "could not listen on {}: is another process using it? set --listen or api.listen",
                config.api.listen
            )
        })?;
    let addr = listener.local_addr()?;
    tracing::info!("API listening on http://{addr}");
    let health = Health::new({
        let publisher = publisher.clone();
        move || std::future::ready(publisher.readiness())
    });
    let collector = if config.kubernetes.collect_pod_caches {
        let kube = cachecast_agent::Kube::new(&config.kubernetes)?;
        let publisher = publisher.clone();
        Some(tokio::spawn(async move {
            publisher
                .collect_pod_caches(kube, POD_COLLECT_INTERVAL)
                .await
        }))
    } else {
        None
    };
    let server = Server {
        publisher,
        verifier,
        config: config.api.clone(),
        admin: cachecast_admin::router(health.clone(), metrics),
        health,
    };
    server.run(listener, shutdown.wait()).await?;
    if let Some(collector) = collector {
        collector.abort();
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
