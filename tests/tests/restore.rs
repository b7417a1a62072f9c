//! Restore: points of a random history read through third-party clients equal a model; a
//! writable export never changes the store; exports stay stable while the replicator ingests
//! and retention runs; a point boots under QEMU.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use journal::Kind;
use tests::cdp::*;
use tests::raw::*;
use tests::{bin, make_image, pattern, read_file, run, wait_for};

const MIB: u64 = 1 << 20;
const CAUGHT_UP: Duration = Duration::from_secs(120);

fn materialize(store: &Path, disk: &str, at: &str, out: &Path) -> Vec<u8> {
    let (ok, text) = cli(
        "restore",
        &[
            "materialize",
            "--store",
            store.to_str().unwrap(),
            "--group",
            "g",
            "--disk",
            disk,
            "--at",
            at,
            "--output",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "materialize {at}: {text}");
    let bytes = read_file(out);
    std::fs::remove_file(out).unwrap();
    bytes
}

/// Random writes, zeroes and trims to a group of two disks, one at a time so the order is
/// known, with a bookmark in the middle and a retention fold after the first phase; then many
/// points, read through `qemu-img convert` from `restore export` and through `restore
/// materialize`, equal the model at those points.
#[test]
fn points_of_a_random_history_equal_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * MIB;
    let names = ["a", "b"];
    let images: Vec<PathBuf> = names
        .iter()
        .map(|n| dir.path().join(format!("{n}.img")))
        .collect();
    for img in &images {
        make_image(img, size, &[]).unwrap();
    }
    let rep = Replicator::start(
        &dir.path().join("store"),
        &[
            "--segment-size",
            "1MiB",
            "--retention",
            "2s",
            "--retention-interval",
            "300ms",
        ],
    )
    .unwrap();
    let ctl = dir.path().join("ctl");
    let proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("a", &images[0]), ("b", &images[1])],
        &[],
    );
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let mut clients: Vec<RawClient> = names
        .iter()
        .map(|n| {
            let mut c = RawClient::connect(&proxy.socket);
            c.go(n, false, false);
            c
        })
        .collect();
    let mut model = vec![vec![0u8; size as usize]; 2];
    // After each operation, the model of both disks (kept for the points we will test).
    let mut states: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut rng = pattern(4242, 1 << 16).into_iter().map(u64::from).cycle();
    let mut next = move || (0..4).fold(0u64, |a, _| a << 8 | rng.next().unwrap_or(0));
    let mut op = |clients: &mut Vec<RawClient>, model: &mut Vec<Vec<u8>>, i: u64| {
        let d = (next() % 2) as usize;
        let offset = (next() % 3800) * 512;
        let length = ((1 + next() % 128) * 512).min(size - offset);
        let kind = next() % 10;
        let c = &mut clients[d];
        let m = &mut model[d][offset as usize..(offset + length) as usize];
        if kind == 0 {
            c.request(CMD_WRITE_ZEROES, 0, i, offset, length as u32, &[]);
            m.fill(0);
        } else if kind == 1 {
            c.request(CMD_TRIM, 0, i, offset, length as u32, &[]);
            m.fill(0);
        } else {
            let data = pattern(i, length as usize);
            c.request(CMD_WRITE, 0, i, offset, length as u32, &data);
            m.copy_from_slice(&data);
        }
        assert_eq!(c.simple_reply().0, 0);
    };
    for i in 0..150 {
        op(&mut clients, &mut model, i);
        states.push(model.clone());
    }
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    // Let the first phase age out and fold into the base.
    std::thread::sleep(Duration::from_millis(2500));
    let group = rep.group("g");
    for i in 150..300 {
        op(&mut clients, &mut model, i);
        states.push(model.clone());
        if i == 200 {
            let (ok, out) = {
                let o = Command::new(bin("nbd-proxy"))
                    .args(["bookmark", "--control", ctl.to_str().unwrap(), "mid"])
                    .output()
                    .unwrap();
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                )
            };
            assert!(ok, "{out}");
        }
    }
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    wait_for("a fold into the base", Duration::from_secs(60), || {
        (group.mark("base").ok()?.seq > 0).then_some(())
    })
    .unwrap();
    drop(proxy);
    drop(rep);
    // The kill may have interrupted a fold; a replicator finishes it before it listens.
    drop(Replicator::start(&dir.path().join("store"), &[]).unwrap());

    // Map operation index -> seq: the n-th write/zero/trim record is the n-th operation.
    let base = group.mark("base").unwrap().seq;
    let records = read_journal(&group).unwrap();
    let first_kept = records.first().unwrap().seq;
    assert!(first_kept > 1, "retention folded the first phase");
    // Count operations in the folded part by replaying the journal's structure: every record
    // before `first_kept` is gone, so locate operation indices from the end instead.
    let op_seqs: Vec<u64> = records
        .iter()
        .filter(|r| matches!(r.kind, Kind::Write | Kind::Zero | Kind::Trim))
        .map(|r| r.seq)
        .collect();
    let offset_ops = states.len() - op_seqs.len(); // operations folded into the base
    let mut points: BTreeMap<u64, usize> = BTreeMap::new();
    for k in [0, 1, 7, 30, 60, 90, 120, op_seqs.len() - 1] {
        if let Some(&seq) = op_seqs.get(k) {
            points.insert(seq, offset_ops + k);
        }
    }
    let store = dir.path().join("store");
    let bookmark_seq = records
        .iter()
        .find(|r| r.kind == Kind::Bookmark)
        .unwrap()
        .seq;
    let ops_before_bookmark = op_seqs.iter().filter(|&&s| s < bookmark_seq).count();
    let mut checks: Vec<(String, usize)> = points
        .iter()
        .map(|(seq, i)| (format!("seq:{seq}"), *i))
        .collect();
    checks.push(("bookmark:mid".into(), offset_ops + ops_before_bookmark - 1));
    checks.push(("latest".into(), states.len() - 1));
    for (at, i) in &checks {
        let socket = dir.path().join("exp.sock");
        let export = Export::start(&store, at, &socket, &[]).unwrap();
        for (d, name) in names.iter().enumerate() {
            let via_export = export.read_disk(name, dir.path()).unwrap();
            assert!(
                via_export == states[*i][d],
                "export of {name} at {at} (op {i}) differs from the model"
            );
            let mat = materialize(&store, name, at, &dir.path().join("m.img"));
            assert!(
                mat == states[*i][d],
                "materialized {name} at {at} differs from the model"
            );
        }
        drop(export);
    }
    // Points folded away or never reached are refused with the reason.
    let (ok, out) = cli(
        "restore",
        &[
            "export",
            "--store",
            store.to_str().unwrap(),
            "--group",
            "g",
            "--at",
            &format!("seq:{}", base.saturating_sub(1)),
            "--socket",
            "/nonexistent/x.sock",
        ],
    );
    assert!(!ok && out.contains("before the oldest point"), "{out}");
    let (ok, out) = cli("restore", &["list", "--store", store.to_str().unwrap()]);
    assert!(ok && out.contains("bookmark    mid"), "{out}");
}

/// Every file of a group's store, with its bytes, to prove restore wrote nothing.
fn store_snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), read_file(&p));
            }
        }
    }
    out
}

/// A writable export takes writes (visible through it) and leaves every store file as it was.
#[test]
fn writable_export_never_changes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 8 * MIB, &[(0, &pattern(1, 8 * MIB as usize))]).unwrap();
    let rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let proxy = start_proxy(dir.path(), &rep.addr, &[("disk", &image)], &[]);
    wait_caught_up(&dir.path().join("ctl"), CAUGHT_UP).unwrap();
    drop(proxy);
    drop(rep);
    let store = dir.path().join("store");
    let before = store_snapshot(&store);
    {
        let export = Export::start(
            &store,
            "latest",
            &dir.path().join("w.sock"),
            &["--writable"],
        )
        .unwrap();
        assert!(export.output().contains("writable"), "{}", export.output());
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                &export.uri("disk"),
                "-c",
                "write -P 0x5a 4096 65536",
                "-c",
                "write -P 0x33 1000 10",
                "-c",
                "flush",
            ],
        )
        .unwrap();
        let got = export.read_disk("disk", dir.path()).unwrap();
        let mut want = pattern(1, 8 * MIB as usize);
        want[4096..4096 + 65536].fill(0x5a);
        want[1000..1010].fill(0x33);
        assert!(got == want, "writes are visible through the export");
    }
    let after = store_snapshot(&store);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (path, bytes) in &before {
        assert!(after[path] == *bytes, "{} changed", path.display());
    }
    check_store(&store).unwrap();
    // A read-only export refuses writes.
    let export = Export::start(&store, "latest", &dir.path().join("r.sock"), &[]).unwrap();
    let r = run(
        "qemu-io",
        &["-f", "raw", &export.uri("disk"), "-c", "write -P 1 0 4096"],
    );
    assert!(
        r.is_err() || r.unwrap().contains("failed"),
        "read-only export took a write"
    );
}

/// An export serves the same bytes while the replicator keeps ingesting and retention folds
/// the history older than it; the point it serves stays in the window while it is open.
#[test]
fn export_is_stable_while_ingest_and_retention_run() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let rep = Replicator::start(
        &dir.path().join("store"),
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
    let ctl = dir.path().join("ctl");
    let proxy = start_proxy(dir.path(), &rep.addr, &[("disk", &image)], &[]);
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let fio = |size: &str| {
        run(
            "fio",
            &[
                "--name=w",
                "--ioengine=nbd",
                &format!("--uri={}", proxy.uri("disk")),
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=8",
                "--size=16m",
                &format!("--io_size={size}"),
                "--refill_buffers",
                "--output=/dev/null",
            ],
        )
        .unwrap();
    };
    fio("8m");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let store = dir.path().join("store");
    let export = Export::start(&store, "latest", &dir.path().join("e.sock"), &[]).unwrap();
    let seq: u64 = export
        .output()
        .split("at seq ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    let first = export.read_disk("disk", dir.path()).unwrap();
    assert!(first == read_file(&image), "latest equals the image");
    // More history arrives and ages; retention folds what it may.
    fio("16m");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    fio("8m");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let group = rep.group("g");
    wait_for(
        "retention to fold up to the pinned point",
        Duration::from_secs(60),
        || (group.mark("base").ok()?.seq > 0).then_some(()),
    )
    .unwrap();
    let base = group.mark("base").unwrap().seq;
    assert!(
        base <= seq,
        "retention folded past the exported point ({base} > {seq})"
    );
    let second = export.read_disk("disk", dir.path()).unwrap();
    assert!(
        first == second,
        "the export served other bytes after ingest and retention"
    );
    // While the export is open the point is still in the window.
    let mat = materialize(
        &store,
        "disk",
        &format!("seq:{seq}"),
        &dir.path().join("m.img"),
    );
    assert!(mat == first);
    drop(export);
    // Without the pin, retention may go on.
    drop(proxy);
}

/// `restore verify --boot` boots a point under QEMU and passes on the expected console line;
/// a guest that never shows it fails with the console's tail.
#[test]
fn verify_boots_a_point() {
    let images = tests::vm::guest_images().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.img");
    std::fs::copy(images.join("disk.img"), &root).unwrap();
    let data = dir.path().join("data.img");
    std::fs::copy(images.join("data.img"), &data).unwrap();
    let rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let proxy = start_proxy(
        dir.path(),
        &rep.addr,
        &[("root", &root), ("data", &data)],
        &[],
    );
    wait_caught_up(&dir.path().join("ctl"), CAUGHT_UP).unwrap();
    drop(proxy);
    let store = dir.path().join("store");
    let kernel = images.join("vmlinux");
    let initrd = images.join("initramfs.gz");
    let accel = std::fs::read_to_string(images.join("accel")).unwrap_or_else(|_| "tcg".into());
    let args = |expect: &str, append: &str| -> Vec<String> {
        [
            "verify",
            "--store",
            store.to_str().unwrap(),
            "--group",
            "g",
            "--at",
            "latest",
            "--boot",
            "--expect",
            expect,
            "--timeout",
            "120s",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--append",
            append,
            "--accel",
            accel.trim(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a = args(
        "CDP-GUEST: READY",
        "console=ttyS0 quiet panic=-1 no_timer_check",
    );
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let (ok, out) = cli("restore", &a);
    assert!(ok, "{out}");
    assert!(out.contains("PASS") && out.contains("boots"), "{out}");
    let a = args(
        "NEVER SHOWN",
        "console=ttyS0 quiet panic=-1 no_timer_check cdp.cmds=poweroff",
    );
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let (ok, out) = cli("restore", &a);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL") && out.contains("console tail") && out.contains("POWEROFF"),
        "{out}"
    );
}

/// A corrupt record under the view is never served: the read gets EIO and the export's log
/// names the record; other ranges still read. Bad points get clear errors.
#[test]
fn corrupt_record_under_the_view_fails_the_read_with_eio() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 4 * MIB, &[]).unwrap();
    let rep = Replicator::start(&dir.path().join("store"), &["--segment-size", "1MiB"]).unwrap();
    let ctl = dir.path().join("ctl");
    let proxy = start_proxy(dir.path(), &rep.addr, &[("disk", &image)], &[]);
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let uri = proxy.uri("disk");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 1M 64k",
        ],
    )
    .unwrap();
    // Enough incompressible data after them to seal the first segment (restore trusts a
    // sealed segment's index and checks each record when it reads it).
    run(
        "fio",
        &[
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=write",
            "--bs=64k",
            "--offset=2m",
            "--size=2m",
            "--refill_buffers",
            "--output=/dev/null",
        ],
    )
    .unwrap();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    drop(proxy);
    drop(rep);
    let store = dir.path().join("store");
    let group = journal::store::GroupDir::new(&store, "g");
    let seg = group.segments().unwrap().remove(0);
    let (entries, _) = seg.load_index().unwrap();
    let victim = entries
        .iter()
        .find(|e| e.kind == Kind::Write && e.offset == 0)
        .unwrap();
    let mut bytes = read_file(&seg.path);
    bytes[(victim.pos + 60) as usize] ^= 1;
    std::fs::write(&seg.path, &bytes).unwrap();

    let socket = dir.path().join("c.sock");
    let log = dir.path().join("export.log");
    let mut child = Command::new(bin("restore"))
        .args([
            "export",
            "--store",
            store.to_str().unwrap(),
            "--group",
            "g",
            "--at",
            "latest",
            "--socket",
        ])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    tests::connect_while_alive("export", &mut child, &socket, Duration::from_secs(30))
        .unwrap()
        .unwrap();
    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    let bad = Command::new("qemu-io")
        .args(["-r", "-f", "raw", &uri, "-c", "read -P 0x11 0 4k"])
        .env("PATH", tests::system_path())
        .output()
        .unwrap();
    let bad = format!(
        "{}{}",
        String::from_utf8_lossy(&bad.stdout),
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(bad.contains("Input/output error"), "{bad}");
    let good = run(
        "qemu-io",
        &["-r", "-f", "raw", &uri, "-c", "read -P 0x22 1M 64k"],
    )
    .unwrap();
    assert!(!good.contains("error"), "{good}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let want = format!("corrupt record seq {} at byte {}", victim.seq, victim.pos);
    assert!(text.contains(&want), "want {want:?} in:\n{text}");
    // Materialize refuses to write the corrupt point.
    let (ok, out) = cli(
        "restore",
        &[
            "materialize",
            "--store",
            store.to_str().unwrap(),
            "--group",
            "g",
            "--at",
            "latest",
            "--output",
            dir.path().join("m.img").to_str().unwrap(),
        ],
    );
    assert!(!ok, "{out}");
    assert!(
        !dir.path().join("m.img").exists(),
        "no partial image is left behind"
    );
    let (ok, out) = cli(
        "restore",
        &[
            "export",
            "--store",
            store.to_str().unwrap(),
            "--group",
            "g",
            "--at",
            "bookmark:nope",
            "--socket",
            socket.to_str().unwrap(),
        ],
    );
    assert!(!ok && out.contains("no bookmark \"nope\""), "{out}");
    let (ok, out) = cli(
        "restore",
        &[
            "export",
            "--store",
            store.to_str().unwrap(),
            "--group",
            "nogroup",
            "--at",
            "latest",
            "--socket",
            socket.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && out.contains("no group \"nogroup\"; groups: g"),
        "{out}"
    );
}
