//! How every cachecast HTTP listener serves its connections: bounded in number and in how long
//! a client may take to send a request's headers, with accept errors logged and counted.
//!
//! `axum::serve` keeps a connection that never finishes its headers open for ever and takes
//! every connection it can accept, so one slow client can hold every file descriptor. This loop
//! closes such connections after [`ConnectionLimits::header_read_timeout`], closes connections
//! beyond [`ConnectionLimits::max_connections`] at once, and keeps serving when `accept` fails
//! (`EMFILE`), so the connections it holds still get their answers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use cachecast_bus::LogLimiter;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

/// What a listener allows its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// How long a connection may take to send a request's headers, counted from when it opens
    /// or from when its previous answer was sent: so it is also how long an idle keep-alive
    /// connection stays open.
    pub header_read_timeout: Duration,
    /// The most connections served at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// How long `accept` rests after running out of file descriptors or memory, so the loop does
/// not spin while connections it holds finish and free some.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then stops
/// accepting and waits for the connections it holds to finish their requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let warnings = LogLimiter::new(Duration::from_secs(10));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let open = metrics::gauge!("cachecast_http_connections_open");
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(err) => {
                accept_failed(&err, &warnings).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once: held, it would cost a descriptor and memory the limit is there
            // to protect.
            drop(tcp);
            metrics::counter!("cachecast_http_connections_refused_total").increment(1);
            if let Some(left_out) = warnings.allow("max_connections") {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    left_out,
                    "connection closed: the listener holds its maximum; raise the max_connections setting if these are real clients"
                );
            }
            continue;
        };
        // Answers are small and latency is the point: no Nagle delay.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
        let connection =
            http1.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        let open = open.clone();
        tokio::spawn(async move {
            open.increment(1.0);
            if let Err(err) = connection.await {
                if err.is_timeout() {
                    metrics::counter!("cachecast_http_header_timeouts_total").increment(1);
                }
                tracing::debug!(error = %err, "connection ended with an error");
            }
            open.decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Logs (rate-limited) and counts a failed `accept`; rests when the process ran out of a
/// resource, since only finishing connections can free it.
async fn accept_failed(err: &std::io::Error, warnings: &LogLimiter) {
    let errno = err.raw_os_error().map(nix::errno::Errno::from_raw);
    let kind = match errno {
        Some(nix::errno::Errno::EMFILE) => "EMFILE",
        Some(nix::errno::Errno::ENFILE) => "ENFILE",
        Some(nix::errno::Errno::ENOBUFS) => "ENOBUFS",
        Some(nix::errno::Errno::ENOMEM) => "ENOMEM",
        Some(nix::errno::Errno::ECONNABORTED) => "ECONNABORTED",
        _ => "other",
    };
    metrics::counter!("cachecast_http_accept_errors_total", "kind" => kind).increment(1);
    if let Some(left_out) = warnings.allow(kind) {
        let hint = match kind {
            "EMFILE" | "ENFILE" => {
                "out of file descriptors: raise the open-files limit (ulimit -n) above the max_connections setting, or lower it"
            }
            "ENOBUFS" | "ENOMEM" => "out of memory for sockets",
            _ => "the client went away or the kernel refused the connection",
        };
        tracing::warn!(error = %err, kind, left_out, "could not accept a connection: {hint}");
    }
    if matches!(kind, "EMFILE" | "ENFILE" | "ENOBUFS" | "ENOMEM") {
        tokio::time::sleep(RESOURCE_BACKOFF).await;
    }
}
