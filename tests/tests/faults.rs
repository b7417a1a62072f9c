//! The fault matrix: kill -9 of the proxy and of the replicator at random points under load
//! (async and sync, many seeds), a full store file system, bit flips and truncations in every
//! store file, and a replicator frozen or cut off (SIGSTOP, dropped packets, a downed link in a
//! network namespace).
//!
//! Random choices come from a seed that is printed; `FAULT_SEED=N` replays one. `CDP_LONG=1`
//! runs many seeds (the default is a few, to keep `make test` short).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use tests::cdp::*;
use tests::netns::Netns;
use tests::raw::*;
use tests::{make_image, pattern, read_file, wait_for};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const CAUGHT_UP: Duration = Duration::from_secs(120);

/// Seeds to run: `FAULT_SEED` alone, else `CDP_LONG` many, else `n` fixed ones.
fn seeds(n: u64) -> Vec<u64> {
    if let Some(s) = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![s];
    }
    let count = if std::env::var_os("CDP_LONG").is_some() {
        25
    } else {
        n
    };
    (1..=count).map(|i| i * 7919).collect()
}

/// xorshift, seeded: every random choice of a run comes from here.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A write of the writer: (block, pattern id).
type Write = (u64, u64);

/// A guest-like writer: one 4 KiB write at a time at random blocks, with a flush now and then.
/// When the proxy goes away it reconnects and sends the write in flight again, as QEMU with
/// reconnect-delay does; `acked` lists (block, pattern id) in the order they were acknowledged.
struct Writer {
    acked: Arc<Mutex<Vec<(u64, u64)>>>,
    /// The write sent but not yet acknowledged (block, pattern id).
    in_flight: Arc<Mutex<Option<(u64, u64)>>>,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(socket: PathBuf, blocks: u64, seed: u64) -> Writer {
        let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
        let in_flight: Arc<Mutex<Option<(u64, u64)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicBool::new(false));
        let (a, s, p, i) = (acked.clone(), stop.clone(), pause.clone(), idle.clone());
        let f = in_flight.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = Rng(seed | 1);
            let mut id = seed << 20;
            let mut conn: Option<RawClient> = None;
            while !s.load(Ordering::SeqCst) {
                if p.load(Ordering::SeqCst) {
                    i.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                i.store(false, Ordering::SeqCst);
                let block = rng.below(blocks);
                id += 1;
                let data = pattern(id, BLOCK as usize);
                *f.lock().unwrap() = Some((block, id));
                // Until this write is acknowledged, on whatever connection (also when asked to
                // stop: a write the proxy applied must not be left unacknowledged).
                loop {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match connect(&socket) {
                            Some(c) => conn.insert(c),
                            None => {
                                std::thread::sleep(Duration::from_millis(20));
                                continue;
                            }
                        },
                    };
                    if write_once(c, block * BLOCK, &data, id) {
                        // Acknowledged: in the list before it stops being in flight.
                        a.lock().unwrap().push((block, id));
                        *f.lock().unwrap() = None;
                        if id.is_multiple_of(64) && !flush_once(c) {
                            conn = None;
                        }
                        break;
                    }
                    conn = None;
                }
                std::thread::sleep(Duration::from_micros(700));
            }
        });
        Writer {
            acked,
            in_flight,
            stop,
            pause,
            idle,
            thread: Some(thread),
        }
    }

    /// Waits until no write is in flight and holds further ones (for a bookmark).
    fn quiesce(&self) {
        self.pause.store(true, Ordering::SeqCst);
        wait_for("the writer to pause", CAUGHT_UP, || {
            self.idle.load(Ordering::SeqCst).then_some(())
        })
        .unwrap();
    }

    /// The writes acknowledged so far and the one in flight (taken in that order, so a write
    /// acknowledged meanwhile is in one or the other).
    fn state(&self) -> (Vec<Write>, Option<Write>) {
        let flight = *self.in_flight.lock().unwrap();
        let acked = self.acked.lock().unwrap().clone();
        (acked, flight)
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    fn finish(mut self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}

/// A raw NBD connection whose failures (the proxy killed under it) are not panics.
fn connect(socket: &Path) -> Option<RawClient> {
    std::os::unix::net::UnixStream::connect(socket).ok()?;
    std::panic::catch_unwind(|| {
        let mut c = RawClient::connect(socket);
        c.go("disk", false, false);
        c
    })
    .ok()
}

fn write_once(c: &mut RawClient, offset: u64, data: &[u8], cookie: u64) -> bool {
    let mut req = request_bytes(CMD_WRITE, 0, cookie, offset, data.len() as u32);
    req.extend_from_slice(data);
    use std::io::{Read, Write};
    if c.stream.write_all(&req).is_err() {
        return false;
    }
    let mut reply = [0u8; 16];
    c.stream.read_exact(&mut reply).is_ok() && be32(&reply[4..8]) == 0
}

fn flush_once(c: &mut RawClient) -> bool {
    use std::io::{Read, Write};
    let req = request_bytes(CMD_FLUSH, 0, 1, 0, 0);
    let mut reply = [0u8; 16];
    c.stream.write_all(&req).is_ok() && c.stream.read_exact(&mut reply).is_ok()
}

/// Sync mode's promise, checked on a replicator just killed: its journal replays, block by
/// block, to the last acknowledged write of that block, or to the write still in flight
/// (durable, but its acknowledgement not yet seen), never to anything older.
fn assert_holds_acked(
    group: &journal::store::GroupDir,
    size: u64,
    acked: &[(u64, u64)],
    in_flight: Option<(u64, u64)>,
    seed: u64,
) {
    let records = read_journal(group).unwrap();
    let held = &replay(group, &records, u64::MAX).unwrap()[0];
    let mut last: HashMap<u64, u64> = HashMap::new();
    for &(block, id) in acked {
        last.insert(block, id);
    }
    for (&block, &id) in &last {
        let at = (block * BLOCK) as usize;
        let got = &held[at..at + BLOCK as usize];
        let ok = got == pattern(id, BLOCK as usize).as_slice()
            || in_flight
                .is_some_and(|(b, f)| b == block && got == pattern(f, BLOCK as usize).as_slice());
        assert!(
            ok,
            "seed {seed}: the replicator lost acknowledged write {id} at block {block} ({} records held)",
            records.len()
        );
    }
    assert!(size >= held.len() as u64);
}

/// The disk as the acknowledged writes, in order, made it.
fn model(size: u64, acked: &[(u64, u64)]) -> Vec<u8> {
    let mut disk = vec![0u8; size as usize];
    for &(block, id) in acked {
        let at = (block * BLOCK) as usize;
        disk[at..at + BLOCK as usize].copy_from_slice(&pattern(id, BLOCK as usize));
    }
    disk
}

/// kill -9 of the proxy and of the replicator at random points while a guest-like writer runs,
/// async and sync, several seeds: afterwards the journal replays to the image, the image is
/// what the acknowledged writes made, every bookmark restores byte-identical to a copy taken
/// when it was placed, `replicator check` passes, and in sync mode every acknowledged write
/// is in the journal.
#[test]
fn kill9_of_proxy_and_replicator_at_random_points() {
    for mode in ["async", "sync"] {
        for seed in seeds(2) {
            eprintln!("fault matrix: mode {mode}, seed {seed} (replay: FAULT_SEED={seed})");
            kill9_run(mode, seed);
        }
    }
}

fn kill9_run(mode: &str, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let image = dir.path().join("disk.img");
    make_image(&image, size, &[]).unwrap();
    // Small segments and a short retention: folds run (and are killed) under the load too.
    let mut rep = Replicator::start(
        &dir.path().join("store"),
        &[
            "--segment-size",
            "1MiB",
            "--retention",
            "3s",
            "--retention-interval",
            "200ms",
        ],
    )
    .unwrap();
    let mut proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("disk", &image)],
        &["--mode", mode],
    );
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let writer = Writer::start(proxy.socket.clone(), size / BLOCK, seed);
    let mut rng = Rng(seed);
    let mut references: Vec<(String, Vec<u8>)> = Vec::new();
    for step in 0..6 {
        std::thread::sleep(Duration::from_millis(150 + rng.below(500)));
        match rng.below(3) {
            0 => {
                proxy.kill9().unwrap();
                proxy.restart().unwrap();
            }
            1 => {
                rep.kill9();
                if mode == "sync" {
                    // RPO 0: what the dead replicator holds includes every acknowledged write.
                    let (acked, in_flight) = writer.state();
                    assert_holds_acked(&rep.group("g"), size, &acked, in_flight, seed);
                }
                std::thread::sleep(Duration::from_millis(rng.below(300)));
                rep.restart().unwrap();
            }
            _ => {
                // A bookmark, and the disk as it is at that point.
                writer.quiesce();
                wait_caught_up(&ctl, CAUGHT_UP).unwrap();
                let name = format!("b{step}");
                let (ok, out) = cli(
                    "nbd-proxy",
                    &["bookmark", "--control", ctl.to_str().unwrap(), &name],
                );
                assert!(ok, "seed {seed}: {out}");
                references.push((name, read_file(&image)));
                writer.resume();
            }
        }
    }
    let acked = writer.finish();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    proxy.stop().unwrap();
    assert!(
        read_file(&image) == model(size, &acked),
        "seed {seed}: the image is not what the {} acknowledged writes made",
        acked.len()
    );
    replica_equals(&rep.store, &[("disk", &image)]);
    let store = rep.store.display().to_string();
    for (name, want) in &references {
        let out = dir.path().join(format!("{name}.img"));
        let at = format!("bookmark:{name}");
        let (ok, text) = materialize_at(&store, &at, &out);
        if !ok && text.contains("before the oldest point") {
            continue; // retention folded it: that point is gone, as it should be
        }
        assert!(ok, "seed {seed}: {text}");
        assert!(
            read_file(&out) == *want,
            "seed {seed}: bookmark {name} differs from its reference"
        );
    }
}

/// The store on a small tmpfs that fills: the proxy keeps serving the guest, both sides say
/// the store is full, the proxy's durable seq never runs ahead of what the store holds (before:
/// 43 acknowledged while the store held 22), and once space returns replication converges.
#[test]
fn a_full_store_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let _tmpfs = Tmpfs::mount(&store, "10m");
    let image = dir.path().join("disk.img");
    make_image(&image, 8 * MIB, &[]).unwrap();
    let rep = Replicator::start(&store, &[]).unwrap();
    let mut proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("disk", &image)],
        &["--mode", "sync", "--sync-timeout", "1s"],
    );
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let group = rep.group("g");
    // 40 writes of 512 KiB of incompressible data: far more than the store holds.
    let mut c = RawClient::connect(&proxy.socket);
    c.go("disk", false, false);
    for i in 0..40u64 {
        let data = pattern(1000 + i, 512 * 1024);
        c.request(
            CMD_WRITE,
            0,
            i,
            (i % 16) * 512 * 1024,
            data.len() as u32,
            &data,
        );
        assert_eq!(c.simple_reply(), (0, i), "the guest keeps being served");
        // The proxy never counts as durable what the store does not hold.
        let durable = proxy_status(&ctl).unwrap()["durable_seq"].as_u64().unwrap();
        let held = read_journal(&group)
            .map(|r| r.last().map_or(0, |r| r.seq))
            .unwrap_or(0);
        assert!(
            durable <= held,
            "durable seq {durable} but the store holds up to {held}"
        );
    }
    let s = wait_for("the proxy to report the full store", CAUGHT_UP, || {
        let s = proxy_status(&ctl).ok()?;
        s["link_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left"))
            .then_some(s)
    })
    .unwrap();
    assert_eq!(s["sync_degraded"], true, "{s}");
    let store_s = store.display().to_string();
    wait_for(
        "replicator status to say the store is full",
        CAUGHT_UP,
        || {
            let (_, out) = cli("replicator", &["status", "--store", &store_s]);
            out.contains("STORE ERROR").then_some(())
        },
    )
    .unwrap();
    // Space returns: everything converges.
    Tmpfs::resize(&store, "256m");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    wait_for("sync mode to come back", CAUGHT_UP, || {
        (proxy_status(&ctl).ok()?["sync_degraded"] == false).then_some(())
    })
    .unwrap();
    drop(c);
    proxy.stop().unwrap();
    replica_equals(&store, &[("disk", &image)]);
}

/// A tmpfs mounted at a directory for the test's life.
struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let opts = format!("size={size}");
        tests::run(
            "mount",
            &["-t", "tmpfs", "-o", &opts, "tmpfs", at.to_str().unwrap()],
        )
        .unwrap();
        Tmpfs { at: at.to_owned() }
    }

    fn resize(at: &Path, size: &str) {
        let opts = format!("remount,size={size}");
        tests::run("mount", &["-o", &opts, at.to_str().unwrap()]).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.at)
            .status();
    }
}

/// A frozen replicator (SIGSTOP: no FIN, no RST) is noticed within --link-timeout; sync-mode
/// writes go on after --sync-timeout (degraded) instead of hanging for TCP's 15 minutes, the
/// lag grows while it is away, and it all converges when it thaws.
#[test]
fn a_frozen_replicator_is_noticed_and_sync_mode_degrades() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 8 * MIB, &[]).unwrap();
    let rep = Replicator::start(&dir.path().join("store"), &["--link-timeout", "1s"]).unwrap();
    let mut proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("disk", &image)],
        &[
            "--mode",
            "sync",
            "--link-timeout",
            "1s",
            "--sync-timeout",
            "2s",
        ],
    );
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    rep.signal(Signal::SIGSTOP);
    // Enough data to fill the socket buffers: the proxy's writes must hit their deadline.
    qemu_io(&proxy.uri("disk"), &["write -P 0x21 0 4M"]);
    let s = wait_for("the proxy to take the link down", CAUGHT_UP, || {
        let s = proxy_status(&ctl).ok()?;
        (s["link"] == "down").then_some(s)
    })
    .unwrap();
    assert!(
        s["link_error"].as_str().unwrap().contains("--link-timeout")
            || s["link_error"].as_str().unwrap().contains("timed out"),
        "{s}"
    );
    assert_eq!(s["sync_degraded"], true, "{s}");
    let lag1 = s["lag_ms"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let lag2 = proxy_status(&ctl).unwrap()["lag_ms"].as_u64().unwrap();
    assert!(
        lag1 > 0 && lag2 > lag1,
        "lag grows while the replicator is away: {lag1} then {lag2}"
    );
    rep.signal(Signal::SIGCONT);
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    wait_for("sync mode to come back", CAUGHT_UP, || {
        (proxy_status(&ctl).ok()?["sync_degraded"] == false).then_some(())
    })
    .unwrap();
    proxy.stop().unwrap();
    replica_equals(&rep.store, &[("disk", &image)]);
}

/// The replicator on another host (a network namespace): dropped packets (no answer, no
/// close) and a downed link are noticed by both sides within --link-timeout; replication
/// resumes and converges when the network is back.
#[test]
fn link_stall_and_cut_in_a_network_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 8 * MIB, &[]).unwrap();
    let rep = Replicator::start_at(
        &dir.path().join("store"),
        &ns.ip,
        Some(&ns.name),
        &["--link-timeout", "1s"],
    )
    .unwrap();
    let mut proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("disk", &image)],
        &["--link-timeout", "1s"],
    );
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let down = |what: &str| {
        wait_for(what, CAUGHT_UP, || {
            (proxy_status(&ctl).ok()?["link"] == "down").then_some(())
        })
        .unwrap();
    };
    // A stall: every packet to the replicator's host dropped.
    ns.drop_packets(true).unwrap();
    qemu_io(&proxy.uri("disk"), &["write -P 0x31 0 1M"]);
    down("the proxy to notice the stall");
    wait_for("the replicator to notice the silence", CAUGHT_UP, || {
        rep.log_text().contains("--link-timeout").then_some(())
    })
    .unwrap();
    ns.drop_packets(false).unwrap();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    // A cut: the link goes down.
    ns.link(false).unwrap();
    qemu_io(&proxy.uri("disk"), &["write -P 0x32 1M 1M"]);
    down("the proxy to notice the cut");
    ns.link(true).unwrap();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    proxy.stop().unwrap();
    replica_equals(&rep.store, &[("disk", &image)]);
}

/// Every kind of store file damaged in turn (flipped bits, truncations, removal): `replicator
/// check` names the file, restore never gives wrong bytes with success (it refuses, or fails
/// the read), nothing panics, and the replicator stays up.
#[test]
fn damage_to_every_store_file_is_named_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 4 * MIB, &[]).unwrap();
    let store = dir.path().join("store");
    let mut rep = Replicator::start(
        &store,
        &[
            "--segment-size",
            "1MiB",
            "--retention",
            "1s",
            "--retention-interval",
            "200ms",
        ],
    )
    .unwrap();
    let mut proxy = start_proxy(dir.path(), &rep.addr, &[("disk", &image)], &[]);
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    // Old history to fold into the base, then newer history in sealed and open segments
    // (incompressible, so that segments fill).
    let write = |offset: u64, len: u64, seed: u64| {
        let mut c = RawClient::connect(&proxy.socket);
        c.go("disk", false, false);
        c.request(
            CMD_WRITE,
            0,
            seed,
            offset,
            len as u32,
            &pattern(seed, len as usize),
        );
        assert_eq!(c.simple_reply(), (0, seed));
    };
    for i in 0..8u64 {
        write(i * 256 * 1024, 256 * 1024, 0x40 + i);
    }
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let group = rep.group("g");
    wait_for("a fold into the base", CAUGHT_UP, || {
        (group.mark("base").ok()?.seq > 0).then_some(())
    })
    .unwrap();
    rep.kill9();
    rep.restart().unwrap();
    for i in 0..12u64 {
        write(2 * MIB + i * 128 * 1024, 128 * 1024, 0x60 + i);
    }
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    proxy.stop().unwrap();
    rep.kill9();
    let reference = read_file(&image);
    let segments = group.segments().unwrap();
    assert!(segments.len() >= 2, "{segments:?}");
    let g = group.path.clone();
    let rel = |p: &Path| p.strip_prefix(&g).unwrap().to_owned();
    let sealed = rel(&segments[segments.len() - 2].path);
    let newest = rel(&segments[segments.len() - 1].path);
    let index = rel(&segments[segments.len() - 2].index_path());
    let files: Vec<PathBuf> = vec![
        "group.json".into(),
        "base.json".into(),
        "head.json".into(),
        "journal/durable".into(),
        "base/disk.img".into(),
        "base/disk.sums".into(),
        "head/disk.sums".into(),
        sealed,
        newest,
        index,
    ];
    for file in &files {
        for damage in [Damage::FlipBit, Damage::Truncate, Damage::Remove] {
            let copy = tempfile::tempdir().unwrap();
            let cstore = copy.path().join("store");
            tests::run(
                "cp",
                &["-a", store.to_str().unwrap(), cstore.to_str().unwrap()],
            )
            .unwrap();
            let target = cstore.join("g").join(file);
            if !damage.apply(&target) {
                continue;
            }
            let what = format!("{damage:?} {}", file.display());
            let cs = cstore.display().to_string();
            let (ok, out) = cli("replicator", &["check", "--store", &cs]);
            let named = file.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!ok, "{what}: check passed:\n{out}");
            assert!(
                out.contains(&named)
                    || (file.ends_with("group.json") && out.contains("no group.json")),
                "{what}: check does not name the file:\n{out}"
            );
            let m = copy.path().join("m.img");
            let status = std::process::Command::new(tests::bin("restore"))
                .args([
                    "materialize",
                    "--store",
                    &cs,
                    "--group",
                    "g",
                    "--at",
                    "latest",
                    "--output",
                ])
                .arg(&m)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&status.stderr);
            assert!(
                !stderr.contains("panicked"),
                "{what}: restore panicked: {stderr}"
            );
            if status.status.success() {
                assert!(
                    read_file(&m) == reference,
                    "{what}: restore served wrong bytes"
                );
            }
            // The replicator starts on it and stays up (the group may refuse records).
            let r = Replicator::start(&cstore, &[]).unwrap();
            let mut peer = RawPeer::connect(&r.addr);
            let _ = peer.hello("g", &[("disk", 4 * MIB)], "x", false);
            assert!(
                !r.log_text().contains("panicked"),
                "{what}: {}",
                r.log_text()
            );
            std::net::TcpStream::connect(&r.addr).unwrap();
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    FlipBit,
    Truncate,
    Remove,
}

impl Damage {
    /// Damages `path`; false when there is nothing to damage this way.
    fn apply(self, path: &Path) -> bool {
        let Ok(mut bytes) = std::fs::read(path) else {
            return false;
        };
        if bytes.is_empty() {
            return false;
        }
        match self {
            Damage::FlipBit => {
                // A byte that holds data: the middle of a sparse image may be a hole.
                let at = bytes
                    .iter()
                    .rposition(|&b| b != 0)
                    .unwrap_or(bytes.len() / 2);
                let at = (at + bytes.len() / 2) / 2;
                let at = if bytes[at] == 0 {
                    bytes.iter().position(|&b| b != 0).unwrap_or(at)
                } else {
                    at
                };
                bytes[at] ^= 0x10;
                std::fs::write(path, &bytes).unwrap();
            }
            Damage::Truncate => {
                // Two thirds of what the file holds: past a segment's last record there may
                // be zero padding (direct writes), and cutting only that loses nothing.
                let held = bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                f.set_len(held as u64 * 2 / 3).unwrap();
            }
            Damage::Remove => std::fs::remove_file(path).unwrap(),
        }
        true
    }
}

/// Sync mode across a proxy restart: until the restarted proxy has reached the replicator,
/// changes are only marked dirty; a write then must wait until the resync that carries it is
/// durable (before: it was acknowledged at once, so RPO was not 0 after a proxy restart).
#[test]
fn sync_mode_holds_writes_made_before_the_first_contact() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 8 * MIB, &[]).unwrap();
    let mut rep = Replicator::start(&dir.path().join("store"), &["--link-timeout", "1s"]).unwrap();
    let mut proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("disk", &image)],
        &[
            "--mode",
            "sync",
            "--sync-timeout",
            "never",
            "--link-timeout",
            "1s",
        ],
    );
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    proxy.kill9().unwrap();
    rep.signal(Signal::SIGSTOP);
    proxy.restart().unwrap();
    let socket = proxy.socket.clone();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let write = std::thread::spawn(move || {
        let mut c = RawClient::connect(&socket);
        c.go("disk", false, false);
        c.request(
            CMD_WRITE,
            0,
            7,
            64 * BLOCK,
            BLOCK as u32,
            &pattern(77, BLOCK as usize),
        );
        assert_eq!(c.simple_reply(), (0, 7));
        flag.store(true, Ordering::SeqCst);
    });
    wait_for(
        "the restarted proxy to give up on the frozen replicator",
        CAUGHT_UP,
        || {
            let s = proxy_status(&ctl).ok()?;
            (s["link"] == "down" && s["link_error"].is_string()).then_some(())
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !done.load(Ordering::SeqCst),
        "a sync-mode write was acknowledged while the replicator could not have it"
    );
    rep.signal(Signal::SIGCONT);
    write.join().unwrap();
    // Acknowledged: the replicator holds it, whatever happens to it now.
    rep.kill9();
    assert_holds_acked(&rep.group("g"), 8 * MIB, &[(64, 77)], None, 0);
    rep.restart().unwrap();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    proxy.stop().unwrap();
    replica_equals(&rep.store, &[("disk", &image)]);
}
