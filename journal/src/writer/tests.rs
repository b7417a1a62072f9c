use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

use super::*;
use crate::record::{Encoded, Kind};
use crate::store::{GroupMeta, FORMAT};
use crate::wire::Volume;

fn group(tmp: &tempfile::TempDir) -> GroupDir {
    let g = GroupDir::new(tmp.path(), "g");
    g.create(&GroupMeta {
        format: FORMAT,
        name: "g".into(),
        volumes: vec![Volume {
            name: "root".into(),
            size: 1 << 20,
        }],
        created_ns: 1,
    })
    .unwrap();
    g
}

fn sealed(seqs: std::ops::RangeInclusive<u64>) -> Vec<Vec<u8>> {
    seqs.map(|s| Encoded::data(Kind::Write, 0, s * 512, &[s as u8; 512], true).seal(s, s))
        .collect()
}

/// Appends the records in one write, not synced (one commit's worth, or a crash before its sync).
fn append(w: &mut JournalWriter, seqs: std::ops::RangeInclusive<u64>) {
    let bytes = sealed(seqs);
    let refs: Vec<_> = bytes
        .iter()
        .map(|b| crate::record::parse(b).unwrap().unwrap())
        .collect();
    w.append(&refs).unwrap();
}

/// Appends and syncs each record on its own (one commit each), as acknowledged records are.
fn commit(w: &mut JournalWriter, seqs: std::ops::RangeInclusive<u64>) {
    for bytes in sealed(seqs) {
        let r = crate::record::parse(&bytes).unwrap().unwrap();
        w.append(&[r]).unwrap();
        w.sync().unwrap();
    }
}

fn open(g: &GroupDir, limit: u64) -> Result<(JournalWriter, OpenReport), OpenError> {
    JournalWriter::open(g, 0, limit)
}

#[test]
fn appends_rotate_and_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let g = group(&tmp);
    let (mut w, report) = open(&g, 1024).unwrap();
    assert_eq!(report.last_seq, 0);
    commit(&mut w, 1..=20);
    assert_eq!(w.durable_seq(), 20);
    let segs = g.segments().unwrap();
    assert!(segs.len() >= 2, "rotated at 1 KiB: {segs:?}");
    let (entries, scan) = segs[0].load_index().unwrap();
    assert!(scan.is_none(), "sealed segments have valid indexes");
    assert_eq!(entries[0].seq, 1);
    drop(w);
    let (w, report) = open(&g, 1024).unwrap();
    assert_eq!((report.last_seq, report.durable_seq), (20, 20));
    assert!(report.cut.is_none());
    assert_eq!(w.last_seq(), 20);
}

#[test]
fn a_bit_flip_before_the_durable_position_is_damage_and_nothing_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let g = group(&tmp);
    let (mut w, _) = open(&g, 1 << 20).unwrap();
    commit(&mut w, 1..=10);
    drop(w);
    let seg = g.segments().unwrap().pop().unwrap();
    let (entries, _) = seg.load_index().unwrap();
    let third = entries[2];
    let len = fs::metadata(&seg.path).unwrap().len();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg.path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, third.pos + 57).unwrap();
    f.write_all_at(&[b[0] ^ 0x08], third.pos + 57).unwrap();
    let err = open(&g, 1 << 20).unwrap_err();
    let OpenError::Damaged(d) = err else {
        panic!("expected damage, got {err}");
    };
    assert_eq!((d.seq, d.pos, d.durable_seq), (3, third.pos, 10));
    assert_eq!(d.path, seg.path);
    assert!(d.to_string().contains("nothing was cut"), "{d}");
    assert_eq!(
        fs::metadata(&seg.path).unwrap().len(),
        len,
        "no byte was cut"
    );
    // It stays refused on every open until repaired.
    assert!(matches!(open(&g, 1 << 20), Err(OpenError::Damaged(_))));
}

#[test]
fn a_torn_tail_past_the_durable_position_is_cut_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let g = group(&tmp);
    let (mut w, _) = open(&g, 1 << 20).unwrap();
    commit(&mut w, 1..=5);
    // Records 6..8 written but never synced, the last one cut short (a crash mid-commit).
    append(&mut w, 6..=8);
    let seg = w.current_segment().clone();
    // The records' end (a direct write pads the file to its block's end with zeros).
    let len = w.current_len();
    drop(w);
    OpenOptions::new()
        .write(true)
        .open(&seg.path)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let (w, report) = open(&g, 1 << 20).unwrap();
    assert_eq!((report.last_seq, report.durable_seq), (7, 5));
    let cut = report.cut.unwrap();
    assert_eq!(cut.path, seg.path);
    assert!(cut.bytes > 0 && cut.why.contains("torn"), "{cut:?}");
    assert_eq!(w.last_seq(), 7);
    // The records kept past the old checkpoint are durable now.
    assert_eq!(w.durable_seq(), 7);
}

#[test]
fn garbage_past_the_durable_position_is_cut_even_with_valid_records_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let g = group(&tmp);
    let (mut w, _) = open(&g, 1 << 20).unwrap();
    commit(&mut w, 1..=3);
    let seg = w.current_segment().clone();
    let end = w.current_len();
    drop(w);
    // Pages of an unsynced commit written back out of order: zeroes, then a valid record.
    let f = OpenOptions::new().write(true).open(&seg.path).unwrap();
    f.write_all_at(&[0u8; 600], end).unwrap();
    f.write_all_at(&sealed(5..=5)[0], end + 600).unwrap();
    let (_, report) = open(&g, 1 << 20).unwrap();
    assert_eq!(report.last_seq, 3);
    assert_eq!(report.cut.unwrap().at, end);
}

#[test]
fn a_segment_created_by_rotation_but_torn_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let g = group(&tmp);
    let (mut w, _) = open(&g, 1024).unwrap();
    commit(&mut w, 1..=4);
    drop(w);
    // A crash while the next segment's header was written: shorter than a header.
    let next = g.segment_path(5);
    let _ = fs::remove_file(&next.path);
    fs::write(&next.path, b"CDPJ").unwrap();
    let (mut w, report) = open(&g, 1024).unwrap();
    assert_eq!(report.last_seq, 4);
    assert!(report.cut.is_some());
    commit(&mut w, 5..=6);
    assert_eq!(w.last_seq(), 6);
}

#[test]
fn a_journal_without_its_checkpoint_is_damage_not_a_tail_to_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let g = group(&tmp);
    let (mut w, _) = open(&g, 1 << 20).unwrap();
    commit(&mut w, 1..=4);
    let seg = w.current_segment().clone();
    drop(w);
    fs::remove_file(g.checkpoint_path()).unwrap();
    let len = fs::metadata(&seg.path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&seg.path)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let err = open(&g, 1 << 20).unwrap_err().to_string();
    assert!(err.contains("checkpoint is missing"), "{err}");
    assert_eq!(
        fs::metadata(&seg.path).unwrap().len(),
        len - 3,
        "nothing cut"
    );
}

#[test]
fn a_segment_that_cannot_be_created_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let g = group(&tmp);
    let (mut w, _) = open(&g, 1 << 20).unwrap();
    commit(&mut w, 1..=3);
    // The next segment's name is taken by a directory: creating it fails after the temporary
    // file was written; neither the temporary file nor a segment may remain.
    fs::create_dir(g.segment_path(4).path).unwrap();
    assert!(w.rotate().is_err());
    fs::remove_dir(g.segment_path(4).path).unwrap();
    let names: Vec<_> = fs::read_dir(g.journal_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    assert_eq!(g.segments().unwrap().len(), 1, "{names:?}");
    // The writer goes on in its segment, and seals it later.
    commit(&mut w, 4..=5);
    w.rotate().unwrap();
    assert_eq!(g.segments().unwrap().len(), 2);
}

#[test]
fn an_unreadable_checkpoint_refuses_to_guess() {
    let tmp = tempfile::tempdir().unwrap();
    let g = group(&tmp);
    let (mut w, _) = open(&g, 1 << 20).unwrap();
    commit(&mut w, 1..=2);
    drop(w);
    fs::write(
        g.checkpoint_path(),
        vec![0xA5u8; crate::checkpoint::FILE_LEN],
    )
    .unwrap();
    let err = open(&g, 1 << 20).unwrap_err().to_string();
    assert!(err.contains("checkpoint is unreadable"), "{err}");
}

#[test]
fn appends_must_continue_the_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let g = group(&tmp);
    let (mut w, _) = open(&g, 1 << 20).unwrap();
    let gap = sealed(2..=2);
    let r = crate::record::parse(&gap[0]).unwrap().unwrap();
    assert!(w.append(&[r]).is_err());
    assert_eq!(
        (w.last_seq(), w.current_len()),
        (0, SEGMENT_HEADER_LEN as u64)
    );
}

/// Sealed segments copied in from elsewhere (a group rebuilt from a bucket), then
/// `begin_after`: the writer opens after the last of them and the next record is the one after.
#[test]
fn begin_after_copied_segments() {
    let from = tempfile::tempdir().unwrap();
    let src = group(&from);
    let (mut w, _) = open(&src, 1024).unwrap();
    commit(&mut w, 1..=20);
    drop(w);
    let mut sealed: Vec<_> = src.segments().unwrap();
    sealed.pop(); // the open one
    let last = sealed
        .last()
        .unwrap()
        .load_index()
        .unwrap()
        .0
        .last()
        .unwrap()
        .seq;

    let to = tempfile::tempdir().unwrap();
    let g = group(&to);
    for s in &sealed {
        let dst = g.segment_path(s.first_seq);
        fs::copy(&s.path, &dst.path).unwrap();
        fs::copy(s.index_path(), dst.index_path()).unwrap();
    }
    begin_after(&g, last, last).unwrap();
    assert!(begin_after(&g, last, last).is_err(), "only once");
    let (mut w, report) = open(&g, 1024).unwrap();
    assert_eq!((report.last_seq, report.durable_seq), (last, last));
    assert_eq!(report.last_time_ns, last);
    assert!(report.cut.is_none());
    for s in &sealed {
        assert!(
            s.index_path().is_file(),
            "sealed segments keep their indexes"
        );
    }
    commit(&mut w, last + 1..=last + 3);
    drop(w);
    let (_, report) = open(&g, 1024).unwrap();
    assert_eq!(report.last_seq, last + 3);
}

/// Small commits keep zeros written ahead of the end, so the next ones overwrite blocks instead
/// of growing the file. Reopening reads the zeros as the segment's clean end, a torn commit
/// among them is still cut, large commits write none, and sealing cuts them off.
#[test]
fn zeros_ahead_of_small_commits_read_as_the_end_and_are_cut_at_sealing() {
    let tmp = tempfile::tempdir().unwrap();
    let g = group(&tmp);
    let limit = 3 << 20;
    let (mut w, _) = open(&g, limit).unwrap();
    commit(&mut w, 1..=3);
    if !w.out.is_direct() {
        return; // buffered writes (tmpfs): no zeros are written ahead
    }
    let seg = w.current_segment().clone();
    let size = |p: &std::path::Path| fs::metadata(p).unwrap().len();
    assert!(w.zero_ahead());
    assert!(!w.zero_ahead(), "a piece ahead is enough");
    let grown = size(&seg.path);
    assert!(grown >= w.current_len() + ZEROS_PIECE, "{grown}");
    commit(&mut w, 4..=10);
    assert_eq!(size(&seg.path), grown, "the commits overwrote the zeros");
    drop(w);

    let (mut w, report) = open(&g, limit).unwrap();
    assert_eq!((report.last_seq, report.durable_seq), (10, 10));
    assert!(report.cut.is_none(), "zeros to the end are the clean end");
    // A commit torn by a crash: two records landed, and a block further on.
    append(&mut w, 11..=12);
    let end = w.current_len();
    drop(w);
    let f = OpenOptions::new().write(true).open(&seg.path).unwrap();
    f.write_all_at(&sealed(14..=14)[0], end + 8192).unwrap();
    let (mut w, report) = open(&g, limit).unwrap();
    assert_eq!((report.last_seq, report.durable_seq), (12, 10));
    assert_eq!(report.cut.unwrap().at, end);
    assert_eq!(size(&seg.path), end, "the cut takes the zeros with it");

    // A large commit (a fast stream) writes no zeros.
    let big = Encoded::data(
        Kind::Write,
        0,
        0,
        &crate::testdata::pattern(1, 100 << 10),
        true,
    )
    .seal(13, 13);
    w.append(&[crate::record::parse(&big).unwrap().unwrap()])
        .unwrap();
    w.sync().unwrap();
    assert!(!w.zero_ahead());

    // Near the limit in one commit, then small commits until the segment is sealed: never
    // zeros past its limit, none left in it once sealed.
    let fill = (limit - 64 * 1024 - w.current_len()) / sealed(14..=14)[0].len() as u64;
    append(&mut w, 14..=13 + fill);
    w.sync().unwrap();
    let mut seq = 14 + fill;
    while g.segments().unwrap().len() == 1 {
        commit(&mut w, seq..=seq);
        w.zero_ahead();
        if g.segments().unwrap().len() == 1 {
            assert!(
                size(&seg.path) <= limit.next_multiple_of(4096),
                "zeros past the limit"
            );
        }
        seq += 1;
    }
    let (entries, _) = g.segments().unwrap()[0].load_index().unwrap();
    let last = entries.last().unwrap();
    let bytes = fs::read(&seg.path).unwrap();
    let r = crate::record::parse(&bytes[last.pos as usize..])
        .unwrap()
        .unwrap();
    assert_eq!(bytes.len() as u64, last.pos + r.header.record_len() as u64);
}
