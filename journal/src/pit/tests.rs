use super::*;
use crate::record::Encoded;
use crate::store::{GroupMeta, FORMAT};
use crate::wire::Volume;
use crate::writer::JournalWriter;
use proptest::prelude::*;

#[test]
fn points_parse() {
    let now = 10_000_000_000_000;
    assert_eq!(parse_point("latest", now), Ok(Point::Latest));
    assert_eq!(parse_point("seq:42", now), Ok(Point::Seq(42)));
    assert_eq!(
        parse_point("bookmark:pre up", now),
        Ok(Point::Bookmark("pre up".into()))
    );
    assert_eq!(
        parse_point("-5m", now),
        Ok(Point::Time(now - 300_000_000_000))
    );
    assert_eq!(
        parse_point("2026-11-22T10:15:03Z", now),
        Ok(Point::Time(1_795_342_503_000_000_000))
    );
    assert_eq!(
        parse_point("2026-11-22T11:15:03.5+01:00", now),
        Ok(Point::Time(1_795_342_503_500_000_000))
    );
    for bad in [
        "",
        "seq:x",
        "bookmark:",
        "yesterday",
        "2026-13-01T00:00:00Z",
        "-5",
        // Past what nanoseconds since 1970 hold (found by the fuzzer: it overflowed).
        "2555-01-01T00:00:00Z",
        "2554-07-21T23:34:33.9Z",
        // Signs inside fields, and an offset without its colon.
        "\n6007-+6-20T-3:40:00+60+60",
        "2026-+1-22T10:15:03Z",
        "2026-11-22T10:15:03+0100",
    ] {
        assert!(parse_point(bad, now).is_err(), "{bad:?}");
    }
    assert_eq!(
        format_time(1_795_342_503_000_000_000),
        "2026-11-22T10:15:03Z"
    );
}

/// A naive disk of sources, byte by byte, for checking `DiskMap`.
fn model_lookup(model: &[Option<(u64, u64)>], offset: u64, len: u64) -> Vec<Option<(u64, u64)>> {
    model[offset as usize..(offset + len) as usize].to_vec()
}

proptest! {
    #[test]
    fn disk_map_matches_a_byte_model(
        writes in proptest::collection::vec((0u64..200, 1u64..60), 1..40),
        reads in proptest::collection::vec((0u64..200, 1u64..60), 1..10),
    ) {
        let size = 260usize;
        // model: for each byte, (record id, offset within its payload)
        let mut model: Vec<Option<(u64, u64)>> = vec![None; size];
        let mut changes = Vec::new();
        for (id, (off, len)) in writes.iter().enumerate() {
            changes.push((*off, off + len, Source::Record { segment: 0, len: 0, pos: id as u64, skip: 0 }));
            for i in 0..*len {
                model[(off + i) as usize] = Some((id as u64, i));
            }
        }
        let map = DiskMap::build(&changes);
        let mut out = Vec::new();
        for (off, len) in reads {
            map.lookup(off, len, &mut out);
            let mut got = Vec::new();
            let mut at = off;
            for &(o, l, src) in &out {
                prop_assert_eq!(o, at);
                at += l;
                for i in 0..l {
                    got.push(match src {
                        Source::Base => None,
                        Source::Record { pos, skip, .. } => Some((pos, skip + i)),
                        Source::Zero => unreachable!(),
                    });
                }
            }
            prop_assert_eq!(at, off + len);
            prop_assert_eq!(got, model_lookup(&model, off, len));
        }
    }
}

fn group_with(records: &[(Kind, u64, u64, &str)]) -> (tempfile::TempDir, GroupDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = GroupDir::new(tmp.path(), "g");
    dir.create(&GroupMeta {
        format: FORMAT,
        name: "g".into(),
        volumes: vec![Volume {
            name: "d".into(),
            size: 1 << 20,
        }],
        created_ns: 1,
    })
    .unwrap();
    let (mut w, _) = JournalWriter::open(&dir, 0, 1 << 20).unwrap();
    let sealed: Vec<Vec<u8>> = records
        .iter()
        .enumerate()
        .map(|(i, (kind, off, time, text))| {
            let seq = i as u64 + 1;
            let enc = if kind.carries_data() {
                Encoded::data(*kind, 0, *off, &[seq as u8; 512], false)
            } else {
                Encoded::control(
                    *kind,
                    0,
                    *off,
                    if kind.changes_data() { 512 } else { 0 },
                    text,
                )
            };
            enc.seal(seq, *time)
        })
        .collect();
    let refs: Vec<_> = sealed
        .iter()
        .map(|b| crate::record::parse(b).unwrap().unwrap())
        .collect();
    w.append(&refs).unwrap();
    w.sync().unwrap();
    (tmp, dir)
}

#[test]
fn history_resolves_points_and_refuses_bad_ones() {
    let s = 1_000_000_000u64;
    let (_tmp, dir) = group_with(&[
        (Kind::SyncBegin, 0, 10 * s, "seed"),   // 1
        (Kind::SyncData, 0, 10 * s, ""),        // 2
        (Kind::SyncEnd, 0, 11 * s, "seed"),     // 3
        (Kind::Write, 512, 12 * s, ""),         // 4
        (Kind::Flush, 0, 12 * s, ""),           // 5
        (Kind::Bookmark, 0, 13 * s, "b1"),      // 6
        (Kind::Write, 1024, 20 * s, ""),        // 7
        (Kind::SyncBegin, 0, 30 * s, "resync"), // 8
        (Kind::SyncData, 0, 30 * s, ""),        // 9
    ]);
    let h = History::load(&dir).unwrap();
    assert_eq!(h.last_seq, 9);
    assert_eq!(
        h.bookmarks,
        vec![Bookmark {
            name: "b1".into(),
            seq: 6,
            time_ns: 13 * s
        }]
    );
    assert_eq!(h.inconsistent.len(), 2);
    assert_eq!(h.resolve(&Point::Bookmark("b1".into())).unwrap(), 6);
    assert_eq!(
        h.resolve(&Point::Latest).unwrap(),
        7,
        "newest consistent point"
    );
    assert_eq!(h.resolve(&Point::Time(15 * s)).unwrap(), 6);
    assert_eq!(h.resolve(&Point::Seq(3)).unwrap(), 3);
    let err = |p: Point| h.resolve(&p).unwrap_err().to_string();
    assert!(
        err(Point::Seq(2)).contains("not a consistent state"),
        "{}",
        err(Point::Seq(2))
    );
    assert!(err(Point::Seq(9)).contains("still running"));
    assert!(err(Point::Seq(99)).contains("after the newest point"));
    assert!(err(Point::Time(5 * s)).contains("before the oldest point"));
    assert!(err(Point::Bookmark("nope".into())).contains("bookmarks: b1"));
    // The view at seq 6: the sync chunk, then the write over part of it.
    let maps = h.view(6);
    let mut out = Vec::new();
    maps[0].lookup(0, 2048, &mut out);
    let kinds: Vec<(u64, u64)> = out.iter().map(|(o, l, _)| (*o, *l)).collect();
    assert_eq!(kinds, vec![(0, 512), (512, 512), (1024, 1024)]);
    assert!(matches!(out[2].2, Source::Base));
}

/// How long building a source map of a million 4 KiB writes over 10 GiB takes (prints it;
/// `cargo test --release -p journal -- --ignored --nocapture map_build_speed`).
#[test]
#[ignore]
fn map_build_speed() {
    let mut x = 88172645463325252u64;
    let changes: Vec<(u64, u64, Source)> = (0..1_000_000u64)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (10 << 30) / 4096) * 4096;
            (
                off,
                off + 4096,
                Source::Record {
                    segment: 0,
                    len: 0,
                    pos: i,
                    skip: 0,
                },
            )
        })
        .collect();
    let t = std::time::Instant::now();
    let map = DiskMap::build(&changes);
    eprintln!("1M changes: {:?}, {} ranges", t.elapsed(), map.ranges());
    // Every change over the same block.
    let same: Vec<(u64, u64, Source)> = (0..1_000_000u64)
        .map(|i| {
            (
                4096,
                8192 + i % 7,
                Source::Record {
                    segment: 0,
                    len: 0,
                    pos: i,
                    skip: 0,
                },
            )
        })
        .collect();
    let t = std::time::Instant::now();
    let map = DiskMap::build(&same);
    eprintln!(
        "1M changes of one block: {:?}, {} ranges",
        t.elapsed(),
        map.ranges()
    );
}
