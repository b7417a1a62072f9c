//! Retention: history older than `--retention` is folded into the base images, one sealed
//! segment at a time, and `--max-store-size` folds more when the store is too large.
//!
//! A fold is crash-safe without a copy: write the fold mark (`fold.json`: which records go into
//! the base), apply the segment's records to the base images, fsync them, move `base.json` to
//! the segment's last seq (atomic rename), remove the mark, then delete the segment. A crash
//! before `base.json` moved re-applies the same records in the same order when the replicator
//! starts, which gives the same bytes; until then readers see the mark and refuse the points
//! it covers (the base may already hold some of its records). A crash after it leaves a segment
//! whose records are all at or below the base seq, which readers skip and the next pass deletes.

use std::fs::{self, File};
use std::time::Duration;

use anyhow::Context;
use journal::read::{self, Images};
use journal::store::{self, Access, FoldMark, GroupDir, GroupMeta, SeqMark};
use journal::sums::ChunkSet;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

#[derive(Debug, Clone, Default)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_size: Option<u64>,
    pub interval: Duration,
}

impl Retention {
    pub fn enabled(&self) -> bool {
        self.max_age.is_some() || self.max_size.is_some()
    }
}

/// What retention last did, for `replicator status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RetentionState {
    pub retention_secs: Option<u64>,
    pub max_store_size: Option<u64>,
    /// The size limit forced history below the retention target.
    pub history_below_target: bool,
    pub last_fold_ns: u64,
    pub folded_segments: u64,
}

pub fn run(dir: GroupDir, meta: GroupMeta, policy: Retention) {
    let mut state: RetentionState =
        store::read_json(&dir.path.join("retention.json")).unwrap_or_default();
    state.retention_secs = policy.max_age.map(|d| d.as_secs());
    state.max_store_size = policy.max_size;
    loop {
        std::thread::sleep(policy.interval);
        if let Err(e) = pass(&dir, &meta, &policy, &mut state) {
            warn!(group = %meta.name, "retention pass failed: {e:#}");
        }
    }
}

/// One retention pass: fold every sealed segment that is entirely older than the window, then
/// more while the store is over its size limit.
pub fn pass(
    dir: &GroupDir,
    meta: &GroupMeta,
    policy: &Retention,
    state: &mut RetentionState,
) -> anyhow::Result<()> {
    let cutoff = policy
        .max_age
        .map(|age| journal::now_ns().saturating_sub(age.as_nanos() as u64));
    let segments = dir.segments()?;
    // The newest segment is being written; only sealed ones are folded, and never the one the
    // durable checkpoint names (the writer's, whatever else the directory holds).
    let writing = dir.checkpoint()?.map_or(u64::MAX, |c| c.segment);
    let sealed: Vec<_> = segments[..segments.len().saturating_sub(1)]
        .iter()
        .filter(|s| s.first_seq < writing)
        .cloned()
        .collect();
    let mut over_size = policy
        .max_size
        .map(|max| dir.disk_usage().map(|u| u > max))
        .transpose()?
        .unwrap_or(false);
    let mut below_target = false;
    // Restore exports pin the point they serve: nothing newer is folded under them.
    let pinned = dir.min_pinned();
    for seg in &sealed {
        let (entries, _) = seg.load_index()?;
        let Some(last) = entries.last() else {
            fs::remove_file(&seg.path)?;
            continue;
        };
        // Nor beyond a pin.
        if pinned.is_some_and(|p| last.seq > p) {
            break;
        }
        let old_enough = cutoff.is_some_and(|c| last.time_ns < c);
        if !old_enough && !over_size {
            break;
        }
        if !old_enough {
            below_target = true;
        }
        if !fold(dir, meta, seg, &entries)? {
            break;
        }
        state.folded_segments += 1;
        state.last_fold_ns = journal::now_ns();
        if let Some(max) = policy.max_size {
            over_size = dir.disk_usage()? > max;
        }
    }
    if below_target && !state.history_below_target {
        warn!(
            group = %meta.name,
            "the store is over --max-store-size: history was shortened below the retention target; \
             give the store more space or lower --retention"
        );
    }
    if below_target || (state.history_below_target && !over_size && cutoff.is_some()) {
        state.history_below_target = below_target;
    }
    store::write_json_atomic(&dir.path.join("retention.json"), state)?;
    Ok(())
}

/// Folds one sealed segment into the base; false when a reader pinned a point inside it
/// meanwhile (then nothing is changed).
fn fold(
    dir: &GroupDir,
    meta: &GroupMeta,
    seg: &store::SegmentPath,
    entries: &[journal::segment::IndexEntry],
) -> anyhow::Result<bool> {
    let base = dir.mark("base")?;
    let Some(last) = entries.last() else {
        return Ok(true);
    };
    if last.seq > base.seq {
        let mark = FoldMark {
            segment: seg.first_seq,
            from: base.seq,
            to: last.seq,
            to_time_ns: last.time_ns,
        };
        // The mark first, then the pins: a reader pins first, then looks for a mark, so either
        // it sees the mark (and keeps off the points it covers) or the fold sees its pin.
        dir.set_fold_mark(Some(&mark))?;
        if dir.min_pinned().is_some_and(|p| p < last.seq) {
            dir.set_fold_mark(None)?;
            return Ok(false);
        }
        apply_fold(dir, meta, seg, entries, &mark)?;
    }
    // The index first: a crash between leaves a folded segment without one, which the next
    // pass removes (an index without its segment would be left for ever).
    let _ = fs::remove_file(seg.index_path());
    fs::remove_file(&seg.path)?;
    store::sync_dir(&dir.journal_dir())?;
    info!(
        group = %meta.name,
        "folded {} into the base (history now starts after seq {})",
        seg.path.display(),
        last.seq
    );
    Ok(true)
}

/// Applies the records of `mark` to the base images, syncs them, moves `base.json`, and
/// removes the mark. Applying the same records again in order gives the same bytes, so a fold
/// interrupted anywhere is finished by running this again.
fn apply_fold(
    dir: &GroupDir,
    meta: &GroupMeta,
    seg: &store::SegmentPath,
    entries: &[journal::segment::IndexEntry],
    mark: &FoldMark,
) -> anyhow::Result<()> {
    let images: Vec<File> = meta
        .volumes
        .iter()
        .map(|v| {
            dir.open_image("base", &v.name, Access::ReadWrite)
                .context("open a base image")
        })
        .collect::<anyhow::Result<_>>()?;
    let segment = [(seg.clone(), entries.to_vec())];
    let mut targets = Images::new(&images).context("open the base images")?;
    read::replay(&segment, mark.from + 1, mark.to, &mut targets)
        .with_context(|| format!("fold {}", seg.path.display()))?;
    for image in &images {
        image.sync_data()?;
    }
    // The base's checksums, for the chunks the fold changed, before base.json names the seq.
    let mut touched: Vec<ChunkSet> = meta.volumes.iter().map(|v| ChunkSet::new(v.size)).collect();
    for e in entries
        .iter()
        .filter(|e| e.seq > mark.from && e.seq <= mark.to && e.kind.changes_data())
    {
        if let Some(t) = touched.get_mut(usize::from(e.disk)) {
            t.mark(e.offset, e.length);
        }
    }
    let mut buf = Vec::new();
    for ((v, image), t) in meta.volumes.iter().zip(&images).zip(&mut touched) {
        let mut sums = dir
            .sums("base", &v.name)
            .context("read the base image's checksums")?;
        for c in t.take() {
            sums.set(c, read::hash_chunk(image, c, v.size, &mut buf)?);
        }
        sums.seq = mark.to;
        dir.set_sums("base", &v.name, &sums)
            .context("write the base image's checksums")?;
    }
    dir.set_mark(
        "base",
        SeqMark {
            seq: mark.to,
            time_ns: mark.to_time_ns,
        },
    )?;
    dir.set_fold_mark(None)?;
    Ok(())
}

/// Finishes the folds a crash interrupted, in every group of the store.
pub fn finish_interrupted_folds(store_dir: &std::path::Path) {
    let Ok(groups) = store::list_groups(store_dir) else {
        return;
    };
    for dir in groups {
        let finished = dir
            .meta()
            .map_err(anyhow::Error::from)
            .and_then(|meta| finish_interrupted_fold(&dir, &meta));
        if let Err(e) = finished {
            warn!(
                "{}: an interrupted fold could not be finished: {e:#}",
                dir.path.display()
            );
        }
    }
}

/// Finishes a fold a crash interrupted (the replicator does this before it serves the group).
pub fn finish_interrupted_fold(dir: &GroupDir, meta: &GroupMeta) -> anyhow::Result<()> {
    let Some(mark) = dir.fold_mark()? else {
        return Ok(());
    };
    if dir.mark("base")?.seq < mark.to {
        let seg = dir.segment_path(mark.segment);
        let (entries, _) = seg
            .load_index()
            .with_context(|| format!("read {} to finish its fold", seg.path.display()))?;
        info!(
            group = %meta.name,
            "finishing the fold of {} into the base (seq {}..={}) that a crash interrupted",
            seg.path.display(),
            mark.from + 1,
            mark.to
        );
        apply_fold(dir, meta, &seg, &entries, &mark)?;
    } else {
        dir.set_fold_mark(None)?;
    }
    Ok(())
}
