//! The store on S3 against a real S3 server (SeaweedFS on 127.0.0.1): the client's conditional
//! writes and its errors, then replication uploading to the bucket and restore reading from it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use bucket::{Bucket, Error, Location};
use journal::store::GroupDir;
use tests::cdp::*;
use tests::s3::{sealed_last_seq, upload_status, Seaweed, ACCESS_KEY};
use tests::{make_image, read_file, wait_for};

fn client(s: &Seaweed, bucket: &str, secret: &str) -> Bucket {
    let mut settings = s.settings();
    settings.s3_secret_access_key = Some(secret.into());
    let loc = Location {
        bucket: bucket.into(),
        prefix: "p".into(),
    };
    Bucket::open(loc, &settings).expect("a client")
}

#[test]
fn conditional_writes_let_one_writer_win() {
    let s = Seaweed::start("cdp").expect("start SeaweedFS");
    let b = client(&s, "cdp", tests::s3::SECRET_KEY);
    b.check().expect("the bucket is there");
    assert!(b.put_if_absent("x", &b"one"[..]).expect("put"));
    assert!(!b.put_if_absent("x", &b"two"[..]).expect("put again"));
    assert_eq!(&b.get("x").expect("get").expect("there").0[..], b"one");
    assert_eq!(&b.get_range("x", 1..3).expect("range")[..], b"ne");

    let e1 = b.put_if_match("m", &b"gen 1"[..], None).expect("create");
    assert!(matches!(
        b.put_if_match("m", &b"gen 1b"[..], None),
        Err(Error::Changed { .. })
    ));
    let e2 = b
        .put_if_match("m", &b"gen 2"[..], Some(&e1))
        .expect("update");
    assert!(matches!(
        b.put_if_match("m", &b"gen 2b"[..], Some(&e1)),
        Err(Error::Changed { .. })
    ));
    let (bytes, etag) = b.get("m").expect("get").expect("there");
    assert_eq!((&bytes[..], etag), (&b"gen 2"[..], e2));
    let keys: Vec<String> = b.list("").expect("list").into_iter().map(|k| k.0).collect();
    assert_eq!(keys, ["m", "x"]);
    b.delete("x").expect("delete");
    b.delete("x").expect("delete again");
    assert!(b.get("x").expect("get").is_none());
}

#[test]
fn bad_credentials_a_missing_bucket_and_a_gone_server_are_explained() {
    let mut s = Seaweed::start("cdp").expect("start SeaweedFS");
    let e = client(&s, "cdp", "wrong-secret").check().unwrap_err();
    assert!(matches!(e, Error::Credentials { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(ACCESS_KEY) && text.contains("AWS_SECRET_ACCESS_KEY"),
        "{text}"
    );

    let e = client(&s, "no-such-bucket", tests::s3::SECRET_KEY)
        .check()
        .unwrap_err();
    assert!(matches!(e, Error::NoBucket { .. }), "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");

    s.kill();
    let e = client(&s, "cdp", tests::s3::SECRET_KEY)
        .check()
        .unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("AWS_ENDPOINT_URL"), "{e}");
}

const MIB: u64 = 1 << 20;
const CAUGHT_UP: Duration = Duration::from_secs(120);

/// A group of two disks replicated through nbd-proxy to `replicator serve --store s3://`.
struct Setup {
    dir: tempfile::TempDir,
    s3: Seaweed,
    rep: Replicator,
    proxy: tests::Proxy,
    images: [PathBuf; 2],
    /// The replicator's --metrics address.
    metrics: String,
}

impl Setup {
    fn start() -> Setup {
        Setup::start_with(&[])
    }

    /// With more flags for `replicator serve`.
    fn start_with(more: &[&str]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let s3 = Seaweed::start("cdp").expect("start SeaweedFS");
        let images = [dir.path().join("a.img"), dir.path().join("b.img")];
        make_image(&images[0], 4 * MIB, &[]).unwrap();
        make_image(&images[1], 8 * MIB, &[]).unwrap();
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut flags = vec!["--metrics", metrics.as_str()];
        flags.extend(more);
        let rep = start_replicator(&dir, &s3, &flags);
        let proxy = start_proxy(
            dir.path(),
            &rep.addr,
            &[("a", &images[0]), ("b", &images[1])],
            &[],
        );
        wait_caught_up(&dir.path().join("ctl"), CAUGHT_UP).unwrap();
        Setup {
            dir,
            s3,
            rep,
            proxy,
            images,
            metrics,
        }
    }

    fn staging(&self) -> GroupDir {
        GroupDir::new(&self.dir.path().join("staging"), "g")
    }

    fn write(&self, disk: &str, cmds: &[&str]) {
        qemu_io(&self.proxy.uri(disk), cmds);
        wait_caught_up(&self.dir.path().join("ctl"), CAUGHT_UP).unwrap();
    }

    /// Disk b gets `mib` MiB of new, incompressible data, so the segments holding what came
    /// before are sealed.
    fn fill_b(&self, seed: u64, mib: u64) {
        let src = self.dir.path().join(format!("fill-{seed}"));
        std::fs::write(&src, tests::pattern(seed, (mib * MIB) as usize)).unwrap();
        let cmd = format!("write -s {} 0 {mib}M", src.display());
        self.write("b", &[&cmd]);
    }

    /// Waits until the bucket holds every sealed segment of the staging store; its last seq.
    fn wait_uploaded(&self) -> u64 {
        let g = self.staging();
        wait_for("the upload of every sealed segment", CAUGHT_UP, || {
            let sealed = sealed_last_seq(&g)?;
            let up = upload_status(&g)?;
            (up["uploaded_seq"].as_u64()? >= sealed && sealed > 0).then_some(sealed)
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}: upload.json {:?}, sealed to seq {:?}; log:\n{}",
                upload_status(&g),
                sealed_last_seq(&g),
                self.rep.log_text()
            )
        })
    }

    fn restore(&self, args: &[&str]) -> (bool, String) {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(self.s3.flags());
        all.push("--cache".into());
        all.push(self.dir.path().join("cache").display().to_string());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        cli("restore", &all)
    }

    fn materialize(&self, disk: &str, at: &str, name: &str) -> (bool, String, PathBuf) {
        let out = self.dir.path().join(name);
        let url = self.s3.url("cdp");
        let (ok, text) = self.restore(&[
            "materialize",
            "--store",
            &url,
            "--group",
            "g",
            "--disk",
            disk,
            "--at",
            at,
            "--output",
            out.to_str().unwrap(),
        ]);
        (ok, text, out)
    }
}

fn start_replicator(dir: &tempfile::TempDir, s3: &Seaweed, more: &[&str]) -> Replicator {
    let mut extra = vec!["--segment-size", "1MiB", "--upload-interval", "100ms"];
    extra.extend(more);
    let flags = s3.flags();
    extra.extend(flags.iter().map(String::as_str));
    Replicator::start_s3(&dir.path().join("staging"), &s3.url("cdp"), &extra).unwrap()
}

/// Replicate, upload, restore from the bucket: materialize and an export read by qemu-img
/// equal the disk, `restore list` shows the group; a point before the last write too.
#[test]
fn restore_from_the_bucket_equals_the_disk() {
    let s = Setup::start();
    s.write("a", &["write -P 0x11 0 1M", "write -P 0x22 512k 64k"]);
    let before = read_file(&s.images[0]);
    s.fill_b(1, 2);
    s.write("a", &["write -P 0x33 3M 4k", "write -z 0 4k"]);
    s.fill_b(9, 3);
    let uploaded = s.wait_uploaded();
    let expected = read_file(&s.images[0]);

    let url = s.s3.url("cdp");
    let (ok, text) = s.restore(&["list", "--store", &url, "--json"]);
    assert!(ok, "{text}");
    // stdout (the JSON) comes first, the log after it.
    let list: serde_json::Value = serde_json::Deserializer::from_str(&text)
        .into_iter()
        .next()
        .expect("a JSON listing")
        .expect("JSON");
    assert_eq!(list[0]["group"], "g", "{text}");
    assert_eq!(list[0]["newest_seq"].as_u64(), Some(uploaded), "{text}");

    let (ok, text, out) = s.materialize("a", "latest", "a-latest.img");
    assert!(ok, "{text}");
    assert!(
        read_file(&out) == expected,
        "the bucket's latest point of a equals disk a"
    );

    // A point before the second write to a: the replay of the staging store up to it.
    let g = s.staging();
    let records = read_journal(&g).unwrap();
    let first_second = records
        .iter()
        .find(|r| r.disk == 0 && r.offset == 3 * MIB)
        .expect("the 0x33 write")
        .seq;
    let (ok, text, out) = s.materialize("a", &format!("seq:{}", first_second - 1), "a-early.img");
    assert!(ok, "{text}");
    assert!(
        read_file(&out) == before,
        "an earlier point equals disk a as it was then"
    );

    // A real NBD client reading an export of the bucket's point.
    let mut extra = s.s3.flags();
    extra.push("--cache".into());
    extra.push(s.dir.path().join("cache").display().to_string());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let export = Export::start(
        Path::new(&url),
        "latest",
        &s.dir.path().join("e.sock"),
        &extra,
    )
    .unwrap();
    assert!(export.read_disk("a", s.dir.path()).unwrap() == expected);
    drop(export);

    // Both disks at the bucket's last point, through a cache far smaller than what is read
    // (blocks are evicted and fetched again) and without the background fetch, equal the
    // staging store's export of the same point.
    let at = format!("seq:{uploaded}");
    let mut small = extra.clone();
    small.extend(["--cache-size", "1M", "--no-hydrate", "--fetchers", "2"]);
    let bucket = Export::start(Path::new(&url), &at, &s.dir.path().join("s.sock"), &small).unwrap();
    let staging = s.dir.path().join("staging");
    let local = Export::start(&staging, &at, &s.dir.path().join("l.sock"), &[]).unwrap();
    for d in ["a", "b"] {
        let from_bucket = bucket.read_disk(d, s.dir.path()).unwrap();
        assert!(
            from_bucket == local.read_disk(d, s.dir.path()).unwrap(),
            "disk {d} at seq {uploaded}: the bucket's export equals the staging store's"
        );
    }
    drop((bucket, local));

    // What status shows of the upload.
    let (ok, text) = cli(
        "replicator",
        &[
            "status",
            "--store",
            s.dir.path().join("staging").to_str().unwrap(),
        ],
    );
    assert!(
        ok && text.contains("uploaded    seq") && text.contains("RPO bucket"),
        "{text}"
    );
    let scrape = scrape(&s.metrics).unwrap();
    let g = [("group", "g")];
    assert_eq!(
        scrape.value("replicator_uploaded_seq", &g),
        Some(uploaded as f64)
    );
    assert_eq!(scrape.value("replicator_upload_failing", &g), Some(0.0));
    assert!(scrape.value("replicator_local_only_bytes", &g).is_some());
    s.rep.assert_no_errors_but(&[]).unwrap();
}

/// With --seal-after, a segment is sealed once its first record is that old, so the bucket
/// gets a write soon even when no more come (else the open segment stays local for good).
#[test]
fn an_idle_segment_is_sealed_by_age_and_uploaded() {
    let s = Setup::start_with(&["--seal-after", "1s"]);
    s.write("a", &["write -P 0x42 0 64k"]);
    let status = wait_caught_up(&s.dir.path().join("ctl"), CAUGHT_UP).unwrap();
    let seq = status["captured_seq"].as_u64().unwrap();
    let g = s.staging();
    // Well before the 60 s an s3:// store seals after by default: the flag is what sealed it.
    wait_for(
        "the idle segment sealed and uploaded",
        Duration::from_secs(40),
        || {
            upload_status(&g)?["uploaded_seq"]
                .as_u64()
                .filter(|&u| u >= seq)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: upload.json {:?}", upload_status(&g)));
    let (ok, text, out) = s.materialize("a", "latest", "a-idle.img");
    assert!(ok, "{text}");
    assert!(read_file(&out) == read_file(&s.images[0]));
}

/// A damaged byte in a segment in the bucket, inside a record the point serves: restore reads
/// it by a range GET, the record's crc refuses it, and materialize stops naming the object; no
/// output is left. The same read from the staging store (undamaged) succeeds.
#[test]
fn a_corrupted_object_is_reported_never_served() {
    let s = Setup::start();
    s.write("a", &["write -P 0x5a 0 2M"]);
    s.fill_b(3, 3);
    s.wait_uploaded();
    // A data record of disk a in the first (sealed, uploaded) segment.
    let g = s.staging();
    let seg = g.segments().unwrap().remove(0);
    let (entries, _) = seg.load_index().unwrap();
    let e = entries
        .iter()
        .find(|e| e.disk == 0 && e.kind.carries_data())
        .expect("a record of disk a in the first segment");
    let client = s.s3.client().unwrap();
    let key = client
        .list("cdp/g/journal/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.ends_with(".seg"))
        .min()
        .expect("an uploaded segment");
    let (bytes, _) = client.get(&key).unwrap().unwrap().clone();
    let mut damaged = bytes.to_vec();
    let at = (e.pos + journal::record::HEADER_LEN as u64 + u64::from(e.stored_len) / 2) as usize;
    damaged[at] ^= 0x40;
    client.put(&key, damaged).unwrap();

    let (ok, text, out) = s.materialize("a", "latest", "restored-a.img");
    assert!(!ok, "a damaged object must fail the restore: {text}");
    let name = key.rsplit('/').next().unwrap();
    assert!(
        text.contains("corrupt record") && text.contains(name),
        "{text}"
    );
    assert!(!out.exists(), "nothing was written");
}

/// The S3 server killed mid-upload: records are still acknowledged (the ack is the local
/// fsync), status says what is local only; once it is back the upload resumes; the replicator
/// killed and restarted takes the group over and goes on from the manifest. Nothing is lost
/// and no segment is in the manifest twice.
#[test]
fn a_server_gone_mid_upload_then_back_loses_nothing() {
    let mut s = Setup::start();
    s.write("a", &["write -P 0x01 0 1M"]);
    s.fill_b(1, 2);
    s.wait_uploaded();
    s.s3.kill();
    // Acknowledged with the bucket gone (wait_caught_up in write).
    s.write("a", &["write -P 0x02 1M 1M"]);
    s.fill_b(20, 3);
    let g = s.staging();
    let up = wait_for("status to report the upload failing", CAUGHT_UP, || {
        upload_status(&g)
            .filter(|u| u["error"].is_string() && u["local_only_seq"].as_u64() > Some(0))
    })
    .unwrap();
    assert!(
        up["error"].as_str().unwrap().contains("does not answer"),
        "{up}"
    );
    s.s3.restart().unwrap();
    s.wait_uploaded();
    // The replicator crashes mid-upload (an object no manifest names is left) and comes back:
    // it takes the group over (epoch + 1) and collects that garbage.
    let orphan = "cdp/g/journal/0000000001-00000000000000999999-00000000000001000000.seg";
    s.s3.client()
        .unwrap()
        .put(orphan, &b"half an upload"[..])
        .unwrap();
    s.rep.restart().unwrap();
    s.write("a", &["write -P 0x03 2M 1M"]);
    s.fill_b(40, 2);
    let uploaded = s.wait_uploaded();
    let up = upload_status(&g).unwrap();
    assert!(up["epoch"].as_u64() >= Some(2), "{up}");

    let client = s.s3.client().unwrap();
    let (bytes, _) = client.get("cdp/g/manifest.json").unwrap().unwrap();
    let m = bucket::manifest::Manifest::decode(&bytes, "manifest").unwrap();
    assert_eq!(m.uploaded_seq(), uploaded);
    assert!(client.get(orphan).unwrap().is_none(), "garbage collected");
    // Contiguous (decode checks it), so no segment twice; the records are those acknowledged.
    let records = read_journal(&g).unwrap();
    assert!(records.iter().any(|r| r.seq == uploaded));
    let (ok, text, out) = s.materialize("a", "latest", "restored-a.img");
    assert!(ok, "{text}");
    assert!(read_file(&out) == read_file(&s.images[0]));
}

/// Misconfiguration is refused at once with a sentence that names the fix.
#[test]
fn wrong_credentials_and_a_missing_bucket_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = Seaweed::start("cdp").expect("start SeaweedFS");
    let mut args = vec![
        "list".to_owned(),
        "--store".into(),
        s3.url("p"),
        "--cache".into(),
        dir.path().display().to_string(),
    ];
    args.extend(s3.flags_with_secret("not-the-secret"));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = cli("restore", &a);
    assert!(
        !ok && text.contains("refused access key") && text.contains("AWS_SECRET_ACCESS_KEY"),
        "{text}"
    );

    let mut args = vec![
        "list".to_owned(),
        "--store".into(),
        "s3://no-such-bucket/p".into(),
        "--cache".into(),
        dir.path().display().to_string(),
    ];
    args.extend(s3.flags());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = cli("restore", &a);
    assert!(
        !ok && text.contains("bucket no-such-bucket does not exist"),
        "{text}"
    );

    let staging = dir.path().join("staging");
    let mut args = vec![
        "serve".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--insecure".into(),
        "--store".into(),
        s3.url("p"),
        "--staging".into(),
        staging.display().to_string(),
    ];
    args.extend(s3.flags_with_secret("not-the-secret"));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = cli("replicator", &a);
    assert!(!ok && text.contains("refused access key"), "{text}");
}

/// The bucket's manifest of group g, checked.
/// File names of the segment indexes restore keeps under `cache`.
fn cached_indexes(cache: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![cache.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "idx") {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

fn bucket_manifest(s3: &Seaweed) -> bucket::manifest::Manifest {
    tests::s3::manifest_of_g(s3).0
}

/// A second replicator that takes the group over in the bucket (from a copy of the staging
/// store) raises the epoch; the first one's next commit fails its condition, and it stops
/// uploading the group with a reason in its status, never overwriting the new writer's manifest.
#[test]
fn a_second_writer_takes_the_group_over_and_fences_the_first() {
    let s = Setup::start();
    s.write("a", &["write -P 0x41 0 1M"]);
    s.fill_b(5, 2);
    s.wait_uploaded();
    let first = bucket_manifest(&s.s3).writer;
    let copy = s.dir.path().join("staging2");
    tests::run(
        "cp",
        &[
            "-a",
            s.dir.path().join("staging").to_str().unwrap(),
            copy.to_str().unwrap(),
        ],
    )
    .unwrap();
    let mut extra = vec!["--upload-interval", "100ms"];
    let flags = s.s3.flags();
    extra.extend(flags.iter().map(String::as_str));
    let second = Replicator::start_s3(&copy, &s.s3.url("cdp"), &extra).unwrap();
    let taken = wait_for("the second writer to take over", CAUGHT_UP, || {
        let w = bucket_manifest(&s.s3).writer;
        (w.id != first.id).then_some(w)
    })
    .unwrap();
    assert_eq!(taken.epoch, first.epoch + 1);

    // The first one has more to upload: its commit loses, and it stops.
    s.fill_b(6, 3);
    let g = s.staging();
    let up = wait_for("the first writer to be fenced", CAUGHT_UP, || {
        upload_status(&g).filter(|u| {
            u["error"]
                .as_str()
                .is_some_and(|e| e.contains("taken over"))
        })
    })
    .unwrap();
    assert!(up["error"].as_str().unwrap().contains(&taken.id), "{up}");
    assert_eq!(bucket_manifest(&s.s3).writer, taken);
    drop(second);
}

/// Retention folds in the staging store reach the bucket: a new base (only its chunks that
/// are not zeroes), the folded segments out of the manifest and deleted; restore still equals
/// the disk.
#[test]
fn retention_folds_move_the_bucket_base_and_delete_folded_segments() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = Seaweed::start("cdp").expect("start SeaweedFS");
    let image = dir.path().join("a.img");
    make_image(&image, 16 * MIB, &[]).unwrap();
    let mut extra = vec![
        "--segment-size",
        "1MiB",
        "--upload-interval",
        "100ms",
        "--retention",
        "1s",
        "--retention-interval",
        "200ms",
    ];
    let flags = s3.flags();
    extra.extend(flags.iter().map(String::as_str));
    let rep = Replicator::start_s3(&dir.path().join("staging"), &s3.url("cdp"), &extra).unwrap();
    let proxy = start_proxy(dir.path(), &rep.addr, &[("a", &image)], &[]);
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let cache = dir.path().join("cache");
    let mut early = Vec::new();
    for i in 0..4u64 {
        let src = dir.path().join(format!("fill-{i}"));
        std::fs::write(&src, tests::pattern(100 + i, 2 * MIB as usize)).unwrap();
        let cmd = format!("write -s {} {}M 2M", src.display(), 2 * i);
        qemu_io(&proxy.uri("a"), &[&cmd]);
        wait_caught_up(&ctl, CAUGHT_UP).unwrap();
        if i == 0 {
            // A listing now keeps the indexes of the bucket's first segments in the cache.
            let client = s3.client().unwrap();
            wait_for("a segment in the bucket", CAUGHT_UP, || {
                let (bytes, _) = client.get("cdp/g/manifest.json").ok()??;
                let m = bucket::manifest::Manifest::decode(&bytes, "manifest").ok()?;
                (!m.segments.is_empty()).then_some(())
            })
            .unwrap();
            let mut args = vec!["list", "--store"];
            let url = s3.url("cdp");
            args.push(&url);
            args.extend(["--cache", cache.to_str().unwrap()]);
            let flags = s3.flags();
            args.extend(flags.iter().map(String::as_str));
            let (ok, text) = cli("restore", &args);
            assert!(ok, "{text}");
            early = cached_indexes(&cache);
            assert!(!early.is_empty(), "the listing kept indexes in the cache");
        }
    }
    let m = wait_for("a fold to reach the bucket", CAUGHT_UP, || {
        let m = bucket_manifest(&s3);
        (m.base.seq > 0).then_some(m)
    })
    .unwrap();
    let named: Vec<String> = m
        .segments
        .iter()
        .flat_map(|s| [s.segment.key.clone(), s.index.key.clone()])
        .collect();
    let client = s3.client().unwrap();
    let listed = wait_for("folded segments to be deleted", CAUGHT_UP, || {
        let mut listed: Vec<String> = client
            .list("cdp/g/journal/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k.trim_start_matches("cdp/").to_owned())
            .collect();
        listed.sort();
        let m = bucket_manifest(&s3);
        let mut named: Vec<String> = m
            .segments
            .iter()
            .flat_map(|s| [s.segment.key.clone(), s.index.key.clone()])
            .collect();
        named.sort();
        (listed == named).then_some(listed)
    })
    .unwrap_or_else(|e| panic!("{e}: manifest names {named:?}"));
    assert!(listed.iter().all(|k| k.starts_with("g/journal/")));
    let chunks = client.list("cdp/g/base/a/").unwrap();
    assert!(
        chunks.iter().any(|(k, _)| k.ends_with(".chunk")),
        "{chunks:?}"
    );

    // Stop the replicator first: a fold after the restore below would drop from the manifest
    // an index that restore rightly kept in its cache, and the check on the cache would race.
    rep.assert_no_errors_but(&[]).unwrap();
    drop(rep); // no more folds: the manifest stays as it is

    // The bucket's newest point (the open segment's records are not in the bucket).
    let out = dir.path().join("restored.img");
    let mut args = vec![
        "materialize".to_owned(),
        "--store".into(),
        s3.url("cdp"),
        "--group".into(),
        "g".into(),
        "--at".into(),
        format!("seq:{}", bucket_manifest(&s3).uploaded_seq()),
        "--output".into(),
        out.display().to_string(),
        "--cache".into(),
        cache.display().to_string(),
    ];
    args.extend(s3.flags());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = cli("restore", &a);
    assert!(ok, "{text}");
    // The point equals the staging store's replay up to it (an independent reader).
    let g = GroupDir::new(&dir.path().join("staging"), "g");
    let records = read_journal(&g).unwrap();
    let seq = bucket_manifest(&s3).uploaded_seq();
    let staged = replay(&g, &records, seq).unwrap();
    assert!(
        read_file(&out) == staged[0],
        "the bucket's point equals the staging store's"
    );
    // The cache keeps only the indexes the manifest names: those of folded segments are gone.
    let m = bucket_manifest(&s3);
    let named: Vec<String> = m
        .segments
        .iter()
        .map(|s| s.index.key.rsplit('/').next().unwrap().to_owned())
        .collect();
    let now = cached_indexes(&cache);
    assert!(
        now.iter().all(|i| named.contains(i)),
        "{now:?} vs {named:?}"
    );
    assert!(
        early.iter().any(|i| !named.contains(i)),
        "a fold dropped a segment whose index was cached early: {early:?} vs {named:?}"
    );

    // A damaged byte in a base chunk object: reads of its block are refused (its checksum),
    // naming the object; no output is left.
    let m = bucket_manifest(&s3);
    let table_ref = &m.base.volumes[0].table;
    let (bytes, _) = client
        .get(&format!("cdp/{}", table_ref.key))
        .unwrap()
        .unwrap();
    let table = bucket::manifest::ChunkTable::decode(&bytes, &table_ref.key).unwrap();
    let chunk = table
        .chunks
        .iter()
        .flatten()
        .next()
        .expect("a stored chunk");
    let key = format!("cdp/{}", chunk.key);
    let (bytes, _) = client.get(&key).unwrap().unwrap();
    let mut damaged = bytes.to_vec();
    let at = damaged.len() / 3;
    damaged[at] ^= 0x01;
    client.put(&key, damaged).unwrap();
    let out = dir.path().join("restored-base.img");
    args[6] = format!("seq:{}", m.base.seq);
    args[8] = out.display().to_string();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = cli("restore", &a);
    let name = chunk.key.rsplit('/').next().unwrap();
    assert!(!ok, "a damaged chunk must fail the restore: {text}");
    assert!(text.contains("is damaged") && text.contains(name), "{text}");
    assert!(!out.exists(), "nothing was written");
}

/// Not a test: one bounded measurement for BENCHMARKS.md (`cargo test --release -p tests
/// --test s3 -- --ignored --nocapture measure`): 128 MiB of incompressible writes replicated,
/// how long until the bucket holds them, and the time until a restore export answers from the
/// bucket (cold cache, warm cache) and from the staging store.
#[test]
#[ignore]
fn measure_upload_and_restore_ttfb() {
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let s3 = Seaweed::start("cdp").expect("start SeaweedFS");
    let image = dir.path().join("a.img");
    make_image(&image, 256 * MIB, &[]).unwrap();
    let mut extra = vec!["--segment-size", "16MiB", "--upload-interval", "100ms"];
    let flags = s3.flags();
    extra.extend(flags.iter().map(String::as_str));
    let staging = dir.path().join("staging");
    let rep = Replicator::start_s3(&staging, &s3.url("cdp"), &extra).unwrap();
    let proxy = start_proxy(dir.path(), &rep.addr, &[("a", &image)], &[]);
    let ctl = dir.path().join("ctl");
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let src = dir.path().join("fill");
    std::fs::write(&src, tests::pattern(7, 16 * MIB as usize)).unwrap();
    let started = Instant::now();
    for i in 0..8 {
        let cmd = format!("write -s {} {}M 16M", src.display(), 16 * i);
        qemu_io(&proxy.uri("a"), &[&cmd]);
    }
    wait_caught_up(&ctl, CAUGHT_UP).unwrap();
    let acked = started.elapsed();
    let g = GroupDir::new(&staging, "g");
    wait_for("the upload", CAUGHT_UP, || {
        let sealed = sealed_last_seq(&g)?;
        (upload_status(&g)?["uploaded_seq"].as_u64()? >= sealed && sealed > 0).then_some(())
    })
    .unwrap();
    let uploaded = started.elapsed();
    let m = bucket_manifest(&s3);
    let bytes: u64 = m.segments.iter().map(|s| s.segment.len).sum();
    println!(
        "ingest: 128 MiB acknowledged in {:.2} s; bucket holds {:.1} MiB ({} segments) at {:.2} s: {:.0} MiB/s end to end",
        acked.as_secs_f64(),
        bytes as f64 / MIB as f64,
        m.segments.len(),
        uploaded.as_secs_f64(),
        bytes as f64 / MIB as f64 / uploaded.as_secs_f64()
    );
    let mut flags = s3.flags();
    flags.push("--cache".into());
    flags.push(dir.path().join("cache").display().to_string());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    for (what, store, extra) in [
        (
            "bucket, cold cache",
            Path::new(&s3.url("cdp")).to_owned(),
            flags.clone(),
        ),
        (
            "bucket, warm cache",
            Path::new(&s3.url("cdp")).to_owned(),
            flags.clone(),
        ),
        ("staging store", staging.clone(), vec![]),
    ] {
        let t = Instant::now();
        let e = Export::start(&store, "latest", &dir.path().join("e.sock"), &extra).unwrap();
        let ttfb = t.elapsed();
        let t = Instant::now();
        let data = e.read_disk("a", dir.path()).unwrap();
        println!(
            "restore export from the {what}: first byte after {:.2} s; whole 256 MiB disk read by qemu-img in {:.2} s",
            ttfb.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
        assert_eq!(data.len() as u64, 256 * MIB);
    }
}
