//! Shutdown on SIGTERM or Ctrl-C, as a future any number of tasks can wait on.

use tokio::sync::watch;

/// Resolves [`Shutdown::wait`] for every clone once a signal arrives (or [`Shutdown::trigger`]).
#[derive(Debug, Clone)]
pub(crate) struct Shutdown {
    rx: watch::Receiver<bool>,
    tx: std::sync::Arc<watch::Sender<bool>>,
}

impl Shutdown {
    /// Listens for SIGTERM and Ctrl-C.
    pub(crate) fn on_signals() -> Self {
        let (tx, rx) = watch::channel(false);
        let tx = std::sync::Arc::new(tx);
        let sender = tx.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            sender.send_replace(true);
        });
        Self { rx, tx }
    }

    /// Starts the shutdown from inside the program.
    pub(crate) fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Resolves once shutdown has begun.
    pub(crate) async fn wait(mut self) {
        let _ = self.rx.wait_for(|down| *down).await;
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
