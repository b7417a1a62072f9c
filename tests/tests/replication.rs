//! Capture and replication with the real binaries: the journal replays to the proxy's image,
//! nothing acknowledged is lost across replicator crashes and link cuts, sync mode loses no
//! acknowledged write, and seeding and delta sync move only what differs.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use journal::record::Kind;
use tests::cdp::*;
use tests::raw::*;
use tests::{make_image, pattern, read_file};

const MIB: u64 = 1 << 20;
const CAUGHT_UP: Duration = Duration::from_secs(120);

/// One operation a client thread issued.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Op {
    disk: u16,
    kind: Kind,
    offset: u64,
    length: u64,
    seed: u64,
}

/// What a record and a client operation share: disk, kind, range and data.
type OpKey = (u16, Kind, u64, u64, Vec<u8>);

/// Random overlapping writes, zeroes and trims from several connections at once (each one
/// pipelining several requests) to a group of two disks. Every client operation appears in the
/// journal exactly once; replaying the journal to many seqs equals a model that applies the
/// clients' operations in journal order; replaying all of it equals the proxy's images.
#[test]
fn journal_replays_to_the_model_and_to_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * MIB;
    let images = [dir.path().join("a.img"), dir.path().join("b.img")];
    for img in &images {
        make_image(img, size, &[]).unwrap();
    }
    let rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let ctl = dir.path().join("ctl");
    let proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("a", &images[0]), ("b", &images[1])],
        &[],
    );
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();

    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let socket = proxy.socket.clone();
            std::thread::spawn(move || {
                let disk = (t % 2) as u16;
                let mut c = RawClient::connect(&socket);
                c.go(if disk == 0 { "a" } else { "b" }, false, false);
                let mut rng = pattern(1000 + t, 4096).into_iter().map(u64::from).cycle();
                let mut next =
                    move || (0..4).fold(0u64, |acc, _| acc << 8 | rng.next().unwrap_or(0));
                let mut ops = Vec::new();
                for round in 0..40u64 {
                    let mut burst = Vec::new();
                    for i in 0..8u64 {
                        let seed = t << 32 | round << 8 | i;
                        // Offsets in a 256 KiB window so requests overlap often.
                        let offset = (next() % 512) * 512;
                        let length = (1 + next() % 64) * 512;
                        let kind = match next() % 10 {
                            0 => Kind::Zero,
                            1 => Kind::Trim,
                            _ => Kind::Write,
                        };
                        let cmd = match kind {
                            Kind::Zero => CMD_WRITE_ZEROES,
                            Kind::Trim => CMD_TRIM,
                            _ => CMD_WRITE,
                        };
                        burst.extend(request_bytes(cmd, 0, seed, offset, length as u32));
                        if kind == Kind::Write {
                            burst.extend(pattern(seed, length as usize));
                        }
                        ops.push(Op {
                            disk,
                            kind,
                            offset,
                            length,
                            seed,
                        });
                    }
                    c.send(&burst);
                    for _ in 0..8 {
                        let (err, _) = c.simple_reply();
                        assert_eq!(err, 0);
                    }
                }
                c.request(CMD_FLUSH, 0, 1, 0, 0, &[]);
                assert_eq!(c.simple_reply().0, 0);
                ops
            })
        })
        .collect();
    let ops: Vec<Op> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();

    let group = rep.group("g");
    let records = read_journal(&group).unwrap();
    // Match records to client operations by content.
    let mut by_key: HashMap<OpKey, Vec<Op>> = HashMap::new();
    for op in &ops {
        let data = if op.kind == Kind::Write {
            pattern(op.seed, op.length as usize)
        } else {
            Vec::new()
        };
        by_key
            .entry((op.disk, op.kind, op.offset, op.length, data))
            .or_default()
            .push(op.clone());
    }
    let mut model = vec![vec![0u8; size as usize]; 2];
    let mut matched = 0;
    let checkpoints: Vec<u64> = {
        let last = records.last().unwrap().seq;
        (1..=25).map(|i| last * i / 25).collect()
    };
    for r in &records {
        if matches!(r.kind, Kind::Write | Kind::Zero | Kind::Trim) {
            let key = (r.disk, r.kind, r.offset, r.length, r.data.clone());
            let op = by_key.get_mut(&key).and_then(Vec::pop).unwrap_or_else(|| {
                panic!(
                    "record seq {} ({:?}) matches no client operation",
                    r.seq, r.kind
                )
            });
            let d = &mut model[usize::from(op.disk)];
            let (at, len) = (op.offset as usize, op.length as usize);
            if op.kind == Kind::Write {
                d[at..at + len].copy_from_slice(&pattern(op.seed, len));
            } else {
                d[at..at + len].fill(0);
            }
            matched += 1;
        } else if r.kind == Kind::SyncData {
            apply(&mut model, r);
        }
        if checkpoints.contains(&r.seq) {
            let replayed = replay(&group, &records, r.seq).unwrap();
            assert!(
                replayed == model,
                "replay to seq {} differs from the model",
                r.seq
            );
        }
    }
    assert_eq!(
        matched,
        ops.len(),
        "every client operation is in the journal once"
    );
    let all = replay(&group, &records, u64::MAX).unwrap();
    for (i, img) in images.iter().enumerate() {
        assert!(
            all[i] == read_file(img),
            "full replay equals the proxy's image of disk {i}"
        );
    }
    assert!(records.iter().any(|r| r.kind == Kind::Flush));
    check_store(&rep.store).unwrap();
    proxy.assert_no_errors().unwrap();
}

/// fio (crc32c verify) through the proxy in the background: 4k random writes over `size`,
/// `loops` times, then reads everything back and verifies it.
fn fio_verify_in_background(uri: &str, size: u64, loops: u32, out: &Path) -> std::process::Child {
    tests::require("fio");
    std::process::Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--size={size}"),
            &format!("--loops={loops}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--verify_fatal=1",
            "--output-format=json",
        ])
        .arg(format!("--output={}", out.display()))
        .env("PATH", tests::system_path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn fio_passed(mut child: std::process::Child, out: &Path) {
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(out).unwrap_or_default();
    assert!(status.success(), "fio failed ({status}): {text}");
    let json = &text[text.find('{').expect("fio json")..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    for j in v["jobs"].as_array().unwrap() {
        assert_eq!(j["error"], 0, "fio job failed: {j}");
    }
}

/// Waits until the proxy has captured at least `n` records.
fn wait_captured(ctl: &Path, n: u64) {
    tests::wait_for(
        "the proxy to capture records",
        Duration::from_secs(120),
        || (proxy_status(ctl).ok()?["captured_seq"].as_u64()? >= n).then_some(()),
    )
    .unwrap();
}

/// fio writes and verifies through the proxy while the replicator is killed with -9 and
/// restarted, and while the link is cut and restored; afterwards the replica equals the image.
#[test]
fn replicator_kill9_and_link_cut_under_fio_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 32 * MIB, &[]).unwrap();
    let mut rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let relay = Relay::start(&rep.addr);
    let ctl = dir.path().join("ctl");
    let proxy = start_proxy(dir.path(), &relay.addr, &[("disk", &image)], &[]);
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();

    let out = dir.path().join("fio.json");
    // 3 passes over 32 MiB of 4k writes: 24576 writes, then a verifying read.
    let fio = fio_verify_in_background(&proxy.uri("disk"), 32 * MIB, 3, &out);
    wait_captured(&ctl, 4000);
    rep.kill9();
    wait_captured(&ctl, 7000);
    rep.restart().unwrap();
    wait_captured(&ctl, 12000);
    relay.cut();
    wait_captured(&ctl, 15000);
    relay.restore();
    fio_passed(fio, &out);
    let status = wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    assert!(
        status["captured_seq"].as_u64().unwrap() >= 24576,
        "every write was captured: {status}"
    );
    replica_equals(&rep.store, &[("disk", &image)]);
    let log = rep.log_text();
    assert!(log.contains("proxy connected"), "{log}");
    if std::env::var_os("SHOW_LOGS").is_some() {
        eprintln!("{}\n{log}", proxy.log_text());
    }
    proxy.assert_no_errors().unwrap();
}

/// In sync mode a write is acknowledged only once the replicator has it on disk: kill the
/// replicator with -9 in the middle of a write stream, and every write the client saw
/// acknowledged is in the journal, with its content.
#[test]
fn sync_mode_loses_no_acknowledged_write_when_the_replicator_dies() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let blocks = 4096u64;
    make_image(&image, blocks * 4096, &[]).unwrap();
    let mut rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let ctl = dir.path().join("ctl");
    let proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("disk", &image)],
        &["--mode", "sync"],
    );
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();

    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, socket) = (acked.clone(), stop.clone(), proxy.socket.clone());
        std::thread::spawn(move || {
            let mut c = RawClient::connect(&socket);
            c.go("disk", false, false);
            let depth = 8u64;
            let mut next = 0u64;
            let mut in_flight = 0;
            while next < blocks || in_flight > 0 {
                while in_flight < depth && next < blocks && !stop.load(Ordering::SeqCst) {
                    c.request(CMD_WRITE, 0, next, next * 4096, 4096, &pattern(next, 4096));
                    next += 1;
                    in_flight += 1;
                }
                if in_flight == 0 {
                    break;
                }
                let (err, cookie) = c.simple_reply();
                assert_eq!(err, 0);
                acked.lock().unwrap().push(cookie);
                in_flight -= 1;
            }
        })
    };
    tests::wait_for("300 acknowledged writes", Duration::from_secs(60), || {
        (acked.lock().unwrap().len() >= 300).then_some(())
    })
    .unwrap();
    rep.kill9();
    let seen: Vec<u64> = acked.lock().unwrap().clone();
    let records = read_journal(&rep.group("g")).unwrap();
    let mut journaled: HashMap<u64, Vec<u8>> = HashMap::new();
    for r in records.iter().filter(|r| r.kind == Kind::Write) {
        journaled.insert(r.offset / 4096, r.data.clone());
    }
    for cookie in &seen {
        let data = journaled
            .get(cookie)
            .unwrap_or_else(|| panic!("write {cookie} was acknowledged but is not in the journal"));
        assert!(
            *data == pattern(*cookie, 4096),
            "write {cookie} has other content in the journal"
        );
    }
    // The stream resumes once the replicator is back.
    std::thread::sleep(Duration::from_millis(300));
    rep.restart().unwrap();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    replica_equals(&rep.store, &[("disk", &image)]);
    proxy.assert_no_errors().unwrap();
}

fn fio_writes(uri: &str, size: u64, io_size: u64) -> std::process::Child {
    tests::require("fio");
    std::process::Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--size={size}"),
            &format!("--io_size={io_size}"),
            "--output=/dev/null",
        ])
        .env("PATH", tests::system_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn sync_bytes_sent(status: &serde_json::Value) -> u64 {
    status["sync_bytes_sent"].as_u64().unwrap()
}

/// A disk full of data is seeded while the guest writes; a proxy killed with -9 under load
/// resends only what its activity log marks; without the log, re-seeding an unchanged disk
/// moves under 1% of its size, and chunks changed behind the proxy's back are exactly what the
/// hash comparison sends.
#[test]
fn seeding_under_load_then_proxy_kill9_and_delta_sync() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let size = 64 * MIB;
    make_image(&image, size, &[(0, &pattern(7, size as usize))]).unwrap();
    let mut rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let relay = Relay::start(&rep.addr);
    let ctl = dir.path().join("ctl");
    let mut proxy = start_proxy(dir.path(), &relay.addr, &[("disk", &image)], &[]);

    // Seed while fio writes.
    let mut load = fio_writes(&proxy.uri("disk"), size, 16 * MIB);
    assert!(load.wait().unwrap().success());
    let status = wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    assert_eq!(
        sync_bytes_sent(&status),
        size,
        "the seed sent every chunk: {status}"
    );
    replica_equals(&rep.store, &[("disk", &image)]);
    // Durable and idle extents leave the activity log (after a few seconds).
    tests::wait_for("the activity log to clear", Duration::from_secs(60), || {
        (proxy_status(&ctl).ok()?["activity_log_extents"] == 0).then_some(())
    })
    .unwrap();

    // kill -9 while writing: the activity log names the extents that may hold writes the
    // replicator lacks, and only those are resent.
    let mut load = fio_writes(&proxy.uri("disk"), 16 * MIB, 64 * MIB);
    wait_captured(&ctl, status["captured_seq"].as_u64().unwrap() + 2000);
    proxy.kill9().unwrap();
    let _ = load.kill();
    let _ = load.wait();
    proxy.restart().unwrap();
    let status = wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    assert!(
        sync_bytes_sent(&status) <= 16 * MIB,
        "only extents the activity log marks (all within the 16 MiB fio wrote) are resent: {status}"
    );
    assert!(proxy.log_text().contains("extents may hold changes"));
    eprintln!(
        "after kill -9: resent {} bytes of a {size}-byte disk",
        sync_bytes_sent(&status)
    );
    replica_equals(&rep.store, &[("disk", &image)]);

    // A clean stop leaves nothing marked: a restart resends nothing.
    proxy.stop().unwrap();
    relay.take_bytes();
    proxy.restart().unwrap();
    let status = wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    assert_eq!(sync_bytes_sent(&status), 0, "{status}");
    assert!(relay.take_bytes() < 64 * 1024);

    // Without the activity log (lost, or a new host), the disk is compared by hash: for an
    // unchanged disk only the hashes move.
    let al = {
        let mut p = image.clone().into_os_string();
        p.push(".cdp-al");
        std::path::PathBuf::from(p)
    };
    proxy.stop().unwrap();
    std::fs::remove_file(&al).unwrap();
    relay.take_bytes();
    proxy.restart().unwrap();
    let status = wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let moved = relay.take_bytes();
    eprintln!("hash comparison of an unchanged {size}-byte disk moved {moved} bytes");
    assert_eq!(sync_bytes_sent(&status), 0, "{status}");
    assert!(
        moved * 100 < size,
        "re-seeding an unchanged {size}-byte disk moved {moved} bytes (must be < 1%)"
    );

    // Three chunks changed while the proxy was down and its activity log was lost.
    proxy.stop().unwrap();
    std::fs::remove_file(&al).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        for (i, chunk) in [3u64, 100, 255].iter().enumerate() {
            f.write_all_at(&pattern(900 + i as u64, 512), chunk * 256 * 1024 + 4096)
                .unwrap();
        }
    }
    proxy.restart().unwrap();
    let status = wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    assert_eq!(sync_bytes_sent(&status), 3 * 256 * 1024, "{status}");
    replica_equals(&rep.store, &[("disk", &image)]);

    // The session's end keeps the chunk hashes, with the resent chunks (changed since their
    // hashes were made) listed as stale. `replicator check` passes over them, and after a
    // restart the replicator hashes them from the journal when the proxy compares again:
    // nothing is resent.
    proxy.stop().unwrap();
    let group = rep.group("g");
    tests::wait_for("stale chunks in the kept hashes", CAUGHT_UP, || {
        let sums = group.sums("head", "disk").ok()?;
        // head.json names the seq after the sums are written: wait for both.
        let current = group.mark("head").ok()?.seq == sums.seq;
        (current && sums.has_stale() && sums.stale().contains(100)).then_some(())
    })
    .unwrap();
    rep.kill9();
    check_store(&rep.store).unwrap();
    rep.restart().unwrap();
    std::fs::remove_file(&al).unwrap();
    relay.take_bytes();
    proxy.restart().unwrap();
    let status = wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    assert_eq!(sync_bytes_sent(&status), 0, "{status}");
    assert!(relay.take_bytes() * 100 < size);
    replica_equals(&rep.store, &[("disk", &image)]);
    proxy.stop().unwrap();
}

/// `--writeback auto`: the proxy sweeps its image to disk while the replicator's store shares a
/// disk with it, and leaves the writeback to the kernel when the store is elsewhere (here on
/// /dev/shm, a tmpfs); `--writeback sweep` forces the sweep. Status says which, and why.
#[test]
fn the_image_is_swept_only_while_the_store_shares_its_disk() {
    let dir = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    for (store, extra, expect) in [
        (
            dir.path().join("store"),
            &[][..],
            "swept by the proxy (the replicator's store shares a disk with the images)",
        ),
        (
            shm.path().join("store"),
            &[],
            "left to the kernel (the replicator's store is on other disks)",
        ),
        (
            shm.path().join("store-forced"),
            &["--writeback", "sweep"],
            "swept by the proxy (--writeback sweep)",
        ),
    ] {
        let run = tempfile::tempdir_in(dir.path()).unwrap();
        let image = run.path().join("disk.img");
        make_image(&image, 8 * MIB, &[]).unwrap();
        let rep = Replicator::start(&store, &[]).unwrap();
        let proxy = start_proxy(run.path(), &rep.addr, &[("disk", &image)], extra);
        let ctl = run.path().join("ctl");
        let s = wait_caught_up(&ctl, CAUGHT_UP).unwrap();
        assert_eq!(s["writeback"], expect, "{s}");
        assert_eq!(s["writeback_swept"], expect.starts_with("swept"), "{s}");
        let (ok, text) = cli("nbd-proxy", &["status", "--control", ctl.to_str().unwrap()]);
        assert!(
            ok && text.contains(&format!("writeback   {expect}")),
            "{text}"
        );
        // Either way every write reaches the replica.
        qemu_io(&proxy.uri("disk"), &["write -P 0x5a 0 1M"]);
        wait_caught_up(&ctl, CAUGHT_UP).unwrap();
        replica_equals(&rep.store, &[("disk", &image)]);
        proxy.assert_no_errors().unwrap();
    }
}

/// `--on-full bitmap`: with the replicator away and a small log, writes keep completing, the
/// overflow is tracked as dirty chunks, and once the replicator is back they are resent between
/// SyncBegin and SyncEnd records (so restore can tell that window is not consistent).
#[test]
fn log_overflow_tracks_dirty_chunks_then_resyncs_them() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 32 * MIB, &[]).unwrap();
    let mut rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let ctl = dir.path().join("ctl");
    let proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("disk", &image)],
        &["--log-capacity", "1MiB"],
    );
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    rep.kill9();
    let mut load = fio_writes(&proxy.uri("disk"), 8 * MIB, 8 * MIB);
    assert!(
        load.wait().unwrap().success(),
        "guest writes complete while the log is full"
    );
    let s = proxy_status(&ctl).unwrap();
    assert_eq!(s["tracking"], "dirty-chunks", "{s}");
    assert!(s["dirty_chunks"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["log_overflows"], 1, "{s}");
    assert!(s["changes_not_recorded"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["log_used"].as_u64().unwrap() <= 2 * MIB,
        "the log stays bounded: {s}"
    );
    rep.restart().unwrap();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    // Live again, and the gap in history stays on record.
    let s = proxy_status(&ctl).unwrap();
    assert_eq!(
        (&s["tracking"], &s["log_overflows"]),
        (&"live".into(), &1.into()),
        "{s}"
    );
    let (ok, text) = cli("nbd-proxy", &["status", "--control", ctl.to_str().unwrap()]);
    assert!(
        ok && text.contains("filled 1 time since the start"),
        "{text}"
    );
    let records = read_journal(&rep.group("g")).unwrap();
    let begin = records
        .iter()
        .rposition(|r| r.kind == Kind::SyncBegin && r.text == "resync")
        .expect("a resync began");
    let end = records
        .iter()
        .rposition(|r| r.kind == Kind::SyncEnd)
        .expect("and ended");
    assert!(begin < end);
    assert!(records[begin..end].iter().any(|r| r.kind == Kind::SyncData));
    replica_equals(&rep.store, &[("disk", &image)]);
    proxy.assert_no_errors().unwrap();
}

/// `--on-full block`: with the replicator away and the log full, guest writes wait (the log
/// never grows past its capacity) and complete once the replicator is back.
#[test]
fn log_full_in_block_mode_stalls_writes_until_the_replicator_returns() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 32 * MIB, &[]).unwrap();
    let mut rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let ctl = dir.path().join("ctl");
    let proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("disk", &image)],
        &["--log-capacity", "1MiB", "--on-full", "block"],
    );
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    rep.kill9();
    let mut load = fio_writes(&proxy.uri("disk"), 8 * MIB, 8 * MIB);
    // The log fills, then the captured seq stops moving while fio is still running.
    let mut previous = serde_json::Value::Null;
    let later = tests::wait_for(
        "writes to stall on the full log",
        Duration::from_secs(60),
        || {
            std::thread::sleep(Duration::from_millis(300));
            let s = proxy_status(&ctl).ok()?;
            let stalled =
                s["captured_seq"] == previous["captured_seq"] && s["log_used"].as_u64()? > MIB / 2;
            previous = s.clone();
            stalled.then_some(s)
        },
    )
    .unwrap();
    assert!(
        load.try_wait().unwrap().is_none(),
        "fio is waiting on its writes"
    );
    assert!(later["log_used"].as_u64().unwrap() <= MIB, "{later}");
    assert_eq!(later["tracking"], "live");
    rep.restart().unwrap();
    assert!(load.wait().unwrap().success());
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    replica_equals(&rep.store, &[("disk", &image)]);
    proxy.assert_no_errors().unwrap();
}
