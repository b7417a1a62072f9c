//! Retention: history older than `--retention` is folded into the base images, one sealed
//! segment at a time, and `--max-store-size` folds more when the store is too large.
//!
//! A fold is crash-safe without a copy: apply the segment's records to the base images, fsync
//! them, then move `base.json` to the segment's last seq (atomic rename), then delete the
//! segment. A crash before the rename re-applies the same records in the same order next time,
//! which gives the same bytes; a crash after it leaves a segment whose records are all at or
//! below the base seq, which readers skip and the next pass deletes.

use std::fs::{self, File, OpenOptions};
use std::time::Duration;

use anyhow::Context;
use journal::record::Kind;
use journal::store::{self, GroupDir, GroupMeta, SeqMark};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileExt;
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

pub fn run(
    dir: GroupDir,
    meta: GroupMeta,
    policy: Retention,
    head: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let mut state: RetentionState =
        store::read_json(&dir.path.join("retention.json")).unwrap_or_default();
    state.retention_secs = policy.max_age.map(|d| d.as_secs());
    state.max_store_size = policy.max_size;
    loop {
        std::thread::sleep(policy.interval);
        let head_seq = head.load(std::sync::atomic::Ordering::Acquire);
        if let Err(e) = pass(&dir, &meta, &policy, &mut state, head_seq) {
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
    head_seq: u64,
) -> anyhow::Result<()> {
    let cutoff = policy
        .max_age
        .map(|age| journal::now_ns().saturating_sub(age.as_nanos() as u64));
    let segments = dir.segments()?;
    // The newest segment is being written; only sealed ones are folded.
    let sealed = &segments[..segments.len().saturating_sub(1)];
    let mut over_size = policy
        .max_size
        .map(|max| dir.disk_usage().map(|u| u > max))
        .transpose()?
        .unwrap_or(false);
    let mut below_target = false;
    // Restore exports pin the point they serve: nothing newer is folded under them.
    let pinned = dir.min_pinned();
    for seg in sealed {
        let (entries, _) = seg.load_index()?;
        let Some(last) = entries.last() else {
            fs::remove_file(&seg.path)?;
            continue;
        };
        // Nor beyond a pin, nor beyond what the head images have read (they read the journal).
        if pinned.is_some_and(|p| last.seq > p) || last.seq > head_seq {
            break;
        }
        let old_enough = cutoff.is_some_and(|c| last.time_ns < c);
        if !old_enough && !over_size {
            break;
        }
        if !old_enough {
            below_target = true;
        }
        fold(dir, meta, seg, &entries)?;
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

fn fold(
    dir: &GroupDir,
    meta: &GroupMeta,
    seg: &store::SegmentPath,
    entries: &[journal::segment::IndexEntry],
) -> anyhow::Result<()> {
    let base = dir.mark("base")?;
    let Some(last) = entries.last() else {
        return Ok(());
    };
    if last.seq > base.seq {
        let images: Vec<File> = meta
            .volumes
            .iter()
            .map(|v| {
                OpenOptions::new()
                    .write(true)
                    .open(dir.image("base", &v.name))
                    .with_context(|| format!("open base image of {}", v.name))
            })
            .collect::<anyhow::Result<_>>()?;
        let file = File::open(&seg.path)?;
        let mut buf = Vec::new();
        for e in entries.iter().filter(|e| e.seq > base.seq) {
            if !e.kind.changes_data() {
                continue;
            }
            let image = &images[usize::from(e.disk)];
            if e.kind.carries_data() {
                store::read_record(&file, e, &mut buf)?;
                let Ok(Some(r)) = journal::record::parse(&buf) else {
                    anyhow::bail!("record seq {} in {} is bad", e.seq, seg.path.display());
                };
                let data = r
                    .payload()
                    .with_context(|| format!("seq {} in {}", e.seq, seg.path.display()))?;
                image.write_all_at(&data, e.offset)?;
            } else if matches!(e.kind, Kind::Zero | Kind::Trim) {
                crate::group::punch(image, e.offset, e.length)?;
            }
        }
        for image in &images {
            image.sync_data()?;
        }
        dir.set_mark(
            "base",
            SeqMark {
                seq: last.seq,
                time_ns: last.time_ns,
            },
        )?;
    }
    fs::remove_file(&seg.path)?;
    let _ = fs::remove_file(seg.index_path());
    store::sync_dir(&dir.journal_dir())?;
    info!(
        group = %meta.name,
        "folded {} into the base (history now starts after seq {})",
        seg.path.display(),
        last.seq
    );
    Ok(())
}
