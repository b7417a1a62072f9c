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
use tests::{make_image, pattern, read_file, Proxy};

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

fn start_proxy(dir: &Path, rep: &str, disks: &[(&str, &Path)], extra: &[&str]) -> Proxy {
    let mut args: Vec<String> = Vec::new();
    for (name, path) in disks {
        args.push("--disk".into());
        args.push(format!("{name}={}", path.display()));
    }
    args.extend(
        ["--replicate", rep, "--group", "g", "--control"]
            .iter()
            .map(|s| s.to_string()),
    );
    args.push(dir.join("ctl").display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start(&dir.join("nbd.sock"), &args).unwrap()
}

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
                let mut next = move || {
                    (0..4).fold(0u64, |acc, _| acc << 8 | rng.next().unwrap_or(0))
                };
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
    let mut by_key: HashMap<(u16, Kind, u64, u64, Vec<u8>), Vec<Op>> = HashMap::new();
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
            let op = by_key
                .get_mut(&key)
                .and_then(Vec::pop)
                .unwrap_or_else(|| panic!("record seq {} ({:?}) matches no client operation", r.seq, r.kind));
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
            assert!(replayed == model, "replay to seq {} differs from the model", r.seq);
        }
    }
    assert_eq!(matched, ops.len(), "every client operation is in the journal once");
    let all = replay(&group, &records, u64::MAX).unwrap();
    for (i, img) in images.iter().enumerate() {
        assert!(all[i] == read_file(img), "full replay equals the proxy's image of disk {i}");
        assert!(
            read_file(&group.image("head", ["a", "b"][i])) == read_file(img),
            "the replicator's head image equals the proxy's image of disk {i}"
        );
    }
    assert!(records.iter().any(|r| r.kind == Kind::Flush));
    check_store(&rep.store).unwrap();
    proxy.assert_no_errors().unwrap();
}
