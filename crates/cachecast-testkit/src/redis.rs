//! A real redis-server child process on 127.0.0.1 and a free port, with no persistence, that can
//! be stopped, restarted on the same port, paused and resumed. Dropping it kills the process.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::{Child, Command},
};

use crate::{file_tail, find_on_path, free_port};

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A free port can be taken between [`free_port`] and redis binding it; try a few.
const START_ATTEMPTS: usize = 3;

/// Starts a redis-server; see [`RedisServer::start`].
pub async fn redis() -> RedisServer {
    RedisServer::start().await
}

/// A redis-server child process.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// Passed to every start (a cluster node's settings, say).
    extra_args: Vec<String>,
    /// A sentinel's configuration file (sentinels rewrite it), in `dir`.
    sentinel_conf: Option<PathBuf>,
}

impl RedisServer {
    /// Starts `redis-server` from `PATH` on 127.0.0.1 and a free port, without persistence,
    /// and waits (at most 10 s) until it answers PING.
    ///
    /// Panics if there is no redis-server or it does not start.
    pub async fn start() -> RedisServer {
        Self::start_with(&[]).await
    }

    /// Like [`RedisServer::start`], with more `redis-server` arguments (for a cluster node:
    /// `--cluster-enabled yes`; its `nodes.conf` goes to the server's own directory).
    pub async fn start_with(args: &[&str]) -> RedisServer {
        Self::start_in(temp_dir(), args, None).await
    }

    /// Starts a Redis Sentinel (the same binary, `--sentinel`) that watches the master on
    /// 127.0.0.1:`master_port` as `name`, alone (quorum 1), and calls it down after 1 s.
    pub async fn start_sentinel(name: &str, master_port: u16) -> RedisServer {
        let dir = temp_dir();
        let conf = dir.path().join("sentinel.conf");
        let text = format!(
            "sentinel monitor {name} 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 10000\n"
        );
        fs::write(&conf, text)
            .unwrap_or_else(|error| panic!("could not write {}: {error}", conf.display()));
        Self::start_in(dir, &[], Some(conf)).await
    }

    async fn start_in(dir: TempDir, args: &[&str], sentinel_conf: Option<PathBuf>) -> RedisServer {
        let binary = find_on_path("redis-server").unwrap_or_else(|| {
            panic!("redis-server not found: apt-get install redis-server (scripts/test does this)")
        });
        let mut server = RedisServer {
            binary,
            port: 0,
            dir,
            child: None,
            extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
            sentinel_conf,
        };
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(error) if error.contains("Address already in use") => last_error = error,
                Err(error) => panic!("{error}"),
            }
        }
        panic!("{last_error}")
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, or `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The working directory (`--dir`), which also holds `redis.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log_file(), 30)
    }

    /// Sends PING over a fresh connection and checks for `+PONG`.
    pub async fn ping(&self) -> io::Result<()> {
        ping(self.port).await
    }

    /// Kills the server (SIGKILL) and waits for it; afterwards the port refuses connections.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port (killing it first if it still runs) and waits
    /// until it answers PING. Panics, with the log, if it does not come up.
    pub async fn start_again(&mut self) {
        self.stop().await;
        if let Err(error) = self.spawn_and_wait().await {
            panic!("{error}");
        }
    }

    /// Freezes the process (SIGSTOP): connections are accepted but nothing is answered.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
        if let Some(pid) = self.pid() {
            cachecast_nats_server::wait_until_stopped(pid, true);
        }
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
        if let Some(pid) = self.pid() {
            cachecast_nats_server::wait_until_stopped(pid, false);
        }
    }

    fn signal(&self, signal: Signal) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("redis-server on port {} is not running", self.port));
        let target = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        if let Err(error) = signal::kill(target, signal) {
            panic!("could not send {signal} to redis-server (pid {pid}): {error}");
        }
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_file = self.log_file();
        let open_log = || {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_file)
                .map_err(|error| format!("could not open {}: {error}", log_file.display()))
        };
        // Errors printed before redis opens its log file (a bad option, say) land there too.
        let (stdout, stderr) = (open_log()?, open_log()?);
        let port = self.port.to_string();
        let mut command = Command::new(&self.binary);
        if let Some(conf) = &self.sentinel_conf {
            command.arg(conf).arg("--sentinel");
        }
        command
            .args(["--bind", "127.0.0.1", "--port", &port])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log_file)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|error| {
            format!(
                "could not start {}: {error}; apt-get install redis-server (scripts/test does this)",
                self.binary.display()
            )
        })?;

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited before answering PING ({status}); its log:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            let last_ping = match ping(self.port).await {
                Ok(()) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                let _ = child.kill().await;
                return Err(format!(
                    "redis-server on port {} did not answer PING within {READY_TIMEOUT:?} (last: {last_ping}); killed it. Its log:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            cachecast_nats_server::kill_and_reap(child);
        }
    }
}

fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("cachecast-redis-")
        .tempdir()
        .unwrap_or_else(|error| panic!("could not create a temporary directory: {error}"))
}

/// A Redis Cluster of redis-server children on 127.0.0.1, made with `redis-cli --cluster
/// create`. Dropping it kills every node.
#[derive(Debug)]
pub struct RedisCluster {
    /// Masters first, then replicas (as `redis-cli --cluster create` assigns them).
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each, joins them into a cluster that
    /// serves all 16384 slots, and waits (at most 30 s) until every node says so. `DEBUG` is
    /// allowed, so a test can make a replica differ from its master (`DEBUG POPULATE`).
    ///
    /// Panics if redis-server or redis-cli is missing or the cluster does not form.
    pub async fn start(masters: usize, replicas: usize) -> RedisCluster {
        let redis_cli = find_on_path("redis-cli").unwrap_or_else(|| {
            panic!("redis-cli not found: apt-get install redis-tools (scripts/test does this)")
        });
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            "1000",
            "--enable-debug-command",
            "local",
        ];
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            nodes.push(RedisServer::start_with(&args).await);
        }
        let mut create = Command::new(&redis_cli);
        create.args(["--cluster", "create"]);
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let output = create
            .output()
            .await
            .unwrap_or_else(|e| panic!("could not run {}: {e}", redis_cli.display()));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &cluster.nodes {
            loop {
                let info = cluster.cli(node.port(), &["CLUSTER", "INFO"]).await;
                let replication = cluster.cli(node.port(), &["INFO", "replication"]).await;
                let joined = info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{}", cluster.nodes.len()));
                let synced = !replication.contains("role:slave")
                    || replication.contains("master_link_status:up");
                if joined && synced {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the Redis Cluster did not form within 30 s; node {} says:\n{info}{replication}",
                    node.port()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        cluster
    }

    /// `redis://127.0.0.1:<port>` of the first node (a master).
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Runs `redis-cli -p <port> <args>` and returns what it printed. Panics if it fails.
    pub async fn cli(&self, port: u16, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("could not run redis-cli: {e}"));
        assert!(
            output.status.success(),
            "redis-cli -p {port} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// PING in RESP over a raw TCP connection; `Ok` only for `+PONG`.
async fn ping(port: u16) -> io::Result<()> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
        let mut reply = [0_u8; 64];
        let n = stream.read(&mut reply).await?;
        let reply = String::from_utf8_lossy(&reply[..n]);
        if reply.starts_with("+PONG") {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "redis answered PING with {:?}",
                reply.trim_end()
            )))
        }
    };
    tokio::time::timeout(PING_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer to PING within {PING_TIMEOUT:?}"),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn redis_answers_stops_and_comes_back_on_the_same_port() {
        let mut server = redis().await;
        let port = server.port();
        assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
        server.ping().await.unwrap_or_else(|e| panic!("{e}"));

        server.stop().await;
        assert!(server.pid().is_none());
        match TcpStream::connect(("127.0.0.1", port)).await {
            Err(error) => assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}"),
            Ok(_) => panic!("port {port} still accepts connections after stop"),
        }
        assert!(server.ping().await.is_err());

        server.start_again().await;
        assert_eq!(server.port(), port);
        server.ping().await.unwrap_or_else(|e| panic!("{e}"));

        server.pause();
        let error = server.ping().await.err();
        assert_eq!(error.map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
        server.resume();
        server.ping().await.unwrap_or_else(|e| panic!("{e}"));
    }
}
