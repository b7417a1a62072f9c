//! The replicator's store and the operator's tools: bookmarks, status, retention, `replicator
//! check` finding a corrupt record, a torn tail cut at start-up, and bad input on its port.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::time::Duration;

use tests::cdp::*;
use tests::{make_image, run, wait_for, Proxy};

const MIB: u64 = 1 << 20;
const CAUGHT_UP: Duration = Duration::from_secs(120);

/// Writes `len` bytes of incompressible data at `offset` with fio.
fn fio_write(proxy: &Proxy, offset: u64, len: u64) {
    run(
        "fio",
        &[
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={}", proxy.uri("disk")),
            "--rw=write",
            "--bs=64k",
            "--iodepth=4",
            &format!("--offset={offset}"),
            &format!("--size={len}"),
            "--refill_buffers",
            "--output=/dev/null",
        ],
    )
    .unwrap();
}

#[test]
fn bookmarks_and_status_for_people_and_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let mut rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let proxy = start_proxy(dir.path(), &rep.addr, &[("disk", &image)], &[]);
    let ctl = dir.path().join("ctl");
    let ctl_s = ctl.display().to_string();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    qemu_io(&proxy.uri("disk"), &["write -P 0x11 0 1M", "flush"]);

    let (ok, out) = cli(
        "nbd-proxy",
        &["bookmark", "--control", &ctl_s, "before-upgrade"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("before-upgrade placed at seq") && out.contains("durable"),
        "{out}"
    );
    let (ok, out) = cli("nbd-proxy", &["bookmark", "--control", &ctl_s, ""]);
    assert!(
        !ok && out.contains("1 to 200 printable characters"),
        "{out}"
    );

    let (ok, out) = cli("nbd-proxy", &["status", "--control", &ctl_s]);
    assert!(ok, "{out}");
    for want in [
        "link connected",
        "lag ",
        "change log",
        "durable at replicator",
    ] {
        assert!(out.contains(want), "status lacks {want:?}:\n{out}");
    }
    let store = rep.store.display().to_string();
    let (ok, out) = cli("replicator", &["status", "--store", &store]);
    assert!(ok, "{out}");
    assert!(out.contains("bookmarks   before-upgrade"), "{out}");
    assert!(out.contains("connected from"), "{out}");
    let (ok, out) = cli("replicator", &["status", "--store", &store, "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["group"], "g");
    assert_eq!(v[0]["bookmarks"][0], "before-upgrade");
    assert!(v[0]["durable_seq"].as_u64().unwrap() >= 3);

    // With the replicator away, the link shows down and a bookmark is placed but not durable.
    rep.kill9();
    qemu_io(&proxy.uri("disk"), &["write -P 0x22 1M 1M"]);
    wait_for("the link to show down", Duration::from_secs(30), || {
        (proxy_status(&ctl).ok()?["link"] == "down").then_some(())
    })
    .unwrap();
    let (ok, out) = cli(
        "nbd-proxy",
        &[
            "bookmark",
            "--control",
            &ctl_s,
            "--timeout",
            "300ms",
            "while-away",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("has not acknowledged it"), "{out}");
    let (_, out) = cli("nbd-proxy", &["status", "--control", &ctl_s]);
    assert!(out.contains("link down"), "{out}");
    rep.restart().unwrap();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let (_, out) = cli("replicator", &["status", "--store", &store]);
    assert!(out.contains("before-upgrade, while-away"), "{out}");
    replica_equals(&rep.store, &[("disk", &image)]);

    let (ok, out) = cli("nbd-proxy", &["status", "--control", "/nonexistent/ctl"]);
    assert!(
        !ok && out.contains("is nbd-proxy running with --control?"),
        "{out}"
    );
}

/// Sealed segments older than --retention are folded into the base; the store still replays
/// to the image. A --max-store-size too small for the window folds more, warns, and says so.
#[test]
fn retention_folds_history_into_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let rep = Replicator::start(
        &dir.path().join("store"),
        &[
            "--retention",
            "1s",
            "--retention-interval",
            "300ms",
            "--segment-size",
            "1MiB",
        ],
    )
    .unwrap();
    let proxy = start_proxy(dir.path(), &rep.addr, &[("disk", &image)], &[]);
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let group = rep.group("g");
    for round in 0..6u64 {
        fio_write(&proxy, (round % 4) * 2 * MIB, 2 * MIB);
    }
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    wait_for("a fold into the base", Duration::from_secs(60), || {
        (group.mark("base").ok()?.seq > 0).then_some(())
    })
    .unwrap();
    // Every sealed segment is old enough: wait until all are folded, so that no fold runs
    // while this test reads the store.
    wait_for(
        "every sealed segment folded",
        Duration::from_secs(60),
        || (group.segments().ok()?.len() == 1).then_some(()),
    )
    .unwrap();
    assert!(rep.log_text().contains("folded"), "{}", rep.log_text());
    replica_equals(&rep.store, &[("disk", &image)]);
    drop(proxy);

    // Size limit below what the retention window needs.
    let dir2 = tempfile::tempdir().unwrap();
    let image2 = dir2.path().join("disk.img");
    make_image(&image2, 16 * MIB, &[]).unwrap();
    let rep2 = Replicator::start(
        &dir2.path().join("store"),
        &[
            "--retention",
            "24h",
            "--max-store-size",
            "1MiB",
            "--retention-interval",
            "300ms",
            "--segment-size",
            "1MiB",
        ],
    )
    .unwrap();
    let proxy2 = start_proxy(dir2.path(), &rep2.addr, &[("disk", &image2)], &[]);
    let ctl2 = dir2.path().join("ctl");
    for _ in 0..4 {
        fio_write(&proxy2, 0, 3 * MIB);
    }
    wait_caught_up(&ctl2, CAUGHT_UP).unwrap();
    wait_for("the size warning", Duration::from_secs(60), || {
        rep2.log_text()
            .contains("history was shortened")
            .then_some(())
    })
    .unwrap();
    let store2 = rep2.store.display().to_string();
    let (_, out) = cli("replicator", &["status", "--store", &store2, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["retention"]["history_below_target"], true, "{out}");
    let (_, out) = cli("replicator", &["status", "--store", &store2]);
    assert!(
        out.contains("WARNING: --max-store-size keeps history below the target"),
        "{out}"
    );
    wait_caught_up(&ctl2, CAUGHT_UP).unwrap();
    wait_for(
        "every sealed segment folded",
        Duration::from_secs(60),
        || (rep2.group("g").segments().ok()?.len() == 1).then_some(()),
    )
    .unwrap();
    replica_equals(&rep2.store, &[("disk", &image2)]);
    drop(proxy2);
}

/// A flipped byte inside a stored record is found by `replicator check`, which names the
/// segment, the byte offset and the seq before it, and exits 1.
#[test]
fn check_reports_a_corrupt_record_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let mut rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let proxy = start_proxy(dir.path(), &rep.addr, &[("disk", &image)], &[]);
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    qemu_io(
        &proxy.uri("disk"),
        &[
            "write -P 0x41 0 64k",
            "write -P 0x42 64k 64k",
            "write -P 0x43 128k 64k",
        ],
    );
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    drop(proxy);
    rep.kill9();
    let store = rep.store.display().to_string();
    let (ok, out) = cli("replicator", &["check", "--store", &store]);
    assert!(ok, "{out}");

    let group = rep.group("g");
    let seg = group.segments().unwrap().remove(0);
    let (entries, _) = seg.load_index().unwrap();
    let victim = entries
        .iter()
        .find(|e| e.kind == journal::Kind::Write && e.stored_len > 100)
        .unwrap();
    let mut bytes = std::fs::read(&seg.path).unwrap();
    bytes[(victim.pos + 56 + 20) as usize] ^= 0x40;
    std::fs::write(&seg.path, &bytes).unwrap();
    let (ok, out) = cli("replicator", &["check", "--store", &store]);
    assert!(!ok, "check must fail:\n{out}");
    let place = format!("at byte {} (after seq {})", victim.pos, victim.seq - 1);
    assert!(
        out.contains(&place) && out.contains("checksum mismatch"),
        "want {place:?} in:\n{out}"
    );
}

/// A crash that leaves half a record at the end of the journal: the next start cuts it off
/// and says where; replication resumes and the replica equals the image.
#[test]
fn torn_tail_is_cut_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let mut rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    let proxy = start_proxy(dir.path(), &rep.addr, &[("disk", &image)], &[]);
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    qemu_io(&proxy.uri("disk"), &["write -P 0x61 0 1M"]);
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    rep.kill9();
    let seg = rep.group("g").segments().unwrap().pop().unwrap();
    // Where the records end (zero padding may follow them).
    let len = journal::segment::scan(&std::fs::read(&seg.path).unwrap(), |_, _| {})
        .unwrap()
        .valid_len;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&seg.path)
        .unwrap();
    f.write_all(b"CDPR\x01\x00\x00\x00half a record").unwrap();
    drop(f);
    qemu_io(&proxy.uri("disk"), &["write -P 0x62 1M 1M"]);
    rep.restart().unwrap();
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let log = rep.log_text();
    let line = format!("at byte {len}");
    assert!(
        log.contains("journal tail cut at start-up") && log.contains(&line),
        "{log}"
    );
    replica_equals(&rep.store, &[("disk", &image)]);
}

/// Garbage, a bad group name and a proxy whose disks differ from the stored group get clear
/// errors; the replicator keeps serving.
#[test]
fn bad_input_on_the_replicator_port() {
    let dir = tempfile::tempdir().unwrap();
    let rep = Replicator::start(&dir.path().join("store"), &[]).unwrap();
    // Not our protocol at all.
    let mut s = std::net::TcpStream::connect(&rep.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    // A hello naming a group that would escape the store.
    let hello = journal::wire::Hello {
        protocol: journal::wire::PROTOCOL,
        group: "../escape".into(),
        volumes: vec![journal::wire::Volume {
            name: "d".into(),
            size: 4096,
        }],
        want_hashes: false,
        stream: "s".into(),
        link_timeout_ms: 5000,
    };
    let mut s = std::net::TcpStream::connect(&rep.addr).unwrap();
    s.write_all(&hello.encode()).unwrap();
    let (kind, body) = journal::wire::read_frame(&mut s, journal::wire::MAX_BODY).unwrap();
    assert_eq!(kind, journal::wire::FrameType::Error);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("group name"), "{text}");
    assert!(!dir.path().join("escape").exists());

    // The group exists with a 16 MiB disk; a proxy now offers 32 MiB under the same name.
    let image = dir.path().join("disk.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let proxy = start_proxy(dir.path(), &rep.addr, &[("disk", &image)], &[]);
    wait_caught_up(&dir.path().join("ctl"), CAUGHT_UP).unwrap();
    drop(proxy);
    let other = tempfile::tempdir().unwrap();
    let big = other.path().join("disk.img");
    make_image(&big, 32 * MIB, &[]).unwrap();
    let proxy = start_proxy(other.path(), &rep.addr, &[("disk", &big)], &[]);
    wait_for(
        "the proxy to report the refusal",
        Duration::from_secs(30),
        || {
            proxy
                .log_text()
                .contains("was stored with volumes")
                .then_some(())
        },
    )
    .unwrap();
    let s = proxy_status(&other.path().join("ctl")).unwrap();
    assert_eq!(s["link"], "down", "{s}");
    // Still serving the guest, and the replicator still serves others.
    qemu_io(&proxy.uri("disk"), &["write -P 0x7 0 4k"]);
    std::net::TcpStream::connect(&rep.addr).unwrap();
}
