//! A group taken over from the bucket onto a new machine: a replicator with an empty
//! `--staging` rebuilds the group from the bucket before it serves its proxy (SeaweedFS on
//! 127.0.0.1, a real nbd-proxy written to with qemu-io).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use journal::record::Kind;
use journal::store::GroupDir;
use tests::cdp::*;
use tests::s3::{manifest_of_g, sealed_last_seq, upload_status, Seaweed};
use tests::{make_image, read_file, wait_for};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 256 << 10;
const CAUGHT_UP: Duration = Duration::from_secs(120);

fn flags(s3: &Seaweed) -> Vec<String> {
    let mut f: Vec<String> = ["--segment-size", "1MiB", "--upload-interval", "100ms"]
        .map(str::to_owned)
        .to_vec();
    f.extend(s3.flags());
    f
}

/// `replicator serve --store s3://.../cdp --staging STAGING` on `addr`.
fn replicator_on(addr: &str, s3: &Seaweed, staging: &Path) -> anyhow::Result<Replicator> {
    let f = flags(s3);
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    Replicator::start_s3_on(addr, staging, &s3.url("cdp"), &f)
}

fn write(proxy: &tests::Proxy, ctl: &Path, disk: &str, cmds: &[&str]) {
    qemu_io(&proxy.uri(disk), cmds);
    wait_caught_up(ctl, CAUGHT_UP).unwrap();
}

/// `mib` MiB of incompressible data at the start of disk b, so what came before is sealed.
fn fill_b(dir: &Path, proxy: &tests::Proxy, seed: u64, mib: u64) {
    let src = dir.join(format!("fill-{seed}"));
    std::fs::write(&src, tests::pattern(seed, (mib * MIB) as usize)).unwrap();
    let cmd = format!("write -s {} 0 {mib}M", src.display());
    write(proxy, &dir.join("ctl"), "b", &[&cmd]);
}

/// Waits until the bucket holds every sealed segment of staging group `g`; its last seq.
fn wait_uploaded(g: &GroupDir, rep: &Replicator) -> u64 {
    wait_for("the upload of every sealed segment", CAUGHT_UP, || {
        let sealed = sealed_last_seq(g)?;
        let up = upload_status(g)?;
        (up["uploaded_seq"].as_u64()? >= sealed && sealed > 0).then_some(sealed)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}; log:\n{}", upload_status(g), rep.log_text()))
}

/// Bytes a hash comparison of `disks` against `head` sends: every 256 KiB chunk that differs.
fn differing_bytes(head: &[Vec<u8>], disks: &[PathBuf]) -> u64 {
    let mut n = 0;
    for (h, d) in head.iter().zip(disks) {
        let d = read_file(d);
        assert_eq!(h.len(), d.len());
        for (a, b) in h.chunks(CHUNK as usize).zip(d.chunks(CHUNK as usize)) {
            if a != b {
                n += a.len() as u64;
            }
        }
    }
    n
}

fn materialize(s3: &Seaweed, dir: &Path, disk: &str, at: &str) -> (bool, String, PathBuf) {
    let out = dir.join(format!("restored-{disk}-{}.img", at.replace(':', "-")));
    let cache = dir.join("restore-cache");
    let mut args: Vec<String> = [
        "materialize",
        "--store",
        &s3.url("cdp"),
        "--group",
        "g",
        "--disk",
        disk,
        "--at",
        at,
        "--output",
        out.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(s3.flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = cli("restore", &args);
    (ok, text, out)
}

/// Replicator A uploads a group written through a real proxy and is killed -9; replicator B
/// on a new machine (an empty staging store, the same bucket, A's address) rebuilds the group
/// from the bucket, and the proxy reconnects to it: B's staging store checks, the hash
/// comparison sends exactly the chunks that differ from the bucket's last point (A's records
/// that never reached the bucket), new records follow the bucket's last seq and are uploaded,
/// the bucket's latest point equals the disks, the epoch went up and A can no longer commit,
/// a bookmark survives the move, and A's old staging store is refused as behind the bucket.
#[test]
fn a_new_machine_takes_the_group_over_from_the_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3 = Seaweed::start("cdp").expect("start SeaweedFS");
    let images = [d.join("a.img"), d.join("b.img")];
    make_image(&images[0], 4 * MIB, &[]).unwrap();
    make_image(&images[1], 8 * MIB, &[]).unwrap();
    let staging_a = d.join("staging-a");
    let mut rep_a = replicator_on(&format!("127.0.0.1:{}", free_port()), &s3, &staging_a).unwrap();
    let proxy = start_proxy(d, &rep_a.addr, &[("a", &images[0]), ("b", &images[1])], &[]);
    let ctl = d.join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    write(
        &proxy,
        &ctl,
        "a",
        &["write -P 0x11 0 1M", "write -P 0x22 3M 64k"],
    );
    let (ok, text) = cli(
        "nbd-proxy",
        &[
            "bookmark",
            "--control",
            ctl.to_str().unwrap(),
            "before-move",
        ],
    );
    assert!(ok, "{text}");
    let at_bookmark = read_file(&images[0]);
    fill_b(d, &proxy, 1, 3);
    // Left in A's open segment: never uploaded.
    write(&proxy, &ctl, "a", &["write -P 0x33 2M 4k"]);
    let ga = GroupDir::new(&staging_a, "g");
    let uploaded_a = wait_uploaded(&ga, &rep_a);
    let (m_a, etag_a) = manifest_of_g(&s3);
    assert_eq!(m_a.uploaded_seq(), uploaded_a);
    let durable_a = ga.checkpoint().unwrap().unwrap().last_seq;
    assert!(durable_a > uploaded_a, "A holds records the bucket lacks");
    // What the bucket's last point lacks of the disks: what the proxy must send B.
    let records_a = read_journal(&ga).unwrap();
    let at_upload = replay(&ga, &records_a, uploaded_a).unwrap();
    let expected = differing_bytes(&at_upload, &images);
    assert!(expected > 0 && expected <= 2 * MIB, "{expected}");
    let before = proxy_status(&ctl).unwrap();
    let sent_before = before["sync_bytes_sent"].as_u64().unwrap();
    let syncs_before = before["syncs_completed"].as_u64().unwrap();

    rep_a.kill9();
    let staging_b = d.join("staging-b");
    let rep_b = replicator_on(&rep_a.addr, &s3, &staging_b).unwrap();
    let log = rep_b.log_text();
    assert!(
        log.contains("rebuilding group g from the bucket") && log.contains("rebuilt group g"),
        "{log}"
    );
    wait_for("the delta sync with B", CAUGHT_UP, || {
        let s = proxy_status(&ctl).ok()?;
        (s["syncs_completed"].as_u64()? > syncs_before).then_some(())
    })
    .unwrap();
    let status = wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let sent = status["sync_bytes_sent"].as_u64().unwrap() - sent_before;
    assert_eq!(
        sent, expected,
        "the delta sync sends the chunks the bucket's last point lacks, nothing else: {status}"
    );
    assert!(proxy.log_text().contains("comparing every chunk by hash"));

    // (1) B's staging store checks; its journal holds the bucket's records, then the sync.
    check_store(&staging_b).unwrap();
    let gb = GroupDir::new(&staging_b, "g");
    let records_b = read_journal(&gb).unwrap();
    assert_eq!(
        records_b[0].seq, 1,
        "the whole history is in B's staging store"
    );
    let next = records_b.iter().find(|r| r.seq == uploaded_a + 1).unwrap();
    assert_eq!(
        next.kind,
        Kind::SyncBegin,
        "new records follow the bucket's last seq"
    );
    assert!(records_b[..uploaded_a as usize]
        .iter()
        .zip(&records_a)
        .all(|(b, a)| (b.seq, b.kind, b.offset, &b.data) == (a.seq, a.kind, a.offset, &a.data)));

    // (4) B took the group over: the epoch went up, A's segments are kept (none twice, their
    // bookmarks with them), and A's writer can no longer commit.
    let m_b = wait_for("B to take the group over", CAUGHT_UP, || {
        let m = manifest_of_g(&s3).0;
        (m.writer.id != m_a.writer.id).then_some(m)
    })
    .unwrap();
    assert_eq!(m_b.writer.epoch, m_a.writer.epoch + 1);
    assert_eq!(m_b.segments[..m_a.segments.len()], m_a.segments[..]);
    let marks: Vec<String> = m_b
        .segments
        .iter()
        .flat_map(|s| s.bookmarks.clone().unwrap_or_default())
        .map(|b| b.name)
        .collect();
    assert_eq!(marks, ["before-move"]);
    let fenced =
        s3.client()
            .unwrap()
            .put_if_match("cdp/g/manifest.json", m_a.encode(), Some(&etag_a));
    assert!(
        matches!(fenced, Err(bucket::Error::Changed { .. })),
        "{fenced:?}"
    );

    // (3) More writes go on through B, reach the bucket, and restore equals the disks.
    write(&proxy, &ctl, "a", &["write -P 0x44 1M 512k"]);
    fill_b(d, &proxy, 2, 3);
    let uploaded_b = wait_uploaded(&gb, &rep_b);
    let m = manifest_of_g(&s3).0;
    assert_eq!(m.uploaded_seq(), uploaded_b);
    assert_eq!(m.segments[..m_a.segments.len()], m_a.segments[..]);
    let (ok, text, out) = materialize(&s3, d, "a", "latest");
    assert!(ok, "{text}");
    assert!(read_file(&out) == read_file(&images[0]), "a at latest");
    let (ok, text, out) = materialize(&s3, d, "b", "latest");
    assert!(ok, "{text}");
    let staged = replay(&gb, &read_journal(&gb).unwrap(), uploaded_b).unwrap();
    assert!(read_file(&out) == staged[1], "b at the bucket's last seq");
    let (ok, text, out) = materialize(&s3, d, "a", "bookmark:before-move");
    assert!(ok, "{text}");
    assert!(read_file(&out) == at_bookmark, "a at the bookmark");

    // A's old staging store is behind the bucket now: refused, not forked.
    let e = replicator_on(&format!("127.0.0.1:{}", free_port()), &s3, &staging_a).unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.contains("would fork its history")
            && text.contains(&format!("seq {uploaded_b}"))
            && text.contains(staging_a.join("g").to_str().unwrap()),
        "{text}"
    );
    assert_eq!(manifest_of_g(&s3).0.uploaded_seq(), uploaded_b);

    rep_b.assert_no_errors_but(&[]).unwrap();
    drop(proxy);
    let mut rep_b = rep_b;
    rep_b.kill9();
    // With B gone its kept chunk hashes are compared with the point too.
    let text = check_store(&staging_b).unwrap();
    assert!(!text.contains("in use"), "{text}");
}

/// A damaged or missing object stops the rebuild with its key: the replicator does not start,
/// and the staging store has no group. Once the bucket is whole, the rebuild goes on from
/// what it fetched before.
#[test]
fn a_damaged_or_missing_object_stops_the_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3 = Seaweed::start("cdp").expect("start SeaweedFS");
    let images = [d.join("a.img"), d.join("b.img")];
    make_image(&images[0], 4 * MIB, &[]).unwrap();
    make_image(&images[1], 8 * MIB, &[]).unwrap();
    let staging_a = d.join("staging-a");
    let mut rep_a = replicator_on(&format!("127.0.0.1:{}", free_port()), &s3, &staging_a).unwrap();
    let proxy = start_proxy(d, &rep_a.addr, &[("a", &images[0]), ("b", &images[1])], &[]);
    let ctl = d.join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    write(&proxy, &ctl, "a", &["write -P 0x5a 0 2M"]);
    fill_b(d, &proxy, 3, 2);
    fill_b(d, &proxy, 4, 2);
    wait_uploaded(&GroupDir::new(&staging_a, "g"), &rep_a);
    rep_a.kill9();
    drop(proxy);

    let m = manifest_of_g(&s3).0;
    assert!(m.segments.len() >= 2, "{m:?}");
    let client = s3.client().unwrap();
    // Fetched in order: the first segment's index stops the first attempt, the second
    // segment (not fetched yet then) the next one.
    let idx_key = format!("cdp/{}", m.segments[0].index.key);
    let seg_key = format!("cdp/{}", m.segments[1].segment.key);
    let (seg, _) = client.get(&seg_key).unwrap().unwrap();
    let (idx, _) = client.get(&idx_key).unwrap().unwrap();
    let staging_b = d.join("staging-b");
    let addr = format!("127.0.0.1:{}", free_port());
    let name = |k: &str| k.rsplit('/').next().unwrap().to_owned();

    client.delete(&idx_key).unwrap();
    let text = format!("{:#}", replicator_on(&addr, &s3, &staging_b).unwrap_err());
    assert!(
        text.contains("is missing from the bucket") && text.contains(&name(&idx_key)),
        "{text}"
    );
    assert!(!GroupDir::new(&staging_b, "g").exists(), "no group from it");

    client.put(&idx_key, idx).unwrap();
    let mut damaged = seg.to_vec();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x40;
    client.put(&seg_key, damaged).unwrap();
    let text = format!("{:#}", replicator_on(&addr, &s3, &staging_b).unwrap_err());
    assert!(
        text.contains("is damaged") && text.contains(&name(&seg_key)),
        "{text}"
    );
    assert!(!GroupDir::new(&staging_b, "g").exists(), "no group from it");

    client.put(&seg_key, seg).unwrap();
    let rep_b = replicator_on(&addr, &s3, &staging_b).unwrap();
    assert!(GroupDir::new(&staging_b, "g").exists());
    check_store(&staging_b).unwrap();
    rep_b.assert_no_errors_but(&[]).unwrap();
}
