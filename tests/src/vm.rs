//! The test guest of `vm-images/` booted under QEMU, its disks attached over NBD, driven through
//! its serial console. Waits are bounded and fail with the console's tail.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::{connect_while_alive, require, wait_for};

/// The repository's root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_owned()
}

/// Builds the guest if needed (cached) and returns the folder holding it.
pub fn guest_images() -> anyhow::Result<PathBuf> {
    require("qemu-system-x86_64");
    require("mkfs.ext4");
    let script = repo_root().join("vm-images/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .context("run vm-images/build.sh")?;
    if !out.status.success() {
        bail!(
            "vm-images/build.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(repo_root().join("vm-images/out"))
}

#[derive(Debug)]
pub struct Guest {
    child: Child,
    serial: UnixStream,
    pub console: PathBuf,
    /// Lines of the console already matched by `wait_line`.
    seen_lines: usize,
}

impl Guest {
    /// Boots the guest with these NBD disks (socket, export); the first is its root disk.
    pub fn boot(dir: &Path, disks: &[(&Path, &str)]) -> anyhow::Result<Guest> {
        let console = dir.join("console.log");
        let serial_path = dir.join("serial.sock");
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("vm-images/boot.sh"));
        for (socket, export) in disks {
            cmd.arg("--disk")
                .arg(format!("{}:{export}", socket.display()));
        }
        cmd.arg("--console")
            .arg(&console)
            .arg("--serial-socket")
            .arg(&serial_path);
        let log = std::fs::File::create(dir.join("qemu.log"))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("boot.sh")?;
        let serial = match connect_while_alive(
            "the guest's serial socket",
            &mut child,
            &serial_path,
            Duration::from_secs(60),
        )? {
            Ok(s) => s,
            Err(status) => bail!(
                "QEMU exited ({status}) before the console came up: {}",
                std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
            ),
        };
        // Drain what the guest prints to the socket (it also goes to the console log), so that
        // QEMU never waits on a full socket.
        let mut drain = serial.try_clone()?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while matches!(drain.read(&mut buf), Ok(n) if n > 0) {}
        });
        Ok(Guest {
            child,
            serial,
            console,
            seen_lines: 0,
        })
    }

    /// Types a command line into the guest.
    pub fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.serial
            .write_all(format!("{line}\n").as_bytes())
            .context("write to the serial console")
    }

    /// Waits for a console line containing `needle`, after the lines matched before; returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let console = self.console.clone();
        let from = self.seen_lines;
        let found = wait_for(&format!("{needle:?} on the guest console"), timeout, || {
            let text = std::fs::read_to_string(&console).ok()?;
            // QEMU writes the console a byte at a time: match finished lines only.
            let text = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            let lines: Vec<&str> = text.lines().collect();
            lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| l.contains(needle))
                .map(|(i, l)| (i, l.to_string()))
        });
        match found {
            Ok((i, line)) => {
                self.seen_lines = i + 1;
                if line.contains("CDP-GUEST: ERROR") {
                    bail!("the guest reported {line}\n{}", self.tail());
                }
                Ok(line)
            }
            Err(e) => bail!("{e}; console tail:\n{}", self.tail()),
        }
    }

    /// Waits for QEMU to exit (after the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let child = &mut self.child;
        let status = wait_for("QEMU to exit", timeout, || child.try_wait().ok().flatten());
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => bail!("QEMU exited with {s}\n{}", self.tail()),
            Err(e) => bail!("{e}\n{}", self.tail()),
        }
    }

    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
