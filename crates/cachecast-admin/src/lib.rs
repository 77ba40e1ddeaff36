//! The admin surface every cachecast process serves: `/healthz`, `/readyz` and `/metrics`.
//!
//! - `/healthz`: the process is alive (always `200` while it answers).
//! - `/readyz`: `200` when the process can do its job (the readiness check passes), `503` with
//!   the reason otherwise, and `503` from the moment shutdown begins, so load balancers stop
//!   sending work before the process stops taking it.
//! - `/metrics`: Prometheus text of everything recorded through the `metrics` facade. Libraries
//!   record with `metrics::counter!` and friends and never know who exports.
//!
//! [`server::serve`] is how every cachecast HTTP listener (the API and the admin routes) serves
//! connections: with a header read timeout and a cap on connections.

pub mod server;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, in seconds, of every `*_seconds` histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often recorded histogram samples are folded into their summaries. Until then each
/// sample is kept in memory, so without this a process nobody scrapes grows with every event.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

pub use server::ConnectionLimits;

/// A readiness check: `Ok` when ready, else why not.
pub type Check =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Health state shared by the admin routes and the process.
#[derive(Clone)]
pub struct Health {
    shutting_down: Arc<AtomicBool>,
    check: Check,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("shutting_down", &self.shutting_down.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Health {
    /// Health whose readiness is `check`.
    pub fn new<F, Fut>(check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Self {
            shutting_down: Arc::default(),
            check: Arc::new(move || Box::pin(check())),
        }
    }

    /// From now on `/readyz` answers `503`.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Whether the process is ready, and if not, why.
    pub async fn ready(&self) -> Result<(), String> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        (self.check)().await
    }
}

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle),
/// and a thread that runs its upkeep every few seconds whether or not anyone scrapes.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("the bucket list is not empty");
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                Err(err) => {
                    // Another recorder is installed (an embedding application's): keep ours
                    // private so /metrics still renders what we can see.
                    tracing::warn!(error = %err, "a metrics recorder is already installed; /metrics shows only its own view");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// A plain thread, not a task: the recorder is installed before any runtime exists, and the
/// upkeep must run in every process whatever runtime it has.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "could not start the metrics upkeep thread; histograms grow until /metrics is scraped");
    }
}

/// The admin routes.
pub fn router(health: Health, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            "/readyz",
            get(move || {
                let health = health.clone();
                async move { readyz(&health).await }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    metrics.run_upkeep();
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        )
}

async fn readyz(health: &Health) -> Response {
    match health.ready().await {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "ready": true })),
        )
            .into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "ready": false, "reason": reason })),
        )
            .into_response(),
    }
}

/// Serves the admin routes alone on `listener`, within the default [`ConnectionLimits`], until
/// `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(listener, router, ConnectionLimits::default(), shutdown).await
}
