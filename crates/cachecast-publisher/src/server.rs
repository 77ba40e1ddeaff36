//! The one assembly of what a publisher process serves, used by `serve`, `up` and the test
//! harness: the HTTP API with the admin routes on one listener, and the NATS service.
//!
//! Shutdown runs in order. Readiness fails and the NATS service stops taking requests at once
//! (another replica takes them); HTTP takes new requests for `api.shutdown_delay` more, so a
//! load balancer sees the failing readiness first. Then in-flight HTTP requests and NATS-service
//! requests get their real answers, each by its own deadline (`api.max_timeout` plus 5 s at
//! most); then the audit records still waiting are written, and what the client still holds is
//! flushed.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use cachecast_admin::Health;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Publisher;
use crate::api::ApiConfig;
use crate::auth::Verifier;
use crate::http;

/// What a publisher process serves.
#[derive(Debug)]
pub struct Server {
    pub publisher: Publisher,
    pub verifier: Verifier,
    pub config: ApiConfig,
    /// Readiness, failed at shutdown.
    pub health: Health,
    /// The admin routes (`/healthz`, `/readyz`, `/metrics`), served next to the API.
    pub admin: Router,
}

impl Server {
    /// Serves on `listener` until `shutdown` resolves, then stops in order (see the module).
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Server {
            publisher,
            verifier,
            config,
            health,
            admin,
        } = self;
        let client = publisher.client().clone();
        let (stopping, _) = watch::channel(false);
        let stopped = {
            let mut stopping = stopping.subscribe();
            async move {
                let _ = stopping.wait_for(|s| *s).await;
            }
        };
        let service = config.nats_service.then(|| {
            tokio::spawn(crate::service::run(
                client.clone(),
                publisher.clone(),
                config.clone(),
                stopped,
            ))
        });
        let audit = publisher.clone();
        let (router, peers) = http::router(publisher, verifier, config.clone());
        let router = router.merge(admin);
        let peers = tokio::spawn(peers);
        let delay = config.shutdown_delay;
        let (stop_accepting, accepting_stopped) = tokio::sync::oneshot::channel::<()>();
        let http_shutdown = async move {
            shutdown.await;
            health.begin_shutdown();
            stopping.send_replace(true);
            tokio::time::sleep(delay).await;
            tracing::info!("no new requests; finishing the ones in flight");
            stop_accepting.send(()).ok();
        };
        let server = http::serve(listener, router, &config, http_shutdown);
        tokio::pin!(server);
        // In-flight requests end by their own deadline; don't wait past the longest one.
        let grace = config.max_timeout + Duration::from_secs(5);
        let served = tokio::select! {
            result = &mut server => result,
            () = async {
                accepting_stopped.await.ok();
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "requests still in flight after the grace period; stopping anyway");
                Ok(())
            }
        };
        if let Some(service) = service {
            if served.is_err() {
                service.abort();
            }
            match service.await {
                Ok(Err(err)) => tracing::warn!(error = %err, "the NATS service did not run"),
                Err(err) if !err.is_cancelled() => {
                    tracing::warn!(error = %err, "the NATS service task failed")
                }
                _ => {}
            }
        }
        // Nothing is served any more: no status to tell other replicas about.
        peers.abort();
        peers.await.ok();
        // The last answers' audit records may still wait for company.
        let last_writes = config.max_timeout.min(Duration::from_secs(5));
        if tokio::time::timeout(last_writes, audit.flush_audit())
            .await
            .is_err()
        {
            tracing::warn!(
                ?last_writes,
                "audit records still unwritten at shutdown are lost"
            );
        }
        cachecast_bus::flush(&client, last_writes).await;
        served
    }
}
