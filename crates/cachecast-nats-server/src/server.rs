//! A running nats-server child process with JetStream on 127.0.0.1 that can be stopped,
//! restarted on the same port and store directory, paused and resumed.
//!
//! Readiness is the line "Server is ready" in the server's log file (only the part written by
//! the current start counts, so a restart does not see the previous run's line). With port 0 the
//! server picks a free port itself (`-p -1`) and the port is read from its "Listening for client
//! connections on" log line: unlike binding port 0 and releasing it, nothing else can grab the
//! port in between. Restarts reuse that port.

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tracing::{debug, warn};

use crate::{Error, locate::tail};

const READY_LINE: &str = "Server is ready";
const LISTENING_LINE: &str = "Listening for client connections on ";
const POLL: Duration = Duration::from_millis(20);
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(5);
const LOG_TAIL_LINES: usize = 40;
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// How to start a [`NatsServer`]; made by [`NatsServer::builder`].
#[derive(Debug, Clone)]
pub struct NatsServerOptions {
    binary: PathBuf,
    host: String,
    port: u16,
    store_dir: Option<PathBuf>,
    log_file: Option<PathBuf>,
    extra_args: Vec<String>,
    envs: Vec<(String, String)>,
    ready_timeout: Duration,
}

impl NatsServerOptions {
    /// Options for `binary` on 127.0.0.1, a free port, and a fresh temporary store directory.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        NatsServerOptions {
            binary: binary.into(),
            host: "127.0.0.1".to_owned(),
            port: 0,
            store_dir: None,
            log_file: None,
            extra_args: Vec::new(),
            envs: Vec::new(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }

    /// The address to listen on (default 127.0.0.1).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// The client port; 0 (the default) lets the server pick a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// The JetStream store directory (created if missing). Default: a temporary directory
    /// owned by the [`NatsServer`] and deleted with it.
    pub fn store_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.store_dir = Some(dir.into());
        self
    }

    /// The log file (appended to). Default: `nats-server.log` in a temporary directory owned
    /// by the [`NatsServer`].
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// One more command-line argument, passed after the ones this crate sets (for example
    /// cluster settings, or `-c <config>`).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// More command-line arguments; see [`NatsServerOptions::arg`].
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the server process (a configuration file's `$NAME`
    /// resolves from the environment when the file does not define it).
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((name.into(), value.into()));
        self
    }

    /// How long a start may take before it fails (default 10 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Starts the server and waits until it is ready.
    pub async fn start(self) -> Result<NatsServer, Error> {
        let work_dir = if self.store_dir.is_none() || self.log_file.is_none() {
            Some(
                tempfile::Builder::new()
                    .prefix("cachecast-nats-")
                    .tempdir()
                    .map_err(Error::io(
                        "could not create a temporary directory for nats-server",
                    ))?,
            )
        } else {
            None
        };
        let in_work_dir = |name: &str| {
            work_dir
                .as_ref()
                .map(|dir| dir.path().join(name))
                .unwrap_or_default()
        };
        let store_dir = self
            .store_dir
            .clone()
            .unwrap_or_else(|| in_work_dir("store"));
        let log_file = self
            .log_file
            .clone()
            .unwrap_or_else(|| in_work_dir("nats-server.log"));
        fs::create_dir_all(&store_dir).map_err(Error::io(format!(
            "could not create the JetStream store directory {}",
            store_dir.display()
        )))?;
        if let Some(parent) = log_file.parent() {
            fs::create_dir_all(parent).map_err(Error::io(format!(
                "could not create the log directory {}",
                parent.display()
            )))?;
        }
        let mut server = NatsServer {
            port: self.port,
            options: self,
            store_dir,
            log_file,
            child: None,
            _work_dir: work_dir,
        };
        server.spawn_and_wait().await?;
        Ok(server)
    }
}

/// A nats-server child process with JetStream. Dropping it kills the process.
#[derive(Debug)]
pub struct NatsServer {
    options: NatsServerOptions,
    port: u16,
    store_dir: PathBuf,
    log_file: PathBuf,
    child: Option<Child>,
    /// Holds the default store directory and log file; dropped (deleted) after the child.
    _work_dir: Option<TempDir>,
}

impl NatsServer {
    /// Options to start `binary` (see [`crate::locate`]).
    pub fn builder(binary: impl Into<PathBuf>) -> NatsServerOptions {
        NatsServerOptions::new(binary)
    }

    /// `nats://<host>:<port>`, for clients.
    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.options.host, self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on.
    pub fn host(&self) -> &str {
        &self.options.host
    }

    /// The JetStream store directory (`-sd`); the server keeps its data in `jetstream/` inside.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The log file, kept across restarts.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The nats-server binary.
    pub fn binary(&self) -> &Path {
        &self.options.binary
    }

    /// The process id, or `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether the process is still alive (it may have been paused).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Stops the server gracefully (SIGTERM, so JetStream flushes its store), or with SIGKILL
    /// if it has not exited within 5 s, and waits for it. A paused server is resumed first.
    /// Does nothing if it is not running.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id().and_then(nix_pid) {
            let _ = signal::kill(pid, Signal::SIGCONT);
            if signal::kill(pid, Signal::SIGTERM).is_ok() {
                match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                    Ok(Ok(status)) => {
                        debug!(%status, port = self.port, "nats-server stopped");
                        return;
                    }
                    Ok(Err(error)) => warn!(%error, "waiting for nats-server failed; killing it"),
                    Err(_) => warn!(
                        "nats-server did not exit within {STOP_GRACE:?} of SIGTERM; killing it"
                    ),
                }
            }
        }
        kill_and_wait(&mut child).await;
    }

    /// Kills the server with SIGKILL (no chance to clean up, like a crash) and waits for it.
    /// Does nothing if it is not running.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_wait(&mut child).await;
        }
    }

    /// Starts the server again on the same port with the same store directory and log file,
    /// and waits until it is ready. Kills it first if it is still running.
    pub async fn start_again(&mut self) -> Result<(), Error> {
        self.kill().await;
        self.spawn_and_wait().await
    }

    /// Freezes the process (SIGSTOP): connections stay open but nothing is answered.
    pub fn pause(&self) -> Result<(), Error> {
        self.signal(Signal::SIGSTOP)?;
        if let Some(pid) = self.pid() {
            wait_until_stopped(pid, true);
        }
        Ok(())
    }

    /// Freezes the process like [`Self::pause`] and returns what resumes it, for a caller
    /// that goes on using what borrows the server meanwhile.
    pub fn pause_held(&self) -> Result<Paused, Error> {
        self.pause()?;
        self.pid().map(Paused).ok_or(Error::NotRunning)
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) -> Result<(), Error> {
        Paused(self.pid().ok_or(Error::NotRunning)?).resume()
    }

    /// Sends `signal` to the process (for example SIGHUP to reload a configuration file).
    pub fn signal(&self, signal: Signal) -> Result<(), Error> {
        send_signal(self.pid().ok_or(Error::NotRunning)?, signal)
    }

    /// The last lines of the log file (all runs), for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_file)
    }

    async fn spawn_and_wait(&mut self) -> Result<(), Error> {
        let offset = fs::metadata(&self.log_file).map_or(0, |meta| meta.len());
        let open_log = || {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_file)
                .map_err(Error::io(format!(
                    "could not open the nats-server log file {}",
                    self.log_file.display()
                )))
        };
        // Whatever the server prints before its logger is set up (a bad flag, say) lands in the
        // log file too.
        let (stdout, stderr) = (open_log()?, open_log()?);
        let port_arg = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let mut command = Command::new(&self.options.binary);
        command
            .arg("-a")
            .arg(&self.options.host)
            .arg("-p")
            .arg(&port_arg)
            .arg("-js")
            .arg("-sd")
            .arg(&self.store_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(&self.options.extra_args)
            .envs(self.options.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        debug!(?command, "starting nats-server");
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            path: self.options.binary.clone(),
            source,
        })?;

        let timeout = self.options.ready_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let this_run = read_from(&self.log_file, offset);
            if this_run.contains(READY_LINE) {
                if self.port == 0 {
                    match listening_port(&this_run) {
                        Some(port) => self.port = port,
                        None => {
                            kill_and_wait(&mut child).await;
                            return Err(Error::NoPort {
                                log_tail: self.log_tail(),
                            });
                        }
                    }
                }
                debug!(port = self.port, pid = child.id(), "nats-server is ready");
                self.child = Some(child);
                return Ok(());
            }
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    return Err(Error::Exited {
                        status,
                        log_tail: self.log_tail(),
                    });
                }
                Err(error) => {
                    kill_and_wait(&mut child).await;
                    return Err(Error::io("could not check on the nats-server process")(
                        error,
                    ));
                }
            }
            if Instant::now() >= deadline {
                kill_and_wait(&mut child).await;
                return Err(Error::NotReady {
                    timeout,
                    log_tail: self.log_tail(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
    }
}

async fn kill_and_wait(child: &mut Child) {
    if let Err(error) = child.kill().await {
        warn!(%error, "could not kill nats-server");
    }
}

/// A nats-server paused by [`NatsServer::pause_held`]: it answers nothing until resumed.
#[derive(Debug)]
#[must_use = "a paused server answers nothing until resumed"]
pub struct Paused(u32);

impl Paused {
    /// Lets the server go on (SIGCONT) and waits until it runs.
    pub fn resume(self) -> Result<(), Error> {
        send_signal(self.0, Signal::SIGCONT)?;
        wait_until_stopped(self.0, false);
        Ok(())
    }
}

fn send_signal(pid: u32, signal: Signal) -> Result<(), Error> {
    let target = nix_pid(pid).ok_or(Error::NotRunning)?;
    signal::kill(target, signal).map_err(|source| Error::Signal {
        signal,
        pid,
        source,
    })
}

fn nix_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid).ok().map(Pid::from_raw)
}

/// The port from "Listening for client connections on 127.0.0.1:4222".
fn listening_port(log: &str) -> Option<u16> {
    log.lines().find_map(|line| {
        let (_, address) = line.split_once(LISTENING_LINE)?;
        let (_, port) = address.trim().rsplit_once(':')?;
        port.parse().ok()
    })
}

/// The log from byte `offset` on (lossy UTF-8); empty if it cannot be read.
fn read_from(path: &Path, offset: u64) -> String {
    let mut text = Vec::new();
    if let Ok(mut file) = fs::File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = file.read_to_end(&mut text);
    }
    String::from_utf8_lossy(&text).into_owned()
}

fn log_tail(path: &Path) -> String {
    let len = fs::metadata(path).map_or(0, |meta| meta.len());
    let text = read_from(path, len.saturating_sub(LOG_TAIL_BYTES));
    let tail = tail(&text, LOG_TAIL_LINES);
    if tail.trim().is_empty() {
        format!("(the log {} is empty)", path.display())
    } else {
        tail
    }
}

/// Waits (at most 2 s) until every thread of process `pid` is stopped, or running again: a
/// signal is delivered asynchronously, and a test that pauses a server must not race its last
/// words.
pub fn wait_until_stopped(pid: u32, stopped: bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return; // gone
        };
        let all_there = tasks.flatten().all(|task| {
            // .../stat: "tid (comm) STATE ...", and comm may contain spaces.
            let state = std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat.rfind(')')?;
                    stat[after + 1..]
                        .split_whitespace()
                        .next()
                        .map(str::to_owned)
                });
            let is_stopped = matches!(state.as_deref(), Some("T") | Some("t"));
            state.is_none() || is_stopped == stopped
        });
        if all_there {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Kills `child` and reaps it, waiting at most 2 s, so it is really gone before its temporary
/// directory is deleted. For `Drop` implementations, which cannot await.
pub fn kill_and_reap(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_port_from_the_log() {
        let log = "[1] 2026/01/01 00:00:00.000000 [INF] Took 1ms to start JetStream\n\
                   [1] 2026/01/01 00:00:00.000000 [INF] Listening for client connections on 127.0.0.1:35551\n\
                   [1] 2026/01/01 00:00:00.000000 [INF] Server is ready\n";
        assert_eq!(listening_port(log), Some(35551));
        assert_eq!(listening_port("Server is ready"), None);
    }
}
