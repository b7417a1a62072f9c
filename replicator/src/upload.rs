//! The uploader of `serve --store s3://...`: the local store is the staging area (the ack still
//! means fsync there); a thread copies each group's sealed segments, their indexes and the base
//! images to the bucket, then commits them with the group's manifest (a conditional PUT).
//!
//! Per group and round: read the manifest once (taking the group over: the epoch goes up);
//! when the local base moved past the bucket's (a fold), upload the base's changed chunks and
//! commit a manifest without the folded segments, then delete what it no longer names; then
//! each sealed segment after the bucket's last seq: segment, index, manifest. A pin at the
//! uploaded seq keeps retention from folding what is not in the bucket yet. Objects are
//! written if absent, so a retry after a crash or a lost reply never doubles one; the manifest
//! names each segment once. Before `serve` listens, [`prepare`] rebuilds from the bucket each
//! group the staging store lacks (a takeover onto a new machine) and refuses a staging store
//! that is behind the bucket.

mod base;
mod gc;
mod takeover;

pub use takeover::prepare;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bucket::manifest::{self, Manifest, ObjectRef, Writer};
use bucket::{Bucket, Error as BucketError};
use journal::store::{self, GroupDir, GroupMeta, Pin};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

/// The flags of `serve` for a store on S3.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// With an s3:// --store: the local store directory records are made durable in before
    /// they are acknowledged, and uploaded from. It keeps at least what the bucket lacks.
    #[arg(long, value_name = "DIR", help_heading = "S3")]
    pub staging: Option<PathBuf>,
    /// With an s3:// --store: how often sealed segments are looked for and uploaded. The
    /// bucket lags the local store by the open segment (--segment-size) plus this.
    #[arg(long, value_name = "AGE", value_parser = journal::units::parse_duration, default_value = "1s", help_heading = "S3")]
    pub upload_interval: Duration,
    #[command(flatten)]
    pub settings: bucket::Settings,
}

#[derive(Debug)]
pub struct Options {
    pub store: PathBuf,
    pub bucket: Bucket,
    /// Time between rounds.
    pub interval: Duration,
}

/// What `replicator status` shows of the upload (`GROUP/upload.json`, rewritten each round).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadStatus {
    pub bucket: String,
    pub pid: u32,
    pub uploaded_seq: u64,
    pub uploaded_time_ns: u64,
    /// Segments the bucket holds (sealed, uploaded, committed).
    pub uploaded_segments: usize,
    /// Durable here, not in the bucket yet: the RPO to the bucket.
    pub local_only_seq: u64,
    pub local_only_bytes: u64,
    pub generation: u64,
    pub epoch: u64,
    /// Why the last round stopped short (retried after --upload-interval).
    pub error: Option<String>,
    pub updated_ns: u64,
}

/// One group's upload state, kept between rounds.
#[derive(Debug, Default)]
struct GroupState {
    /// The committed manifest and its ETag (None before the first commit).
    manifest: Option<(Manifest, String)>,
    loaded: bool,
    /// Another writer took the group over: this one uploads nothing more of it.
    fenced: Option<String>,
    pin: Option<Pin>,
    pinned_seq: Option<u64>,
    error: Option<String>,
}

/// The local store of `serve --store`, and the bucket when it is an s3:// one (with --staging
/// as the local store). The bucket is checked here: wrong credentials or a missing bucket stop
/// the start; a server that does not answer yet only delays the upload.
pub fn store_and_bucket(
    store: PathBuf,
    args: &ServeArgs,
) -> anyhow::Result<(PathBuf, Option<Bucket>)> {
    let (staging, settings) = (args.staging.clone(), &args.settings);
    let Some(location) = store.to_str().and_then(bucket::Location::parse) else {
        if staging.is_some() {
            bail!("--staging is for an s3:// --store; a directory store is its own staging");
        }
        return Ok((store, None));
    };
    let Some(staging) = staging else {
        bail!(
            "--store {} needs --staging DIR: the local store records are made durable in \
             (and acknowledged from) before they are uploaded",
            store.display()
        );
    };
    let bucket = Bucket::open(location?, settings)?;
    match bucket.check() {
        Ok(()) => {}
        Err(e @ BucketError::Unreachable { .. }) => {
            warn!("{e}; records are kept in --staging until it does")
        }
        Err(e) => return Err(e.into()),
    }
    info!(
        "uploading to {} from staging store {}",
        bucket.location,
        staging.display()
    );
    Ok((staging, Some(bucket)))
}

/// Starts the uploader thread. Pins every group at its base first, so nothing is folded
/// before the bucket has it.
pub fn start(opts: Options) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let mut states: HashMap<PathBuf, GroupState> = HashMap::new();
    for dir in store::list_groups(&opts.store)? {
        let mut st = GroupState::default();
        let base = dir.mark("base")?.seq;
        st.repin(&dir, base)?;
        states.insert(dir.path.clone(), st);
    }
    let writer_id = format!(
        "{}-{}-{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
        std::process::id(),
        journal::now_ns()
    );
    let h = std::thread::Builder::new()
        .name("uploader".into())
        .spawn(move || loop {
            round(&opts, &writer_id, &mut states);
            std::thread::sleep(opts.interval);
        })?;
    Ok(h)
}

fn round(opts: &Options, writer_id: &str, states: &mut HashMap<PathBuf, GroupState>) {
    let groups = match store::list_groups(&opts.store) {
        Ok(g) => g,
        Err(e) => return warn!("uploader: read the store {}: {e}", opts.store.display()),
    };
    for dir in groups {
        let st = states.entry(dir.path.clone()).or_default();
        if st.fenced.is_some() {
            continue;
        }
        let mut up = Uploader {
            bucket: &opts.bucket,
            dir: &dir,
            writer_id,
            st,
        };
        let result = up.sync();
        let st = up.st;
        match result {
            Ok(()) => st.error = None,
            Err(e) => {
                let text = format!("{e:#}");
                if st.error.as_deref() != Some(&text) {
                    warn!(group = %dir.path.display(), "upload to the bucket: {text}; retrying");
                }
                st.error = Some(text);
            }
        }
        if let Err(e) = write_status(&opts.bucket, &dir, st) {
            warn!("uploader: write {}/upload.json: {e}", dir.path.display());
        }
    }
}

struct Uploader<'a> {
    bucket: &'a Bucket,
    dir: &'a GroupDir,
    writer_id: &'a str,
    st: &'a mut GroupState,
}

/// Sealed segments: every one but the newest, and before the one the checkpoint names.
pub(crate) fn sealed_segments(dir: &GroupDir) -> anyhow::Result<Vec<store::SegmentPath>> {
    let mut segments = dir.segments()?;
    segments.pop();
    let writing = dir.checkpoint()?.map_or(u64::MAX, |c| c.segment);
    segments.retain(|s| s.first_seq < writing && s.index_path().is_file());
    Ok(segments)
}

impl GroupState {
    /// Moves the pin to `seq` (a new pin first, then the old one goes).
    fn repin(&mut self, dir: &GroupDir, seq: u64) -> std::io::Result<()> {
        if self.pinned_seq != Some(seq) {
            self.pin = Some(dir.pin(seq)?);
            self.pinned_seq = Some(seq);
        }
        Ok(())
    }
}

impl Uploader<'_> {
    fn name(&self) -> String {
        self.dir
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn sync(&mut self) -> anyhow::Result<()> {
        let meta = self.dir.meta()?;
        if self.st.pinned_seq.is_none() {
            // A group new since the start: nothing of it folds before the bucket has it.
            self.st.repin(self.dir, self.dir.mark("base")?.seq)?;
        }
        if !self.st.loaded {
            self.load(&meta)?;
        }
        if !self.sync_base(&meta)? {
            return Ok(()); // the base is being rewritten: next round
        }
        let sealed = sealed_segments(self.dir)?;
        for (i, seg) in sealed.iter().enumerate() {
            let uploaded = self.uploaded_seq();
            // Ends before the next one starts: in the bucket already, no index read.
            if sealed
                .get(i + 1)
                .is_some_and(|n| n.first_seq <= uploaded + 1)
            {
                continue;
            }
            let (entries, _) = seg.load_index()?;
            let Some(last) = entries.last() else { continue };
            if last.seq <= uploaded {
                continue;
            }
            if seg.first_seq != uploaded + 1 {
                bail!(
                    "the next local segment starts at seq {}, the bucket ends at seq {uploaded}: \
                     records in between are in neither",
                    seg.first_seq
                );
            }
            let entry = self.upload_segment(seg, last.seq, last.time_ns)?;
            let mut m = self.next_manifest(&meta);
            m.segments.push(entry);
            self.commit(m)?;
            info!(group = %self.name(), "uploaded seqs {}..={} to the bucket", seg.first_seq, last.seq);
        }
        let seq = self.uploaded_seq();
        self.st.repin(self.dir, seq)?;
        Ok(())
    }

    /// When the local base moved past the bucket's (a fold; or the first upload), uploads it,
    /// commits a manifest without the folded segments, then deletes what no manifest names.
    /// False: the base is changing under a fold, try again later.
    fn sync_base(&mut self, meta: &GroupMeta) -> anyhow::Result<bool> {
        let base = self.dir.mark("base")?;
        let bucket_base = self.st.manifest.as_ref().map(|(m, _)| m.base.seq);
        if bucket_base.is_some_and(|b| b > base.seq) {
            bail!(
                "the bucket's base (seq {}) is newer than this store's (seq {}): this staging \
                 store is not the one that uploaded the group",
                bucket_base.unwrap_or_default(),
                base.seq
            );
        }
        if bucket_base.is_some_and(|b| b == base.seq) {
            return Ok(true);
        }
        if self.dir.fold_mark()?.is_some() {
            return Ok(false);
        }
        let Some(new_base) = base::upload(self.bucket, self.dir, meta, base)? else {
            return Ok(false); // it moved while read
        };
        let mut m = self.next_manifest(meta);
        let old = m.segments.clone();
        m.segments.retain(|s| s.first_seq > new_base.seq);
        if m.segments
            .first()
            .is_some_and(|s| s.first_seq != new_base.seq + 1)
        {
            m.segments.clear();
        }
        let old_base = std::mem::replace(&mut m.base, new_base);
        self.commit(m)?;
        let (m, _) = self.st.manifest.as_ref().expect("just committed");
        let mut garbage: Vec<String> = old
            .iter()
            .filter(|s| !m.segments.contains(s))
            .flat_map(|s| [s.segment.key.clone(), s.index.key.clone()])
            .collect();
        garbage.extend(base::garbage(self.bucket, &old_base, &m.base));
        for key in garbage {
            if let Err(e) = self.bucket.delete(&key) {
                warn!("uploader: delete {key} (no manifest names it): {e}");
            }
        }
        Ok(true)
    }

    fn uploaded_seq(&self) -> u64 {
        self.st
            .manifest
            .as_ref()
            .map_or(0, |(m, _)| m.uploaded_seq())
    }

    /// Reads the bucket's manifest and takes the group over (epoch + 1), unless it is ours.
    fn load(&mut self, meta: &GroupMeta) -> anyhow::Result<()> {
        let key = manifest::manifest_key(&meta.name);
        self.bucket.check()?;
        match self.bucket.get(&key)? {
            None => self.st.manifest = None,
            Some((bytes, etag)) => {
                let m = Manifest::decode(&bytes, &key)?;
                if m.group != *meta {
                    bail!(
                        "{key} in the bucket is another group's (created at {} ns, volumes \
                         {:?}); this one was created at {} ns: use another s3:// prefix",
                        m.group.created_ns,
                        m.group.volumes,
                        meta.created_ns
                    );
                }
                let ours = m.writer.id == self.writer_id;
                self.st.manifest = Some((m, etag));
                if !ours {
                    // Take over: the next commit raises the epoch; then no older writer can
                    // commit, and what the manifest does not name is garbage for good.
                    let m = self.next_manifest(meta);
                    self.commit(m)?;
                    let (m, _) = self.st.manifest.as_ref().expect("just committed");
                    if let Err(e) = gc::collect(self.bucket, m) {
                        warn!(group = %meta.name, "uploader: collect the bucket's garbage: {e:#}");
                    }
                }
            }
        }
        self.st.loaded = true;
        Ok(())
    }

    /// The committed manifest, one generation on, written by this writer.
    fn next_manifest(&self, meta: &GroupMeta) -> Manifest {
        let (mut m, epoch) = match &self.st.manifest {
            Some((m, _)) => {
                let epoch = if m.writer.id == self.writer_id {
                    m.writer.epoch
                } else {
                    m.writer.epoch + 1
                };
                (m.clone(), epoch)
            }
            None => (
                Manifest {
                    format: manifest::FORMAT,
                    group: meta.clone(),
                    generation: 0,
                    writer: Writer {
                        id: String::new(),
                        epoch: 0,
                    },
                    base: manifest::Base {
                        seq: 0,
                        time_ns: 0,
                        volumes: Vec::new(),
                    },
                    segments: Vec::new(),
                    updated_ns: 0,
                },
                1,
            ),
        };
        m.generation += 1;
        m.writer = Writer {
            id: self.writer_id.to_owned(),
            epoch,
        };
        m.updated_ns = journal::now_ns();
        m
    }

    /// Writes `m` if the bucket still holds the manifest this writer last read or wrote.
    fn commit(&mut self, m: Manifest) -> anyhow::Result<()> {
        let key = manifest::manifest_key(&m.group.name);
        let etag = self.st.manifest.as_ref().map(|(_, e)| e.as_str());
        match self.bucket.put_if_match(&key, m.encode(), etag) {
            Ok(etag) => {
                self.st.manifest = Some((m, etag));
                Ok(())
            }
            Err(BucketError::Changed { .. }) => {
                // Someone wrote it: this writer (a reply lost after the write) or another.
                let now = self.bucket.get(&key)?;
                let theirs = match &now {
                    Some((bytes, _)) => Some(Manifest::decode(bytes, &key)?),
                    None => None,
                };
                match (theirs, now) {
                    (Some(t), Some((_, etag))) if t == m => {
                        self.st.manifest = Some((m, etag));
                        Ok(())
                    }
                    (Some(t), _) if t.writer.id != self.writer_id => {
                        let why = format!(
                            "taken over by writer {} (epoch {}): this replicator uploads no more \
                             of it",
                            t.writer.id, t.writer.epoch
                        );
                        error!(group = %m.group.name, "{key}: {why}");
                        self.st.fenced = Some(why.clone());
                        self.st.pin = None;
                        bail!("{why}")
                    }
                    _ => {
                        self.st.loaded = false;
                        bail!("{key} changed under this writer; reading it again")
                    }
                }
            }
            Err(e) => {
                // The outcome of a failed conditional PUT is unknown: read it again first.
                self.st.loaded = false;
                Err(e.into())
            }
        }
    }

    /// Uploads a sealed segment and its index (each checked right before it leaves).
    fn upload_segment(
        &self,
        seg: &store::SegmentPath,
        last_seq: u64,
        last_time_ns: u64,
    ) -> anyhow::Result<manifest::Segment> {
        let name = self.name();
        let epoch = self.st.manifest.as_ref().map_or(1, |(m, _)| {
            m.writer.epoch + u64::from(m.writer.id != self.writer_id)
        });
        let bytes =
            std::fs::read(&seg.path).with_context(|| format!("read {}", seg.path.display()))?;
        let index = std::fs::read(seg.index_path())
            .with_context(|| format!("read {}", seg.index_path().display()))?;
        // Checked before it leaves: every record, and the index against the segment.
        let mut bookmarks = Vec::new();
        let scan = journal::segment::scan(&bytes, |r, _| {
            if r.header.kind == journal::record::Kind::Bookmark {
                bookmarks.push(manifest::Bookmark {
                    name: r.text(),
                    seq: r.header.seq,
                    time_ns: r.header.time_ns,
                });
            }
        })
        .map_err(|e| anyhow::anyhow!("{}: {e}", seg.path.display()))?;
        let entries = journal::segment::decode_index(&index, bytes.len() as u64)
            .map_err(|e| anyhow::anyhow!("{}: {e}", seg.index_path().display()))?;
        if scan.stop.is_some() || scan.entries != entries {
            bail!(
                "{}: its records do not read back as its index says; not uploaded (run \
                 `replicator check`)",
                seg.path.display()
            );
        }
        let first = seg.first_seq;
        let segment = self.put_immutable(
            manifest::journal_key(&name, epoch, first, last_seq, "seg"),
            bytes,
        )?;
        let index = self.put_immutable(
            manifest::journal_key(&name, epoch, first, last_seq, "idx"),
            index,
        )?;
        Ok(manifest::Segment {
            first_seq: first,
            last_seq,
            last_time_ns,
            segment,
            index,
            bookmarks: Some(bookmarks),
        })
    }

    fn put_immutable(&self, key: String, bytes: Vec<u8>) -> anyhow::Result<ObjectRef> {
        put_immutable(self.bucket, key, bytes)
    }
}

/// Writes an object if absent; one already there (an earlier attempt) must be the same bytes.
pub(crate) fn put_immutable(
    bucket: &Bucket,
    key: String,
    bytes: Vec<u8>,
) -> anyhow::Result<ObjectRef> {
    let r = ObjectRef::of(key, &bytes);
    if !bucket.put_if_absent(&r.key, bytes)? {
        let there = bucket.get(&r.key)?.map(|(b, _)| b).unwrap_or_default();
        if r.check(&there).is_err() {
            bail!(
                "{} is in the bucket with other bytes than this store's; no manifest names it: \
                 delete it",
                r.key
            );
        }
    }
    Ok(r)
}

fn write_status(bucket: &Bucket, dir: &GroupDir, st: &GroupState) -> anyhow::Result<()> {
    let (uploaded_seq, uploaded_time_ns, segments, generation, epoch) = match &st.manifest {
        Some((m, _)) => (
            m.uploaded_seq(),
            m.uploaded_time_ns(),
            m.segments.len(),
            m.generation,
            m.writer.epoch,
        ),
        None => (0, 0, 0, 0, 0),
    };
    let durable = dir.checkpoint()?.map_or(0, |c| c.last_seq);
    // A segment holds seqs up to the next one's first: local only if any is past the upload.
    let local = dir.segments()?;
    let local_only_bytes: u64 = local
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            local
                .get(i + 1)
                .is_none_or(|n| n.first_seq > uploaded_seq + 1)
        })
        .map(|(_, s)| std::fs::metadata(&s.path).map_or(0, |m| m.len()))
        .sum();
    let status = UploadStatus {
        bucket: bucket.location.to_string(),
        pid: std::process::id(),
        uploaded_seq,
        uploaded_time_ns,
        uploaded_segments: segments,
        local_only_seq: durable.saturating_sub(uploaded_seq),
        local_only_bytes,
        generation,
        epoch,
        error: st.fenced.clone().or_else(|| st.error.clone()),
        updated_ns: journal::now_ns(),
    };
    store::write_json_in_place(&dir.path.join("upload.json"), &status)?;
    Ok(())
}

/// `GROUP/upload.json`, if a `serve --store s3://` wrote one.
pub fn read_status(dir: &Path) -> Option<UploadStatus> {
    store::read_json(&dir.join("upload.json")).ok()
}

/// The lines `replicator status` prints about the upload.
pub fn print_status(u: &UploadStatus, newest_time_ns: u64) {
    let lag_s = |ns: u64| ns as f64 / 1e9;
    println!(
        "  bucket      {} (generation {}, writer epoch {}, updated {:.1} s ago)",
        u.bucket,
        u.generation,
        u.epoch,
        lag_s(journal::now_ns().saturating_sub(u.updated_ns))
    );
    println!(
        "  uploaded    seq {} ({} segments); local only: {} records, {}",
        u.uploaded_seq,
        u.uploaded_segments,
        u.local_only_seq,
        journal::units::human_bytes(u.local_only_bytes)
    );
    println!(
        "  RPO bucket  {:.1} s of history is not in the bucket yet",
        lag_s(newest_time_ns.saturating_sub(u.uploaded_time_ns))
    );
    if let Some(e) = &u.error {
        println!("  UPLOAD ERROR {e}");
    }
}

/// The upload's gauges for `serve --metrics` (as of its last round).
pub fn metrics(e: &mut journal::metrics::Exposition, g: &[(&str, &str)], u: &UploadStatus) {
    for (name, help, v) in [
        (
            "replicator_uploaded_seq",
            "Highest seq the bucket holds (committed in the group's manifest).",
            u.uploaded_seq,
        ),
        (
            "replicator_local_only_records",
            "Records durable in the staging store and not in the bucket yet.",
            u.local_only_seq,
        ),
        (
            "replicator_local_only_bytes",
            "Journal bytes in the staging store not in the bucket yet (the open segment included).",
            u.local_only_bytes,
        ),
        (
            "replicator_upload_failing",
            "1 while uploads to the bucket fail (retried each --upload-interval) or another writer took the group over.",
            u64::from(u.error.is_some()),
        ),
    ] {
        e.gauge(name, help, g, v);
    }
}
