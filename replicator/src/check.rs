//! `replicator check`: verifies every file of every group of a store, and names what is wrong
//! or missing. It reads the store, never writes it.
//!
//! Per group: `group.json`, `base.json`, `head.json` (their own checksums), the durable
//! checkpoint against the journal, every record and payload of every segment (checksums, seq
//! continuity) and each sealed segment's index, the base images against their chunk
//! checksums, and the kept chunk hashes of the latest state against the point they are of
//! (only while no replicator runs: it rewrites them).

use std::fmt::Display;
use std::path::Path;

use anyhow::Context;
use journal::segment::ScanStop;
use journal::store::{self, Access, GroupDir};
use journal::units::human_bytes;

/// What `check` found in one group.
#[derive(Debug, Default)]
struct Report {
    problems: usize,
}

impl Report {
    fn bad(&mut self, what: impl Display) {
        self.problems += 1;
        println!("BAD  {what}");
    }

    fn note(&self, what: impl Display) {
        println!("NOTE {what}");
    }
}

/// Verifies every group; returns the number of problems found.
pub fn check(store_dir: &Path) -> anyhow::Result<usize> {
    let groups = store::list_groups(store_dir)
        .with_context(|| format!("read store {}", store_dir.display()))?;
    let mut problems = 0;
    for path in store::list_broken_groups(store_dir)? {
        problems += 1;
        println!(
            "BAD  {}: holds a group's files but no group.json (its name and volumes are lost; \
             restore cannot offer it)",
            path.display()
        );
    }
    if groups.is_empty() && problems == 0 {
        println!("store {}: no groups", store_dir.display());
    }
    for dir in &groups {
        problems += check_group(dir);
    }
    Ok(problems)
}

fn check_group(dir: &GroupDir) -> usize {
    let mut r = Report::default();
    let name = dir
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let meta = match dir.meta() {
        Ok(m) => m,
        Err(e) => {
            r.bad(e);
            println!("BAD  group {name}: nothing else can be checked without its group.json");
            return r.problems;
        }
    };
    let base = dir.mark("base").map_err(|e| r.bad(e)).ok();
    let head = dir.mark("head").map_err(|e| r.bad(e)).ok();
    let fold = match dir.fold_mark() {
        Ok(f) => f,
        Err(e) => {
            r.bad(e);
            None
        }
    };
    if let Some(f) = fold {
        r.note(format!(
            "group {name}: a retention fold of seq {}..={} is unfinished; `replicator serve` \
             finishes it (points before seq {} are refused until then)",
            f.from + 1,
            f.to,
            f.to
        ));
    }
    if let Err(e) = dir.stream_owner() {
        r.bad(e);
    }
    let (records, bytes, last_seq) = check_journal(dir, &name, base.map_or(0, |b| b.seq), &mut r);
    match dir.checkpoint() {
        Ok(None) => r.bad(format!(
            "{}: missing: which records were acknowledged is unknown",
            dir.checkpoint_path().display()
        )),
        Err(e) => r.bad(e),
        Ok(Some(c)) => {
            let bytes = std::fs::read(dir.checkpoint_path()).unwrap_or_default();
            for slot in journal::checkpoint::Checkpoint::damaged_slots(&bytes) {
                r.bad(format!(
                    "{}: slot {slot} is damaged (the other one still names seq {})",
                    dir.checkpoint_path().display(),
                    c.last_seq
                ));
            }
            let seg = dir.segment_path(c.segment);
            let len = std::fs::metadata(&seg.path).map(|m| m.len()).ok();
            if len.is_none_or(|l| l < c.len) {
                r.bad(format!(
                    "{}: names {} durable bytes of {}, which holds {}",
                    dir.checkpoint_path().display(),
                    c.len,
                    seg.path.display(),
                    len.map_or("nothing (missing)".into(), |l| format!("{l} bytes"))
                ));
            } else if c.last_seq > last_seq {
                r.bad(format!(
                    "group {name}: seq {} was acknowledged durable but the journal reads only to seq {last_seq}",
                    c.last_seq
                ));
            }
        }
    }
    let replicator_running =
        store::read_json::<crate::serve::LiveStatus>(&dir.path.join("status.json"))
            .ok()
            .is_some_and(|l| Path::new(&format!("/proc/{}", l.pid)).exists());
    for (d, v) in meta.volumes.iter().enumerate() {
        if let Some(b) = base {
            // Chunks an unfinished fold is rewriting are checked once it is finished.
            let (expect, skip) = match fold {
                Some(f) => (
                    None,
                    changed_after(dir, f.from, Some(f.to), d as u16, v.size),
                ),
                None => (Some(b.seq), journal::sums::ChunkSet::new(v.size)),
            };
            check_image(dir, "base", &v.name, v.size, expect, &skip, &mut r);
        }
    }
    match (head, base) {
        (Some(_), _) if replicator_running => r.note(format!(
            "group {name}: its kept chunk hashes are in use by the running replicator; not compared"
        )),
        (Some(h), Some(b)) => check_hashes(dir, &meta, h, b, &mut r),
        _ => {}
    }
    println!(
        "{}  group {name}: {records} records, {} of journal checked",
        if r.problems == 0 { "OK " } else { "BAD" },
        human_bytes(bytes)
    );
    r.problems
}

/// Every record and payload of every segment, the seqs continuous, each sealed segment's
/// index equal to it. Returns (records, bytes, last seq read).
fn check_journal(dir: &GroupDir, name: &str, base_seq: u64, r: &mut Report) -> (u64, u64, u64) {
    let segments = match dir.segments() {
        Ok(s) => s,
        Err(e) => {
            r.bad(format!("{}: {e}", dir.journal_dir().display()));
            return (0, 0, base_seq);
        }
    };
    let (mut records, mut bytes, mut last) = (0u64, 0u64, base_seq);
    // History continues from the base: the first segment may not start after base + 1.
    let mut expected = Some(base_seq + 1);
    let count = segments.len();
    for (i, seg) in segments.iter().enumerate() {
        let mut bad_payload = None;
        let scan = match seg.scan(|rec, pos| {
            if bad_payload.is_none() && rec.header.kind.carries_data() {
                if let Err(e) = rec.payload() {
                    bad_payload = Some((pos, rec.header.seq, e));
                }
            }
        }) {
            Ok(s) => s,
            Err(e) => {
                r.bad(format!("group {name}: {e}"));
                continue;
            }
        };
        if let (Some(first), Some(exp)) = (scan.entries.first(), expected) {
            if first.seq > exp || (first.seq != exp && first.seq > base_seq + 1) {
                let gone = dir.segment_path(exp);
                let what = if gone.path.exists() {
                    String::new()
                } else {
                    format!("; {} is missing", gone.path.display())
                };
                r.bad(format!(
                    "group {name}: {} starts at seq {} but seq {exp} was expected (seqs {exp}..{} \
                     are missing{what})",
                    seg.path.display(),
                    first.seq,
                    first.seq - 1
                ));
            }
        }
        if let Some(e) = scan.entries.last() {
            expected = Some(e.seq + 1);
            last = last.max(e.seq);
        }
        records += scan.entries.len() as u64;
        bytes += scan.valid_len;
        if let Some((pos, seq, e)) = bad_payload {
            r.bad(format!(
                "group {name}: {} at byte {pos}: record seq {seq}: {e}",
                seg.path.display()
            ));
        }
        if let Some((pos, why)) = &scan.stop {
            let after = scan
                .entries
                .last()
                .map(|e| format!(" (after seq {})", e.seq))
                .unwrap_or_default();
            let hint = if matches!(why, ScanStop::Truncated) {
                "; a torn tail past the durable checkpoint is cut when `replicator serve` starts"
            } else {
                ""
            };
            r.bad(format!(
                "group {name}: {} at byte {pos}{after}: {why}{hint}",
                seg.path.display()
            ));
        }
        let sealed = i + 1 < count;
        if sealed && scan.entries.last().is_some_and(|e| e.seq <= base_seq) {
            r.note(format!(
                "{}: already folded into the base; the next retention pass removes it",
                seg.path.display()
            ));
            continue;
        }
        match std::fs::read(seg.index_path()) {
            Ok(idx) => {
                let len = std::fs::metadata(&seg.path).map_or(0, |m| m.len());
                match journal::segment::decode_index(&idx, len) {
                    Ok(entries) if entries == scan.entries => {}
                    Ok(_) => r.bad(format!(
                        "{}: index differs from the segment",
                        seg.index_path().display()
                    )),
                    Err(e) => r.bad(format!("{}: {e}", seg.index_path().display())),
                }
            }
            Err(_) if sealed => r.bad(format!(
                "{}: missing (a sealed segment has an index)",
                seg.index_path().display()
            )),
            Err(_) => {}
        }
    }
    // An index whose segment is gone.
    if let Ok(entries) = std::fs::read_dir(dir.journal_dir()) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "idx") && !p.with_extension("seg").exists() {
                r.bad(format!(
                    "{}: its segment {} is missing",
                    p.display(),
                    p.with_extension("seg").display()
                ));
            }
        }
    }
    (records, bytes, last)
}

/// The chunks of disk `disk` that records after `after` (up to `until`) change.
fn changed_after(
    dir: &GroupDir,
    after: u64,
    until: Option<u64>,
    disk: u16,
    size: u64,
) -> journal::sums::ChunkSet {
    let mut set = journal::sums::ChunkSet::new(size);
    for seg in dir.segments().unwrap_or_default() {
        let Ok((entries, _)) = seg.load_index() else {
            continue;
        };
        for e in entries.iter().filter(|e| {
            e.seq > after
                && until.is_none_or(|u| e.seq <= u)
                && e.disk == disk
                && e.kind.changes_data()
        }) {
            set.mark(e.offset, e.length);
        }
    }
    set
}

/// The kept chunk hashes (`head/<volume>.sums`, of the seq `head.json` names) against the
/// point they are of: a chunk no record after the base changed must hash as the base's
/// checksums say, the others as the point's bytes do. Stale chunks (changed since their hash
/// was made; the replicator hashes them again) are not compared. Hashes older than the base
/// are only noted: the replicator does not use them.
fn check_hashes(
    dir: &GroupDir,
    meta: &journal::store::GroupMeta,
    head: journal::store::SeqMark,
    base: journal::store::SeqMark,
    r: &mut Report,
) {
    let mut kept = Vec::new();
    for v in &meta.volumes {
        match dir.sums("head", &v.name) {
            // Hashes are written just before head.json: a crash between leaves them newer.
            Ok(s) if s.seq < head.seq => r.bad(format!(
                "{}: hashes of seq {} but head.json names seq {}",
                dir.path
                    .join("head")
                    .join(format!("{}.sums", v.name))
                    .display(),
                s.seq,
                head.seq
            )),
            Ok(s) if s.size != v.size => r.bad(format!(
                "{}: hashes of {} bytes, but the volume has {}",
                dir.path
                    .join("head")
                    .join(format!("{}.sums", v.name))
                    .display(),
                s.size,
                v.size
            )),
            Ok(s) => kept.push(s),
            Err(e) => r.bad(e),
        }
    }
    if kept.len() != meta.volumes.len() {
        return;
    }
    if head.seq < base.seq {
        return r.note(format!(
            "{}: the kept chunk hashes (seq {}) are older than the base (seq {}); the replicator \
             hashes from the base's checksums instead",
            dir.path.join("head.json").display(),
            head.seq,
            base.seq
        ));
    }
    let mut point = None;
    let mut buf = Vec::new();
    for (d, (v, sums)) in meta.volumes.iter().zip(&kept).enumerate() {
        let base_sums = dir.sums("base", &v.name).ok();
        let changed = changed_after(dir, base.seq, Some(sums.seq), d as u16, v.size);
        let stale = sums.stale();
        let mut bad = Vec::new();
        for c in 0..journal::sums::chunks(v.size) {
            if stale.contains(c) {
                continue;
            }
            let expected = if changed.contains(c) {
                if point.is_none() {
                    match crate::hashes::Point::open(dir, meta, sums.seq, None) {
                        Ok(p) => point = Some(p),
                        Err(e) => {
                            return r.bad(format!(
                                "group {}: the point of seq {} that the kept hashes are of does \
                                 not read: {e}",
                                meta.name, sums.seq
                            ))
                        }
                    }
                }
                match point.as_mut().map(|p| p.hash(d, c, v.size, &mut buf)) {
                    Some(Ok(h)) => h,
                    // The record itself is reported with the journal.
                    _ => continue,
                }
            } else {
                match &base_sums {
                    Some(b) => b.get(c),
                    None => continue,
                }
            };
            if expected != sums.get(c) {
                bad.push(c);
            }
        }
        if let Some(&first) = bad.first() {
            let range = journal::sums::chunk_range(first, v.size);
            r.bad(format!(
                "{}: {} kept chunk hashes differ from the point of seq {} (the first at bytes \
                 {}..{}); remove head.json and the replicator hashes from the base again",
                dir.path
                    .join("head")
                    .join(format!("{}.sums", v.name))
                    .display(),
                bad.len(),
                sums.seq,
                range.start,
                range.end
            ));
        }
    }
}

/// An image's size, its checksum file, and each chunk (but those in `skip`) against it.
fn check_image(
    dir: &GroupDir,
    which: &str,
    volume: &str,
    size: u64,
    seq: Option<u64>,
    skip: &journal::sums::ChunkSet,
    r: &mut Report,
) {
    let file = match dir.open_image(which, volume, Access::Read) {
        Ok(f) => f,
        Err(e) => return r.bad(e),
    };
    let path = dir.image(which, volume);
    match file.metadata() {
        Ok(m) if m.len() == size => {}
        Ok(m) => {
            return r.bad(format!(
                "{}: {} bytes, expected {size}",
                path.display(),
                m.len()
            ))
        }
        Err(e) => return r.bad(format!("{}: {e}", path.display())),
    }
    let sums = match dir.sums(which, volume) {
        Ok(s) => s,
        Err(e) => return r.bad(e),
    };
    // Head checksums are written just before head.json: a crash between leaves them newer.
    if let Some(seq) = seq.filter(|&s| s != sums.seq && !(which == "head" && sums.seq > s)) {
        r.bad(format!(
            "{}: checksums are of seq {} but {which}.json names seq {seq}",
            path.display(),
            sums.seq
        ));
    }
    if which == "base" && sums.has_stale() {
        r.bad(format!(
            "{}: base checksums list stale chunks (only the kept hashes of the latest state may)",
            path.display()
        ));
    }
    match journal::read::verify_image(&file, &sums, size, skip) {
        Ok(bad) if bad.is_empty() => {}
        Ok(bad) => {
            let first = journal::sums::chunk_range(bad[0], size);
            r.bad(format!(
                "{}: {} chunks do not match their checksums (the first at bytes {}..{})",
                path.display(),
                bad.len(),
                first.start,
                first.end
            ));
        }
        Err(e) => r.bad(format!("{}: {e}", path.display())),
    }
}
