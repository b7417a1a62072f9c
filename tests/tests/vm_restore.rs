//! The demo's scenario with assertions: a replicated VM writes generations; a bookmark point
//! and a time point each boot in a second VM and show exactly the generations written before
//! them, with the guest's own checksums; a materialized bookmark is a clean file system; the
//! proxy killed with -9 under the running VM leaves the guest running and the journal complete.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::cdp::*;
use tests::vm::{guest_images, Guest};
use tests::{bin, read_file, run, Proxy};

const STEP: Duration = Duration::from_secs(120);
const CAUGHT_UP: Duration = Duration::from_secs(120);

/// Boots a second VM from an export of `at` and returns its root disk's `CHECK DONE` line and
/// its `HAVE GEN` lines.
fn boot_point(store: &Path, at: &str, dir: &Path) -> (String, Vec<String>) {
    std::fs::create_dir_all(dir).unwrap();
    let export = Export::start(store, at, &dir.join("past.sock"), &["--writable"]).unwrap();
    let mut guest = Guest::boot(dir, &[(&export.socket, "root"), (&export.socket, "data")])
        .unwrap_or_else(|e| panic!("boot {at}: {e:#}\nexport: {}", export.output()));
    let done = guest.wait_line("CHECK DONE base=/mnt", STEP).unwrap();
    guest.wait_line("CDP-GUEST: READY", STEP).unwrap();
    guest.send("poweroff").unwrap();
    guest.wait_exit(STEP).unwrap();
    let console = std::fs::read_to_string(&guest.console).unwrap();
    let have = console
        .lines()
        .filter(|l| l.contains("HAVE GEN"))
        .map(|l| l.trim().to_owned())
        .collect();
    (done, have)
}

#[test]
fn past_points_boot_with_exactly_their_generations() {
    let images = guest_images().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.img");
    let data = dir.path().join("data.img");
    std::fs::copy(images.join("disk.img"), &root).unwrap();
    std::fs::copy(images.join("data.img"), &data).unwrap();
    let rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let ctl = dir.path().join("ctl");
    let disks = [
        format!("root={}", root.display()),
        format!("data={}", data.display()),
    ];
    let socket = dir.path().join("nbd.sock");
    let mut proxy = Proxy::start(
        &socket,
        &[
            "--disk",
            &disks[0],
            "--disk",
            &disks[1],
            "--group",
            "g",
            "--replicate",
            &rep.addr,
            "--insecure",
            "--control",
            ctl.to_str().unwrap(),
        ],
    )
    .unwrap();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let vm1 = dir.path().join("vm1");
    std::fs::create_dir_all(&vm1).unwrap();
    let mut guest = Guest::boot(&vm1, &[(&socket, "root"), (&socket, "data")]).unwrap();
    guest.wait_line("CDP-GUEST: READY", STEP).unwrap();

    guest.send("gen 1").unwrap();
    let gen1 = guest.wait_line("GEN 1 WRITTEN", STEP).unwrap();
    let out = Command::new(bin("nbd-proxy"))
        .args(["bookmark", "--control", ctl.to_str().unwrap(), "gen1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A time point after generation 1 and before generation 2.
    std::thread::sleep(Duration::from_millis(1100));
    let t1 = journal::pit::format_time(journal::now_ns());
    std::thread::sleep(Duration::from_millis(1100));
    guest.send("gen 2").unwrap();
    let gen2 = guest.wait_line("GEN 2 WRITTEN", STEP).unwrap();

    // kill -9 of the proxy while the guest writes: QEMU reconnects, the guest goes on.
    guest.send("data-gen 3").unwrap();
    guest.send("random-writes 50").unwrap();
    proxy.kill9().unwrap();
    proxy.restart().unwrap();
    guest.wait_line("GEN 3 WRITTEN", STEP).unwrap();
    guest.wait_line("RANDOM DONE 50", STEP).unwrap();

    // Both past points boot, while the first VM keeps running, with exactly generation 1.
    let store = dir.path().join("store");
    let sum = |line: &str| line.split_whitespace().last().unwrap().to_owned();
    for (i, at) in ["bookmark:gen1".to_owned(), t1.clone()].iter().enumerate() {
        let (done, have) = boot_point(&store, at, &dir.path().join(format!("past{i}")));
        assert!(done.ends_with("gens=1"), "{at}: {done}");
        assert_eq!(have.len(), 1, "{at}: {have:?}");
        assert!(
            have[0].ends_with(&format!("{} OK", sum(&gen1))),
            "{at}: the guest's checksum of generation 1: {have:?} vs {gen1}"
        );
    }
    // The latest point has both generations and the data disk's.
    let (done, have) = boot_point(&store, "latest", &dir.path().join("latest"));
    assert!(done.ends_with("gens=1 2"), "{done}");
    assert!(
        have.iter()
            .any(|h| h.ends_with(&format!("{} OK", sum(&gen2)))),
        "{have:?}"
    );
    assert!(have.iter().all(|h| h.ends_with(" OK")), "{have:?}");

    // A recovery group verified at one point: the guest checks the data disk's generation too.
    let accel = std::fs::read_to_string(images.join("accel")).unwrap_or_else(|_| "tcg".into());
    let out = Command::new(bin("restore"))
        .args([
            "verify",
            "--store",
            store.to_str().unwrap(),
            "--group",
            "g",
            "--at",
            "latest",
        ])
        .args([
            "--boot",
            "--expect",
            "CHECK DONE base=/data gens=3",
            "--timeout",
            "120s",
        ])
        .arg("--kernel")
        .arg(images.join("vmlinux"))
        .arg("--initrd")
        .arg(images.join("initramfs.gz"))
        .args([
            "--append",
            "console=ttyS0 quiet panic=-1 no_timer_check",
            "--accel",
            accel.trim(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("PASS"), "{text}");

    // File-level: the materialized bookmark is a clean file system holding generation 1 only.
    let img = dir.path().join("gen1.img");
    let out = Command::new(bin("restore"))
        .args([
            "materialize",
            "--store",
            store.to_str().unwrap(),
            "--group",
            "g",
            "--disk",
            "root",
        ])
        .args(["--at", "bookmark:gen1", "--output", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run("e2fsck", &["-fn", img.to_str().unwrap()]).unwrap();
    let listing = run("debugfs", &["-R", "ls -l /", img.to_str().unwrap()]).unwrap();
    assert!(
        listing.contains("gen-1") && !listing.contains("gen-2"),
        "{listing}"
    );

    // The first VM finishes; the journal is complete: it replays to the disks it served.
    guest.send("check").unwrap();
    let done = guest.wait_line("CHECK DONE base=/mnt", STEP).unwrap();
    assert!(done.ends_with("gens=1 2"), "{done}");
    guest.send("poweroff").unwrap();
    guest.wait_exit(STEP).unwrap();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    proxy.stop().unwrap();
    let console = std::fs::read_to_string(&guest.console).unwrap();
    assert!(
        !console.contains(" BAD") && !console.contains("I/O error"),
        "{console}"
    );
    let group = rep.group("g");
    let records = read_journal(&group).unwrap();
    let replayed = replay(&group, &records, u64::MAX).unwrap();
    assert!(
        replayed[0] == read_file(&root),
        "journal replay equals the root disk"
    );
    assert!(
        replayed[1] == read_file(&data),
        "journal replay equals the data disk"
    );
    check_store(&store).unwrap();
}
