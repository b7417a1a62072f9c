//! A QEMU process driven over QMP, so tests can exercise QEMU's own NBD block driver (with
//! `reconnect-delay`) through `human-monitor-command "qemu-io ..."`, no guest needed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::{connect_while_alive, require, wait_for};

#[derive(Debug)]
pub struct Qemu {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub log: PathBuf,
}

impl Qemu {
    /// Starts `qemu-system-x86_64 -M none` with the given `-blockdev` specs and a QMP socket.
    pub fn start(dir: &Path, blockdevs: &[String]) -> anyhow::Result<Qemu> {
        require("qemu-system-x86_64");
        let qmp = dir.join("qmp.sock");
        let log = dir.join("qemu.log");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "none", "-nodefaults", "-display", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        for b in blockdevs {
            cmd.args(["-blockdev", b]);
        }
        let logf = std::fs::File::create(&log)?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("start qemu")?;
        let Ok(stream) = connect_while_alive(
            "QEMU's QMP socket",
            &mut child,
            &qmp,
            Duration::from_secs(30),
        )?
        else {
            bail!(
                "qemu exited early: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut q = Qemu {
            child,
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            log,
        };
        q.read_message()?; // greeting
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QMP closed");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a QMP command and returns its "return" value (events are skipped).
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}")?;
        loop {
            let m = self.read_message()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                bail!("QMP {command} failed: {e}");
            }
        }
    }

    /// Runs a qemu-io command on a block node; fails if qemu-io reports an error.
    pub fn qemu_io(&mut self, node: &str, command: &str) -> anyhow::Result<String> {
        let line = format!("qemu-io {node} \"{command}\"");
        let out = self.execute("human-monitor-command", json!({ "command-line": line }))?;
        let text = out.as_str().unwrap_or_default().to_owned();
        let lower = text.to_lowercase();
        if lower.contains("error") || lower.contains("failed") {
            bail!("qemu-io {command:?} on {node}: {text}");
        }
        Ok(text)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = writeln!(self.writer, "{}", json!({ "execute": "quit" }));
        let child = &mut self.child;
        if wait_for("qemu to quit", Duration::from_secs(10), || {
            child.try_wait().ok().flatten()
        })
        .is_err()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
