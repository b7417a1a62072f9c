//! `replicator repair`: the operator's answer to a damaged journal. It cuts the journal at its
//! first record that does not read back, keeps every byte it cuts in `quarantine/`, and resets
//! the durable checkpoint and the kept chunk hashes to what is left. Nothing else ever cuts records
//! that were acknowledged.
//!
//! After a repair the proxy finds the replicator behind what it acknowledged and compares every
//! chunk by hash, so the latest state is whole again; the history after the cut is lost (it is
//! in quarantine for forensics).

use std::fs;
use std::path::Path;

use anyhow::{bail, Context};
use journal::checkpoint::{self, Checkpoint};
use journal::segment;
use journal::store::{self, GroupDir, SeqMark};

/// Where the journal stops being readable.
#[derive(Debug)]
struct Cut {
    segment: store::SegmentPath,
    pos: u64,
    /// The last good record before the cut, and its time.
    last_seq: u64,
    last_time_ns: u64,
    why: String,
}

/// Finds the first bad record of the group's journal (sealed segments included).
fn find_cut(dir: &GroupDir, base: SeqMark) -> anyhow::Result<Option<Cut>> {
    let mut last = (base.seq, base.time_ns);
    for seg in dir.segments()? {
        let bytes = fs::read(&seg.path).with_context(|| format!("read {}", seg.path.display()))?;
        // Every record's crc, and every data record's payload.
        let mut payload_bad = None;
        let scan = segment::scan(&bytes, |r, pos| {
            if payload_bad.is_none() && r.header.kind.carries_data() {
                if let Err(e) = r.payload() {
                    payload_bad = Some((pos, r.header.seq, e.to_string()));
                }
            }
        });
        let scan = match scan {
            Ok(s) => s,
            Err(e) => {
                return Ok(Some(Cut {
                    segment: seg,
                    pos: 0,
                    last_seq: last.0,
                    last_time_ns: last.1,
                    why: format!("segment header: {e}"),
                }))
            }
        };
        // The first place that fails (a bad payload comes before the scan's stop).
        let stop = payload_bad.or_else(|| {
            scan.stop.as_ref().map(|(pos, why)| {
                let next = scan.entries.last().map_or(seg.first_seq, |e| e.seq + 1);
                (*pos, next, why.to_string())
            })
        });
        if let Some((pos, seq, why)) = stop {
            let before = scan.entries.iter().rev().find(|e| e.seq < seq);
            if let Some(e) = before {
                last = (e.seq, e.time_ns);
            }
            return Ok(Some(Cut {
                segment: seg,
                pos,
                last_seq: last.0,
                last_time_ns: last.1,
                why,
            }));
        }
        if let Some(e) = scan.entries.last() {
            last = (e.seq, e.time_ns);
        }
    }
    Ok(None)
}

pub fn repair(store_dir: &Path, group: &str, dry_run: bool) -> anyhow::Result<bool> {
    let dir = GroupDir::new(store_dir, group);
    let meta = dir.meta().with_context(|| format!("group {group}"))?;
    if let Ok(live) = store::read_json::<crate::serve::LiveStatus>(&dir.path.join("status.json")) {
        if Path::new(&format!("/proc/{}", live.pid)).exists() && live.pid != std::process::id() {
            bail!(
                "a replicator (pid {}) may be serving this store: stop it before repairing",
                live.pid
            );
        }
    }
    if dir.fold_mark()?.is_some() {
        bail!("a retention fold was interrupted: start and stop `replicator serve` once to finish it, then repair");
    }
    let base = dir.mark("base")?;
    let Some(cut) = find_cut(&dir, base)? else {
        println!("OK   group {group}: every record reads back; nothing to repair");
        return Ok(true);
    };
    let later: Vec<_> = dir
        .segments()?
        .into_iter()
        .filter(|s| s.first_seq > cut.segment.first_seq)
        .collect();
    let seg_len = fs::metadata(&cut.segment.path)?.len();
    println!(
        "group {group}: the journal is unreadable from {} at byte {} (after seq {}): {}",
        cut.segment.path.display(),
        cut.pos,
        cut.last_seq,
        cut.why
    );
    println!(
        "  cutting {} bytes of that segment{}; history will end at seq {}",
        seg_len - cut.pos,
        if later.is_empty() {
            String::new()
        } else {
            format!(" and {} later segments", later.len())
        },
        cut.last_seq
    );
    if dry_run {
        println!("  (dry run: nothing changed)");
        return Ok(false);
    }
    let quarantine = dir.path.join("quarantine");
    fs::create_dir_all(&quarantine)?;
    let stamp = journal::now_ns();
    // The cut bytes, kept; then the later segments, whole.
    let name = cut
        .segment
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tail = {
        use std::os::unix::fs::FileExt;
        let f = fs::File::open(&cut.segment.path)?;
        let mut buf = vec![0u8; (seg_len - cut.pos) as usize];
        f.read_exact_at(&mut buf, cut.pos)?;
        buf
    };
    store::write_file_atomic(
        &quarantine.join(format!("{name}.from-byte-{}.{stamp}", cut.pos)),
        &tail,
    )?;
    for s in &later {
        for p in [s.path.clone(), s.index_path()] {
            if p.exists() {
                let to = quarantine.join(format!(
                    "{}.{stamp}",
                    p.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ));
                fs::rename(&p, &to)?;
            }
        }
    }
    store::sync_dir(&quarantine)?;
    // The damaged segment becomes the newest: cut, unsealed.
    let keep = cut.pos.max(segment::SEGMENT_HEADER_LEN as u64);
    if cut.pos < segment::SEGMENT_HEADER_LEN as u64 {
        fs::remove_file(&cut.segment.path)?;
    } else {
        let f = fs::OpenOptions::new().write(true).open(&cut.segment.path)?;
        f.set_len(keep)?;
        f.sync_all()?;
    }
    let _ = fs::remove_file(cut.segment.index_path());
    store::sync_dir(&dir.journal_dir())?;
    // The durable position is what is left.
    let ckpt = Checkpoint {
        counter: dir.checkpoint().ok().flatten().map_or(0, |c| c.counter + 1),
        segment: cut.segment.first_seq,
        len: keep,
        last_seq: cut.last_seq,
        last_time_ns: cut.last_time_ns,
    };
    let mut bytes = vec![0u8; checkpoint::FILE_LEN];
    let at = ckpt.slot_offset() as usize;
    bytes[at..at + checkpoint::SLOT_LEN].copy_from_slice(&ckpt.encode());
    store::write_file_atomic(&dir.checkpoint_path(), &bytes)?;
    // The kept hashes may be of records past the cut: start them again from the base's.
    crate::hashes::reset(&dir, &meta, base)?;
    println!(
        "  done: kept in {}; the proxy compares every chunk by hash when it reconnects",
        quarantine.display()
    );
    Ok(true)
}
