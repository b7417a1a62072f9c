//! A real guest under QEMU with its disks served by nbd-proxy: it boots, writes checksummed
//! generations, rides over a graceful restart and a kill -9 of the proxy, and leaves a clean
//! file system whose files a second boot verifies.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use tests::vm::{guest_images, Guest};
use tests::{run, Proxy};

const STEP: Duration = Duration::from_secs(120);

#[test]
fn guest_boots_from_the_proxy_and_survives_proxy_restarts() {
    let images = guest_images().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.img");
    let data = dir.path().join("data.img");
    std::fs::copy(images.join("disk.img"), &root).unwrap();
    std::fs::copy(images.join("data.img"), &data).unwrap();
    let disks = [
        format!("root={}", root.display()),
        format!("data={}", data.display()),
    ];
    let socket = dir.path().join("nbd.sock");
    let mut proxy = Proxy::start(&socket, &["--disk", &disks[0], "--disk", &disks[1]]).unwrap();

    let mut guest = Guest::boot(dir.path(), &[(&socket, "root"), (&socket, "data")]).unwrap();
    guest
        .wait_line("CDP-GUEST: MOUNTED /dev/vdb", STEP)
        .unwrap();
    guest.wait_line("CDP-GUEST: READY", STEP).unwrap();
    guest.send("gen 1").unwrap();
    let gen1 = guest.wait_line("GEN 1 WRITTEN", STEP).unwrap();

    // A graceful restart while the guest writes: QEMU holds its I/O and reconnects.
    guest.send("gen 2").unwrap();
    proxy.stop().unwrap();
    proxy.restart().unwrap();
    let gen2 = guest.wait_line("GEN 2 WRITTEN", STEP).unwrap();

    // A crash of the proxy: the same, without a flush.
    guest.send("data-gen 3").unwrap();
    guest.send("random-writes 50").unwrap();
    proxy.kill9().unwrap();
    proxy.restart().unwrap();
    guest.wait_line("GEN 3 WRITTEN", STEP).unwrap();
    guest.wait_line("RANDOM DONE 50", STEP).unwrap();
    guest.send("check").unwrap();
    let done = guest.wait_line("CHECK DONE base=/mnt", STEP).unwrap();
    assert!(done.ends_with("gens=1 2"), "{done}");
    guest.send("poweroff").unwrap();
    guest.wait_exit(STEP).unwrap();
    proxy.stop().unwrap();
    let console = std::fs::read_to_string(&guest.console).unwrap();
    assert!(
        !console.contains(" BAD"),
        "a generation failed its checksum:\n{console}"
    );
    assert!(
        !console.contains("I/O error"),
        "the guest saw an I/O error:\n{console}"
    );
    drop(guest);

    // The images the proxy served are clean file systems...
    run("e2fsck", &["-fn", root.to_str().unwrap()]).unwrap();
    run("e2fsck", &["-fn", data.to_str().unwrap()]).unwrap();

    // ...and a second boot finds every generation with the checksum the guest reported.
    proxy.restart().unwrap();
    std::fs::remove_file(dir.path().join("console.log")).unwrap();
    let mut guest = Guest::boot(dir.path(), &[(&socket, "root"), (&socket, "data")]).unwrap();
    let sum = |line: &str| line.split_whitespace().last().unwrap().to_owned();
    let have1 = guest.wait_line("HAVE GEN 1 ", STEP).unwrap();
    let have2 = guest.wait_line("HAVE GEN 2 ", STEP).unwrap();
    guest.wait_line("HAVE GEN 3 ", STEP).unwrap();
    assert!(
        have1.contains(&format!("{} OK", sum(&gen1))),
        "{have1} vs {gen1}"
    );
    assert!(
        have2.contains(&format!("{} OK", sum(&gen2))),
        "{have2} vs {gen2}"
    );
    guest.wait_line("CDP-GUEST: READY", STEP).unwrap();
    guest.send("poweroff").unwrap();
    guest.wait_exit(STEP).unwrap();
    proxy.stop().unwrap();
}
