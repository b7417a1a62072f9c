//! Stopping and restarting nbd-proxy: SIGTERM drains what was read and exits 0; QEMU's NBD
//! client with `reconnect-delay` rides over a restart (graceful or kill -9) losing no I/O.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use tests::qmp::Qemu;
use tests::raw::*;
use tests::{make_image, pattern, read_file, Proxy};

const MIB: u64 = 1 << 20;

#[test]
fn sigterm_answers_requests_already_read_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let disk = format!("disk={}", image.display());
    let mut p = Proxy::start(&dir.path().join("nbd.sock"), &["--disk", &disk]).unwrap();
    let mut c = RawClient::connect(&p.socket);
    c.go("disk", false, false);
    let mut burst = Vec::new();
    for i in 0..256u64 {
        burst.extend_from_slice(&request_bytes(CMD_WRITE, 0, i, i * 16384, 16384));
        burst.extend_from_slice(&pattern(i, 16384));
    }
    c.send(&burst);
    p.stop().unwrap();
    assert!(!p.socket.exists(), "the socket file is removed at exit");
    // Every reply that arrived is a success, and its write is in the image.
    let mut acknowledged = Vec::new();
    loop {
        let mut h = [0u8; 16];
        if std::io::Read::read_exact(&mut c.stream, &mut h).is_err() {
            break;
        }
        assert_eq!(be32(&h[4..8]), 0, "error in reply {h:02x?}");
        acknowledged.push(u64::from_be_bytes(h[8..16].try_into().unwrap()));
    }
    let img = read_file(&image);
    for i in &acknowledged {
        let at = (*i * 16384) as usize;
        assert!(
            img[at..at + 16384] == pattern(*i, 16384)[..],
            "acknowledged write {i} is missing"
        );
    }
}

fn qemu_with_reconnect(dir: &std::path::Path, socket: &std::path::Path) -> Qemu {
    let blockdev = format!(
        "driver=nbd,node-name=d0,server.type=unix,server.path={},export=disk,reconnect-delay=30,open-timeout=30",
        socket.display()
    );
    Qemu::start(dir, &[blockdev]).unwrap()
}

/// Writes through QEMU, restarts the proxy with `stop`, writes while it is down, and checks that
/// QEMU reconnected and nothing was lost.
fn survives_restart(stop: impl FnOnce(&mut Proxy)) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let disk = format!("disk={}", image.display());
    let mut p = Proxy::start(&dir.path().join("nbd.sock"), &["--disk", &disk]).unwrap();
    let mut q = qemu_with_reconnect(dir.path(), &p.socket);
    q.qemu_io("d0", "write -P 0x11 0 64k").unwrap();
    stop(&mut p);
    // The proxy stays away for a while, then comes back; QEMU holds the guest's I/O meanwhile.
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        p.restart().unwrap();
        p
    });
    q.qemu_io("d0", "write -P 0x22 1M 64k").unwrap();
    q.qemu_io("d0", "read -P 0x22 1M 64k").unwrap();
    q.qemu_io("d0", "read -P 0x11 0 64k").unwrap();
    q.qemu_io("d0", "flush").unwrap();
    let mut p = restarter.join().unwrap();
    drop(q);
    p.stop().unwrap();
    let img = read_file(&image);
    assert!(img[..65536].iter().all(|&b| b == 0x11));
    assert!(img[MIB as usize..MIB as usize + 65536]
        .iter()
        .all(|&b| b == 0x22));
}

#[test]
fn qemu_reconnects_after_sigterm_restart() {
    survives_restart(|p| p.stop().unwrap());
}

#[test]
fn qemu_reconnects_after_kill_9() {
    survives_restart(|p| p.kill9().unwrap());
}
