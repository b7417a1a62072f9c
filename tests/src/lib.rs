//! Harness for end-to-end tests: starts the real binaries, runs real third-party clients, and
//! speaks raw NBD bytes where a test must send what no well-behaved client would.
//!
//! Waits poll with a deadline (never a fixed sleep); a missing third-party program is a test
//! failure that says how to install it, never a silent skip.

pub mod cdp;
pub mod netns;
pub mod peer;
pub mod qmp;
pub mod raw;
pub mod s3;
pub mod vm;

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Path of one of the workspace's binaries, built in the same profile as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --release --bins`, which `make test` does)",
        path.display()
    );
    path
}

/// Fails the test with an install hint when a third-party program is missing.
pub fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: run `make setup` (it installs every test dependency)"
    );
}

/// Runs a command to completion; fails with its output if it does not succeed.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    require(program);
    let out = Command::new(program)
        .args(args)
        .env("PATH", system_path())
        .output()
        .with_context(|| format!("run {program}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}):\nstdout: {stdout}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Debian's python (with the libnbd module) ahead of any other on PATH.
pub fn system_path() -> String {
    format!(
        "/usr/bin:/usr/sbin:/bin:/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Polls `check` until it returns `Some`, or fails after `timeout` saying what was awaited.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects to a unix socket that `child` is about to create; fails with the child's exit status
/// (as `Ok(Err(status))`) if it dies first.
pub fn connect_while_alive(
    what: &str,
    child: &mut Child,
    socket: &Path,
    timeout: Duration,
) -> anyhow::Result<Result<UnixStream, std::process::ExitStatus>> {
    wait_for(what, timeout, || {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(Err(status));
        }
        UnixStream::connect(socket).ok().map(Ok)
    })
}

/// A raw image of `size` bytes: sparse, with `data` written at each given offset.
pub fn make_image(path: &Path, size: u64, data: &[(u64, &[u8])]) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = File::create(path)?;
    f.set_len(size)?;
    for (offset, bytes) in data {
        f.write_all_at(bytes, *offset)?;
    }
    Ok(())
}

/// Deterministic pseudo-random bytes (xorshift), so failures can be reproduced.
pub use journal::testdata::pattern;

/// A running `nbd-proxy`, killed when dropped.
#[derive(Debug)]
pub struct Proxy {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Proxy {
    /// Starts `nbd-proxy --socket SOCKET ARGS...` and waits until it accepts connections.
    pub fn start(socket: &Path, args: &[&str]) -> anyhow::Result<Proxy> {
        let log = socket.with_extension("log");
        let mut proxy = Proxy {
            child: None,
            socket: socket.to_owned(),
            log,
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        proxy.spawn()?;
        Ok(proxy)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin("nbd-proxy"))
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn nbd-proxy")?;
        self.child = Some(child);
        let child = self.child.as_mut().expect("just spawned");
        if let Err(status) = connect_while_alive(
            "nbd-proxy to listen",
            child,
            &self.socket,
            Duration::from_secs(20),
        )? {
            bail!(
                "nbd-proxy exited ({status}) before listening; log:\n{}",
                self.log_text()
            );
        }
        Ok(())
    }

    /// `nbd+unix` URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// `host:port` of its TCP listener (`--listen 127.0.0.1:0`), as its log names it.
    pub fn tcp_address(&self) -> anyhow::Result<String> {
        wait_for(
            "the TCP address in the log",
            Duration::from_secs(10),
            || {
                self.log_text().lines().find_map(|l| {
                    let uri = l.split(" at nbd://").nth(1)?;
                    Some(uri.split('/').next()?.trim().to_owned())
                })
            },
        )
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("proxy running")
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        let _ = File::open(&self.log).and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    /// Sends SIGTERM and waits for the exit; fails unless it exits 0 without ERROR lines.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let status = self.signal_and_wait(nix::sys::signal::Signal::SIGTERM)?;
        if !status.success() {
            bail!(
                "nbd-proxy exited with {status} after SIGTERM; log:\n{}",
                self.log_text()
            );
        }
        self.assert_no_errors()
    }

    /// Kills with SIGKILL, as a crash would.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.signal_and_wait(nix::sys::signal::Signal::SIGKILL)?;
        Ok(())
    }

    /// Starts the same command again (after `stop` or `kill9`).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "restart a stopped proxy only");
        self.spawn()
    }

    fn signal_and_wait(
        &mut self,
        signal: nix::sys::signal::Signal,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("proxy is not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
        let status = wait_for("nbd-proxy to exit", Duration::from_secs(60), || {
            child.try_wait().ok().flatten()
        })?;
        Ok(status)
    }

    /// Fails when the log has an ERROR line (ERROR means an operator must look).
    pub fn assert_no_errors(&self) -> anyhow::Result<()> {
        let log = self.log_text();
        if log.lines().any(|l| l.contains(" ERROR ")) {
            bail!("nbd-proxy logged an ERROR:\n{log}");
        }
        Ok(())
    }

    /// Peak resident memory of the process, from /proc (VmHWM).
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        Ok(proc_status(self.pid(), "VmHWM")? * 1024)
    }
}

/// A number from /proc/PID/status (`VmHWM` and `VmRSS` in KiB, `Threads` a count).
pub fn proc_status(pid: i32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))
        .with_context(|| format!("{field} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("{field} value"))?
        .parse()?)
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads a whole file; a short helper for comparisons.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
