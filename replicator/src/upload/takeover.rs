//! Taking a group over from the bucket onto a machine whose staging store lacks it (a new
//! machine, an empty `--staging`): before `serve` listens, every group the bucket holds and
//! the staging store lacks is rebuilt from its committed manifest, so its proxy finds the
//! group where the bucket left it.
//!
//! The rebuild (in `STAGING/.rebuild/GROUP`, renamed into place when whole, so a group is
//! never half there): the objects the manifest names, each checked against its sha256 before
//! a byte is written ([`bucket::fetch::hydrate`]); the journal's end after the last uploaded
//! seq (an empty segment and a checkpoint, as a rotation leaves them), so the uploader finds
//! every segment in the bucket already and new records continue at the next seq; the base's
//! checksums as the kept chunk hashes ([`crate::hashes::reset`]): a proxy's delta sync hashes
//! the chunks the segments changed from the point itself, and sends only what differs.
//! No `stream.json`: which proxy stream the journal ends with is not known, so the proxy
//! compares by hash rather than resuming. The uploader then takes the group over (epoch + 1)
//! as on any start, fencing the old writer.
//!
//! A group the staging store has is checked against the bucket: if the bucket holds records
//! the staging store lacks, or its last record is not the staging store's record of that seq,
//! someone else wrote the group meanwhile, and serving it from this staging store would fork
//! its history: the start is refused, naming both seqs and the fix.

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use bucket::manifest::{self, Manifest};
use bucket::{Bucket, Error as BucketError};
use journal::store::{self, GroupDir, SeqMark};
use tracing::{info, warn};

/// Where groups are rebuilt before they are renamed into the store (not a group directory:
/// `list_groups` does not look inside it).
const REBUILD_DIR: &str = ".rebuild";

/// Rebuilds every group of the bucket that the staging store `store` lacks, and checks the
/// others are not behind the bucket. A bucket that does not answer is only warned about.
pub fn prepare(store: &Path, bucket: &Bucket) -> anyhow::Result<()> {
    let groups = match bucket::fetch::groups(bucket) {
        Ok(g) => g,
        Err(e @ BucketError::Unreachable { .. }) => {
            warn!(
                "{e}; groups of the bucket that this staging store lacks are not rebuilt from \
                 it (restart once it answers)"
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    for g in groups {
        if journal::names::check("group", &g).is_err() {
            warn!("the bucket holds {g}/manifest.json, which is not a group's name: skipped");
            continue;
        }
        let key = manifest::manifest_key(&g);
        let Some((bytes, _)) = bucket.get(&key)? else {
            continue;
        };
        let m = Manifest::decode(&bytes, &key)?;
        if m.group.name != g {
            bail!("{key} names group {:?}", m.group.name);
        }
        let dir = GroupDir::new(store, &g);
        if dir.exists() {
            match not_behind(&dir, &m) {
                Ok(None) => {}
                Ok(Some(refusal)) => bail!("{refusal}"),
                // A damaged group is the journal's to report when it is opened (its sessions
                // are refused then); the others are served.
                Err(e) => warn!(
                    "group {g}: cannot compare the staging store with the bucket ({e:#}); not \
                     checked"
                ),
            }
        } else if dir.path.exists() {
            bail!(
                "group {g} is in the bucket, and {} exists but holds no group.json: move it \
                 aside, so the group is rebuilt from the bucket",
                dir.path.display()
            );
        } else {
            rebuild(store, bucket, &m)
                .with_context(|| format!("rebuild group {g} from {}", bucket.location))?;
        }
    }
    let tmp = store.join(REBUILD_DIR);
    if tmp.is_dir() {
        let _ = fs::remove_dir(&tmp); // only when empty: a failed rebuild is resumed
    }
    Ok(())
}

/// Why a staging store must not serve group `m` (None: it may): it lacks records the bucket
/// holds, or its record at the bucket's last seq is another one (both wrote on after they
/// parted). An error: the staging store could not be read.
fn not_behind(dir: &GroupDir, m: &Manifest) -> anyhow::Result<Option<String>> {
    let g = &m.group.name;
    if dir.meta()? != m.group {
        return Ok(None); // another group of that name: the uploader says so, uploads nothing
    }
    let uploaded = m.uploaded_seq();
    let base = dir.mark("base")?;
    let local = dir.checkpoint()?.map_or(base.seq, |c| c.last_seq);
    let fix = format!(
        "move {} aside (keep it until the group is whole again) and start again: the group \
         is then rebuilt from the bucket",
        dir.path.display()
    );
    let writer = format!("writer {}, epoch {}", m.writer.id, m.writer.epoch);
    if uploaded > local {
        return Ok(Some(format!(
            "group {g}: this staging store holds records up to seq {local}, the bucket up to \
             seq {uploaded} ({writer}): another replicator wrote the group since, and serving \
             it from here would fork its history; {fix}"
        )));
    }
    let Some(last) = m.segments.last() else {
        return Ok(None);
    };
    if uploaded <= base.seq {
        return Ok(None); // folded here: nothing left to compare
    }
    match local_time(dir, uploaded)? {
        Some(time_ns) if time_ns != last.last_time_ns => Ok(Some(format!(
            "group {g}: the record at seq {uploaded} (the bucket's last, {writer}) is not this \
             staging store's record of that seq (written at {time_ns} ns here, {} ns there): \
             both were written on after they parted, and serving it from here would fork its \
             history; {fix}",
            last.last_time_ns
        ))),
        _ => Ok(None),
    }
}

/// The time of the staging store's record `seq` (None: no segment holds it).
fn local_time(dir: &GroupDir, seq: u64) -> anyhow::Result<Option<u64>> {
    let segments = dir.segments()?;
    let Some(seg) = segments.iter().rev().find(|s| s.first_seq <= seq) else {
        return Ok(None);
    };
    let (entries, _) = seg
        .load_index()
        .with_context(|| format!("read {}", seg.path.display()))?;
    Ok(entries.iter().find(|e| e.seq == seq).map(|e| e.time_ns))
}

/// Rebuilds group `m` from the bucket into `store`.
fn rebuild(store: &Path, bucket: &Bucket, m: &Manifest) -> anyhow::Result<()> {
    let g = &m.group.name;
    let started = Instant::now();
    let journal_bytes: u64 = m.segments.iter().map(|s| s.segment.len + s.index.len).sum();
    let disks: u64 = m.group.volumes.iter().map(|v| v.size).sum();
    info!(
        "rebuilding group {g} from the bucket: {} segments, {:.1} MiB (seqs {}..={}), on a base \
         at seq {} ({} volumes, {:.1} MiB of disk)",
        m.segments.len(),
        journal_bytes as f64 / (1 << 20) as f64,
        m.base.seq + 1,
        m.uploaded_seq(),
        m.base.seq,
        m.group.volumes.len(),
        disks as f64 / (1 << 20) as f64
    );
    let root = store.join(REBUILD_DIR);
    fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    let tmp = GroupDir::new(&root, g);
    // Whatever an interrupted rebuild left is reused if it checks; the rest is made again.
    bucket::fetch::hydrate(bucket, &tmp, m)?;
    let meta = tmp.meta()?;
    let last = SeqMark {
        seq: m.uploaded_seq(),
        time_ns: m.uploaded_time_ns(),
    };
    // The journal's end: after the last seq the bucket holds.
    let _ = fs::remove_file(tmp.checkpoint_path());
    journal::writer::begin_after(&tmp, last.seq, last.time_ns)
        .context("start the journal after the bucket's last seq")?;
    // Kept hashes: the base's; a proxy's first Hello hashes what the segments changed.
    let base = tmp.mark("base")?;
    crate::hashes::reset(&tmp, &meta, base).context("keep the base's hashes")?;
    let to = GroupDir::new(store, g);
    fs::rename(&tmp.path, &to.path)
        .with_context(|| format!("move {} to {}", tmp.path.display(), to.path.display()))?;
    store::sync_dir(store)?;
    info!(
        "rebuilt group {g} from the bucket in {:.1} s: durable to seq {}; \
         its proxy compares its disks by hash",
        started.elapsed().as_secs_f64(),
        last.seq
    );
    Ok(())
}
