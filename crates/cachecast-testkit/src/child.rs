//! A child process (usually `cachecast ...`) whose stdout and stderr are captured line by line,
//! so a test can wait for a line, read everything printed so far, signal it and wait for its
//! exit. Dropping it kills the process.

use std::{
    ffi::OsStr,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, BufReader},
    process::{Child, Command},
    sync::Notify,
};

use crate::cachecast_bin;

/// After the process exits, how long to wait for the last of its output.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A spawned process with captured output.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Child,
    captured: Arc<Captured>,
}

#[derive(Debug, Default)]
struct Captured {
    state: Mutex<CapturedState>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct CapturedState {
    /// stdout and stderr lines, in the order they were read.
    all: String,
    stdout: String,
    stderr: String,
    /// Pipes not yet at end of file.
    open: usize,
}

impl Captured {
    fn lock(&self) -> MutexGuard<'_, CapturedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Clone, Copy)]
enum Pipe {
    Stdout,
    Stderr,
}

impl ChildProcess {
    /// Spawns `program` with `args`. Panics if it cannot be started.
    pub fn spawn<I, S>(program: impl AsRef<OsStr>, args: I) -> ChildProcess
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(program);
        command.args(args);
        ChildProcess::from_command(command)
    }

    /// Spawns the built `cachecast` binary (see [`cachecast_bin`]) with `args`.
    pub fn cachecast<I, S>(args: I) -> ChildProcess
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        ChildProcess::spawn(cachecast_bin(), args)
    }

    /// Spawns a prepared command (for environment variables, a working directory, ...).
    /// stdin is closed and stdout and stderr are captured. Panics if it cannot be started.
    pub fn from_command(mut command: Command) -> ChildProcess {
        let program = command
            .as_std()
            .get_program()
            .to_string_lossy()
            .into_owned();
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("could not start {program}: {error}"));
        let name = format!("{program} (pid {})", child.id().unwrap_or_default());
        let captured = Arc::new(Captured::default());
        captured.lock().open = 2;
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(read_lines(stdout, Arc::clone(&captured), Pipe::Stdout));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(read_lines(stderr, Arc::clone(&captured), Pipe::Stderr));
        }
        ChildProcess {
            name,
            child,
            captured,
        }
    }

    /// The process id, or `None` once it has been waited for.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Everything printed so far, stdout and stderr lines in the order they were read.
    pub fn output(&self) -> String {
        self.captured.lock().all.clone()
    }

    /// Everything printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.captured.lock().stdout.clone()
    }

    /// Everything printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.captured.lock().stderr.clone()
    }

    /// Waits until the output (stdout or stderr) contains `needle`, at most `timeout`.
    ///
    /// The error says what was printed, and comes early if the process closed its output.
    pub async fn wait_for_output(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register for the next change before looking, so no change is missed in between.
            let changed = self.captured.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = self.captured.lock();
                if state.all.contains(needle) {
                    return Ok(());
                }
                if state.open == 0 {
                    return Err(format!(
                        "{} closed its output without printing {needle:?}; it printed:\n{}",
                        self.name, state.all
                    ));
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(format!(
                    "{} did not print {needle:?} within {timeout:?}; it printed:\n{}",
                    self.name,
                    self.output()
                ));
            }
        }
    }

    /// Sends `signal` (SIGTERM, SIGINT, SIGSTOP, SIGCONT, ...). Panics if the process has
    /// already been waited for or the signal cannot be sent.
    pub fn signal(&self, signal: Signal) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("cannot send {signal}: {} has already exited", self.name));
        let target = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        if let Err(error) = signal::kill(target, signal) {
            panic!("could not send {signal} to {}: {error}", self.name);
        }
        // Stopping and continuing take effect asynchronously: return once they have.
        match signal {
            Signal::SIGSTOP => cachecast_nats_server::wait_until_stopped(pid, true),
            Signal::SIGCONT => cachecast_nats_server::wait_until_stopped(pid, false),
            _ => {}
        }
    }

    /// Kills the process (SIGKILL) and waits for it. Does nothing if it already exited.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits at most `timeout` for the process to exit; `None` if it is still running.
    ///
    /// After it exits, also waits (briefly) for the rest of its output to be read, so
    /// [`ChildProcess::output`] is complete.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()?
            .ok()?;
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        loop {
            let changed = self.captured.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.captured.lock().open == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        Some(status)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Reap it (bounded), so nothing is left running after the test.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                _ => break,
            }
        }
    }
}

async fn read_lines(pipe: impl AsyncRead + Unpin, captured: Arc<Captured>, which: Pipe) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let mut text = String::from_utf8_lossy(&line).into_owned();
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                let mut state = captured.lock();
                state.all.push_str(&text);
                match which {
                    Pipe::Stdout => state.stdout.push_str(&text),
                    Pipe::Stderr => state.stderr.push_str(&text),
                }
                drop(state);
                captured.changed.notify_waiters();
            }
        }
    }
    captured.lock().open -= 1;
    captured.changed.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> ChildProcess {
        ChildProcess::spawn("sh", ["-c", script])
    }

    #[tokio::test]
    async fn captures_output_and_exit() {
        let mut child = sh("echo out; echo err >&2; sleep 0.2; echo later; exit 3");
        child
            .wait_for_output("later", Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let status = child.wait_exit(Duration::from_secs(5)).await;
        assert_eq!(status.and_then(|s| s.code()), Some(3));
        assert_eq!(child.stdout(), "out\nlater\n");
        assert_eq!(child.stderr(), "err\n");
        assert!(child.output().contains("out\n") && child.output().contains("err\n"));
        assert!(child.pid().is_none());
    }

    #[tokio::test]
    async fn wait_for_output_reports_what_was_printed() {
        let child = sh("echo hello; sleep 30");
        let error = child
            .wait_for_output("goodbye", Duration::from_millis(300))
            .await
            .err()
            .unwrap_or_default();
        assert!(
            error.contains("goodbye") && error.contains("hello"),
            "{error}"
        );

        let quick = sh("echo bye");
        let error = quick
            .wait_for_output("never", Duration::from_secs(10))
            .await
            .err()
            .unwrap_or_default();
        assert!(error.contains("closed its output"), "{error}");
    }

    #[tokio::test]
    async fn signals_and_kill() {
        let mut child =
            sh("trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 0.05; done");
        child
            .wait_for_output("ready", Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(child.wait_exit(Duration::from_millis(100)).await.is_none());
        child.signal(Signal::SIGTERM);
        let status = child.wait_exit(Duration::from_secs(5)).await;
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", child.output());
        assert!(child.output().contains("got TERM"));

        let mut sleeper = sh("sleep 30");
        sleeper.kill().await;
        assert!(sleeper.wait_exit(Duration::from_secs(1)).await.is_some());
    }
}
