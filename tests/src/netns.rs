//! A second host for tests: a network namespace joined to this one by a veth pair, where a
//! replicator can run and its traffic can be dropped (iptables) or its link cut, as a vanished
//! host or a dead network would look. Needs root (tests run as root, as CI does).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

/// A namespace `cdpN` with `10.201.N.2` inside and `10.201.N.1` on this side; removed when
/// dropped.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    host_if: String,
    /// The address inside the namespace.
    pub ip: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    crate::require("ip");
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Netns {
    pub fn new() -> anyhow::Result<Netns> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() % 200) * 4 + NEXT.fetch_add(1, Ordering::SeqCst) % 4;
        let (a, b) = (n / 250, n % 250 + 1);
        let name = format!("cdp{n}");
        let host_if = format!("cdph{n}");
        let ns_if = format!("cdpn{n}");
        let _ = ip(&["netns", "del", &name]);
        let _ = ip(&["link", "del", &host_if]);
        ip(&["netns", "add", &name])?;
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            ip: format!("10.{}.{b}.2", 201 + a),
        };
        let host_ip = format!("10.{}.{b}.1/24", 201 + a);
        let ns_ip = format!("{}/24", ns.ip);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&["addr", "add", &host_ip, "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "netns", "exec", &name, "ip", "addr", "add", &ns_ip, "dev", &ns_if,
        ])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Drops every packet that reaches the namespace (on) or stops dropping (off): the peer
    /// neither answers nor closes, as a host that vanished.
    pub fn drop_packets(&self, on: bool) -> anyhow::Result<()> {
        crate::require("iptables");
        let op = if on { "-I" } else { "-D" };
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "iptables", op, "INPUT", "-j", "DROP",
            ])
            .output()?;
        if !out.status.success() {
            bail!("iptables: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Takes this side of the link down or up (a cut cable).
    pub fn link(&self, up: bool) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
