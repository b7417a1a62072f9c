//! The reference NBD implementation's own tester, `nbd-tester-client` (built from Debian's nbd
//! source by scripts/nbd-tester.sh, which `make test` runs), against nbd-proxy (alone and
//! replicating) and a writable `restore export`. The cases of its suite (`tests/run/
//! simple_test`) that apply to a server of plain exports, run as that script runs them: read,
//! write, flush and FUA, oversized requests, the handshake, the export list (`nbd-client -l`),
//! a write to a read-only export, and the integrity tests (integrityhuge writes 42 MB at once).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::cdp::*;
use tests::{make_image, Proxy};

const MIB: u64 = 1 << 20;
/// simple_test's export sizes: 4 MiB, and 50 MiB for the integrity tests.
const SMALL: u64 = 4 * MIB;
const INTEGRITY: u64 = 50 * MIB;
const CAUGHT_UP: Duration = Duration::from_secs(300);

/// One of the programs scripts/nbd-tester.sh builds into target/nbd-tester/.
fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/nbd-tester/<name>
    let path = exe
        .ancestors()
        .nth(3)
        .unwrap()
        .join("nbd-tester")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/nbd-tester.sh (which `make test` runs) to build it",
        path.display()
    );
    path
}

/// Where the tester connects.
enum At<'a> {
    Unix(&'a Path),
    /// `host:port`
    Tcp(&'a str),
}

/// Runs `nbd-tester-client -N EXPORT ARGS...`; fails with its output unless it succeeds.
fn tester(at: &At, export: &str, args: &[&str]) {
    let mut cmd = Command::new(built("nbd-tester-client"));
    cmd.args(["-N", export]).args(args);
    match at {
        At::Unix(socket) => cmd.arg("-u").arg(socket),
        At::Tcp(addr) => cmd.args(addr.split(':')),
    };
    // The throughput tests print a progress line per request otherwise.
    cmd.env("NBD_TEST_SILENT", "1");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "nbd-tester-client -N {export} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Trace files of the integrity tests, beside the tester.
fn trace(name: &str) -> String {
    built(name).to_str().unwrap().to_owned()
}

/// Zeroed images as simple_test makes them: `small` (4 MiB) and two 50 MiB ones for the
/// integrity tests, which expect to start from zeroes.
fn images(dir: &Path) -> [(&'static str, PathBuf); 3] {
    let disks = [
        ("small", SMALL),
        ("integrity", INTEGRITY),
        ("integrityhuge", INTEGRITY),
    ];
    disks.map(|(name, size)| {
        let path = dir.join(format!("{name}.img"));
        make_image(&path, size, &[]).unwrap();
        (name, path)
    })
}

/// The cases that write, in simple_test's order; the integrity ones on their own exports.
fn writing_cases(at: &At) {
    tester(at, "small", &["-w"]);
    tester(at, "small", &["-w", "-f"]);
    tester(at, "integrity", &["-i", "-t", &trace("integrity-test.tr")]);
    tester(
        at,
        "integrityhuge",
        &["-i", "-t", &trace("integrityhuge-test.tr")],
    );
}

/// The cases that only read or negotiate.
fn reading_cases(at: &At) {
    tester(at, "small", &[]);
    tester(at, "small", &["-o"]);
    tester(at, "small", &["-h"]);
}

fn proxy_args(disks: &[(&str, PathBuf)], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = disks
        .iter()
        .flat_map(|(name, path)| ["--disk".into(), format!("{name}={}", path.display())])
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn nbd_proxy_passes_the_reference_testers_suite() {
    let dir = tempfile::tempdir().unwrap();
    let disks = images(dir.path());
    let args = proxy_args(&disks, &["--listen", "127.0.0.1:0"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proxy = Proxy::start(&dir.path().join("nbd.sock"), &args).unwrap();
    let unix = At::Unix(&proxy.socket);
    reading_cases(&unix);
    writing_cases(&unix);
    // The list case: nbd-client -l over TCP names every export, then a read over TCP.
    let addr = proxy.tcp_address().unwrap();
    let (host, port) = addr.split_once(':').unwrap();
    let out = Command::new(built("nbd-client"))
        .args(["-l", host, port])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "nbd-client -l: {listed}");
    for (name, _) in &disks {
        assert!(
            listed.lines().any(|l| l.starts_with(&format!("{name}:"))),
            "{name} is not in the list:\n{listed}"
        );
    }
    tester(&At::Tcp(&addr), "small", &[]);
    proxy.stop().unwrap();

    // The rowrite case: writes to a read-only export fail (the tester expects the error).
    let args = proxy_args(&disks[..1], &["--read-only"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut read_only = Proxy::start(&dir.path().join("ro.sock"), &args).unwrap();
    tester(&At::Unix(&read_only.socket), "small", &["-w", "-F"]);
    read_only.stop().unwrap();
}

/// The images replicated as group `g` to a replicator on DIR/store through a proxy, which has
/// caught up: (replicator, proxy, the disks as `start_proxy` and `replica_equals` take them).
fn replicated<'a>(
    dir: &Path,
    disks: &'a [(&str, PathBuf)],
) -> (Replicator, Proxy, Vec<(&'a str, &'a Path)>) {
    let named: Vec<(&str, &Path)> = disks.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let rep = Replicator::start(&dir.join("store"), &[]).unwrap();
    let proxy = start_proxy(dir, &rep.addr, &named, &[]);
    wait_caught_up(&dir.join("ctl"), CAUGHT_UP).unwrap();
    (rep, proxy, named)
}

#[test]
fn replicating_proxy_passes_the_writing_cases_and_its_replica_equals_the_images() {
    let dir = tempfile::tempdir().unwrap();
    let disks = images(dir.path());
    let (rep, mut proxy, named) = replicated(dir.path(), &disks);
    writing_cases(&At::Unix(&proxy.socket));
    wait_caught_up(&dir.path().join("ctl"), CAUGHT_UP).unwrap();
    proxy.stop().unwrap();
    replica_equals(&rep.store, &named);
    rep.assert_no_errors_but(&[]).unwrap();
}

#[test]
fn writable_restore_export_passes_the_reference_testers_suite() {
    let dir = tempfile::tempdir().unwrap();
    let disks = images(dir.path());
    // A point where every disk is zeroes, as the integrity tests expect.
    drop(replicated(dir.path(), &disks));
    let store = dir.path().join("store");
    let export = Export::start(
        &store,
        "latest",
        &dir.path().join("w.sock"),
        &["--writable"],
    )
    .unwrap();
    let at = At::Unix(&export.socket);
    reading_cases(&at);
    writing_cases(&at);
    drop(export);
    // The rowrite case on an export without --writable.
    let export = Export::start(&store, "latest", &dir.path().join("r.sock"), &[]).unwrap();
    tester(&At::Unix(&export.socket), "small", &["-w", "-F"]);
}
