//! Head images: each volume's latest durable state, kept so that a proxy can be told chunk
//! hashes (delta sync) without replaying the journal. They are a cache, rebuilt from the journal.
//!
//! A thread per group follows the journal's end: told the durable seq, it reads the records
//! back from the segment files (in the page cache) and applies them, so ingest (check, append,
//! fsync, ack) never waits for head writes and holds no payloads for them.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use journal::read::{self, Apply, ApplyError, Images, Stream};
use journal::store::{GroupDir, SegmentPath, SeqMark};
use journal::sums::ChunkSet;

/// Chunks of each head image changed since its sums were last made.
pub type Touched = Arc<Mutex<Vec<ChunkSet>>>;

/// Each head image's chunk checksums, current except for the touched chunks.
pub type Sums = Arc<Mutex<Vec<journal::sums::Sums>>>;

/// A head applier checkpoints the images at most this often while records flow.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

/// How often the applier starts the writeback of what it wrote to the head images. Left to
/// the checkpoint's fsync, ten seconds of random writes went to the disk at once, and the
/// journal's fsyncs queued behind them: the replication lag spiked to 0.6 s every 10 s.
const WRITEBACK_EVERY: Duration = Duration::from_secs(1);

/// The head images of a group and what is known of them, as the applier works on them.
pub struct Heads<'a> {
    pub dir: GroupDir,
    /// Volume names, in disk order.
    pub names: Vec<String>,
    pub files: &'a [File],
    pub touched: Touched,
    pub sums: Sums,
    /// False when the images could not be brought to the journal's end at start-up: they are
    /// never recorded as current then.
    pub trusted: bool,
}

/// Head images as a replay target that also notes which chunks each record changes.
pub struct Marking<'a> {
    pub images: &'a mut Images,
    pub touched: &'a Mutex<Vec<ChunkSet>>,
}

impl Marking<'_> {
    fn note(&self, disk: u16, offset: u64, length: u64) {
        let mut t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = t.get_mut(usize::from(disk)) {
            set.mark(offset, length);
        }
    }
}

impl Apply for Marking<'_> {
    fn write(&mut self, disk: u16, offset: u64, data: &[u8]) -> io::Result<()> {
        self.note(disk, offset, data.len() as u64);
        self.images.write(disk, offset, data)
    }

    fn zero(&mut self, disk: u16, offset: u64, length: u64) -> io::Result<()> {
        self.note(disk, offset, length);
        self.images.zero(disk, offset, length)
    }
}

#[derive(Debug)]
pub struct HeadApplier {
    tx: crossbeam_channel::Sender<Work>,
    /// False once a record could not be applied: the images no longer follow the journal.
    valid: Arc<AtomicBool>,
}

enum Work {
    /// Records up to this seq are durable.
    Durable(u64),
    /// Replies once everything up to the seq is applied (with the first error, if any).
    Drain(u64, crossbeam_channel::Sender<io::Result<()>>),
    /// Checkpoint the images: now, once everything up to the seq is applied (replying), or
    /// (None) when [`CHECKPOINT_EVERY`] has passed since the last one.
    Checkpoint(Option<(u64, crossbeam_channel::Sender<anyhow::Result<()>>)>),
}

/// Where the applier reads next.
struct Follower {
    dir: GroupDir,
    segment: SegmentPath,
    pos: u64,
    stream: Option<Stream>,
    applied: u64,
    /// The time of the record at `applied`.
    applied_time_ns: u64,
}

impl Follower {
    /// Applies every record up to `durable`, following segment rotations.
    fn advance(
        &mut self,
        images: &mut Images,
        touched: &Touched,
        durable: u64,
    ) -> Result<(), ApplyError> {
        while self.applied < durable {
            let stream = match &mut self.stream {
                Some(s) => s,
                None => self
                    .stream
                    .insert(Stream::open_at(&self.segment.path, self.pos)?),
            };
            let next = match stream.next(self.applied + 1) {
                Ok(next) => next,
                Err(e) => {
                    self.stream = None;
                    return Err(e.into());
                }
            };
            match next {
                Some((file, pos, r)) => {
                    let mut target = Marking {
                        images: &mut *images,
                        touched,
                    };
                    let len = r.bytes.len() as u64;
                    if let Err(e) = read::apply(file, pos, &r, &mut target) {
                        // Retried from this record: the stream has moved past it.
                        self.stream = None;
                        return Err(e);
                    }
                    self.applied = r.header.seq;
                    self.applied_time_ns = r.header.time_ns;
                    self.pos = pos + len;
                }
                None => {
                    // The segment ends here: the next one starts after the last applied seq.
                    let next = self.dir.segment_path(self.applied + 1);
                    if next.path == self.segment.path || !next.path.exists() {
                        return Err(ApplyError::Read(read::ReadError::Io {
                            path: next.path,
                            source: io::Error::new(
                                io::ErrorKind::NotFound,
                                format!(
                                    "seq {} is durable but no segment holds it",
                                    self.applied + 1
                                ),
                            ),
                        }));
                    }
                    self.segment = next;
                    self.pos = journal::segment::SEGMENT_HEADER_LEN as u64;
                    self.stream = None;
                }
            }
        }
        Ok(())
    }
}

impl HeadApplier {
    /// Starts the thread, reading from byte `pos` of `segment`, where the record after
    /// `applied` is. `shared` is where it publishes the seq it has applied (retention reads
    /// it; it outlives this applier when the group is reopened).
    pub fn start(
        heads: Heads<'_>,
        segment: SegmentPath,
        pos: u64,
        applied: SeqMark,
        shared: Arc<AtomicU64>,
    ) -> io::Result<HeadApplier> {
        let files = heads
            .files
            .iter()
            .map(File::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        let Heads {
            dir,
            names,
            touched,
            sums,
            trusted,
            ..
        } = heads;
        shared.store(applied.seq, Ordering::Release);
        let mut images = Images::new(&files)?;
        let valid = Arc::new(AtomicBool::new(true));
        let (tx, rx) = crossbeam_channel::unbounded::<Work>();
        let mut follower = Follower {
            dir: dir.clone(),
            segment,
            pos,
            stream: None,
            applied: applied.seq,
            applied_time_ns: applied.time_ns,
        };
        let (applied_out, valid_out) = (shared.clone(), valid.clone());
        std::thread::Builder::new()
            .name("head-applier".into())
            .spawn(move || {
                // Background work: the images are a cache for delta sync, and nothing waits
                // for them while records flow. At the lowest priority they take only what
                // ingest (and, on a shared host, the guest's I/O) leaves of the CPU.
                // SAFETY: setpriority on this thread's own id; no memory is passed.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
                }
                let mut failed: Option<String> = None;
                let mut durable = follower.applied;
                let mut last_checkpoint = Instant::now();
                let mut checkpoint_due = false;
                let mut last_writeback = Instant::now();
                loop {
                    // Idle with a checkpoint due: wake for it when its time comes.
                    let first = if checkpoint_due {
                        match rx.recv_timeout(
                            CHECKPOINT_EVERY.saturating_sub(last_checkpoint.elapsed()),
                        ) {
                            Ok(w) => Some(w),
                            Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                        }
                    } else {
                        match rx.recv() {
                            Ok(w) => Some(w),
                            Err(_) => break,
                        }
                    };
                    // Take everything queued: only the newest durable seq matters.
                    let mut drains = Vec::new();
                    let mut checkpoints = Vec::new();
                    for work in first.into_iter().chain(rx.try_iter()) {
                        match work {
                            Work::Durable(seq) => durable = durable.max(seq),
                            Work::Drain(seq, reply) => {
                                durable = durable.max(seq);
                                drains.push(reply);
                            }
                            Work::Checkpoint(None) => checkpoint_due = true,
                            Work::Checkpoint(Some((seq, reply))) => {
                                durable = durable.max(seq);
                                checkpoints.push(reply);
                            }
                        }
                    }
                    // A failure (a full disk, a bad record) is retried with the next work; the
                    // images are not trusted meanwhile, and each new cause is logged once.
                    match follower.advance(&mut images, &touched, durable) {
                        Ok(()) => {
                            if failed.take().is_some() {
                                tracing::info!(
                                    "head images follow the journal again (seq {})",
                                    follower.applied
                                );
                            }
                            valid_out.store(true, Ordering::Release);
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            if failed.as_deref() != Some(msg.as_str()) {
                                tracing::error!(
                                    "head images stop at seq {}: {msg}; delta sync compares \
                                     nothing until they catch up (retried as records arrive)",
                                    follower.applied
                                );
                            }
                            valid_out.store(false, Ordering::Release);
                            failed = Some(msg);
                        }
                    }
                    applied_out.store(follower.applied, Ordering::Release);
                    if last_writeback.elapsed() >= WRITEBACK_EVERY {
                        read::start_writeback(&files);
                        last_writeback = Instant::now();
                    }
                    for reply in drains {
                        let _ = reply.send(match &failed {
                            None => Ok(()),
                            Some(e) => Err(io::Error::other(e.clone())),
                        });
                    }
                    let timely = checkpoint_due && last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
                    if !checkpoints.is_empty() || timely {
                        // Images that miss records must not be recorded as current.
                        let done = if trusted && failed.is_none() {
                            let mark = SeqMark {
                                seq: follower.applied,
                                time_ns: follower.applied_time_ns,
                            };
                            checkpoint(&dir, &names, &files, &touched, &sums, mark)
                        } else {
                            Ok(())
                        };
                        if let Err(e) = &done {
                            tracing::warn!("checkpoint of the head images failed: {e:#}");
                        }
                        checkpoint_due = false;
                        last_checkpoint = Instant::now();
                        for reply in checkpoints {
                            let _ = reply.send(match &done {
                                Ok(()) => Ok(()),
                                Err(e) => Err(anyhow::anyhow!("{e:#}")),
                            });
                        }
                    }
                }
            })?;
        Ok(HeadApplier { tx, valid })
    }

    /// Asks for a checkpoint of the images within [`CHECKPOINT_EVERY`].
    pub fn checkpoint_soon(&self) {
        let _ = self.tx.send(Work::Checkpoint(None));
    }

    /// Brings the images to `seq` and checkpoints them, waiting until that is done.
    pub fn checkpoint_now(&self, seq: u64) -> anyhow::Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx
            .send(Work::Checkpoint(Some((seq, tx))))
            .map_err(|_| anyhow::anyhow!("head applier stopped"))?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("head applier stopped"))?
    }

    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }

    pub fn durable(&self, seq: u64) {
        let _ = self.tx.send(Work::Durable(seq));
    }

    /// Waits until the images hold everything up to `seq`.
    pub fn drain(&self, seq: u64) -> io::Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx
            .send(Work::Drain(seq, tx))
            .map_err(|_| io::Error::other("head applier stopped"))?;
        rx.recv()
            .map_err(|_| io::Error::other("head applier stopped"))?
    }
}

/// Flushes the head images (holding exactly the records up to `mark`), writes their checksums
/// with the chunks changed since they were made listed as stale, then records the seq they
/// hold. Nothing is read back: a random stream touches every chunk, and rehashing them all at
/// each checkpoint read the whole image; stale chunks are hashed when a proxy asks for hashes
/// ([`crate::group::Group::head_hashes`]).
fn checkpoint(
    dir: &GroupDir,
    names: &[String],
    heads: &[File],
    touched: &Touched,
    sums: &Sums,
    mark: SeqMark,
) -> anyhow::Result<()> {
    use anyhow::Context;
    for f in heads {
        f.sync_data()?;
    }
    let mut sums = sums.lock().unwrap_or_else(|p| p.into_inner());
    {
        let touched = touched.lock().unwrap_or_else(|p| p.into_inner());
        for (s, set) in sums.iter_mut().zip(touched.iter()) {
            for c in set.clone().take() {
                s.set_stale(c);
            }
        }
    }
    for (name, s) in names.iter().zip(sums.iter_mut()) {
        s.seq = mark.seq;
        dir.set_sums("head", name, s)
            .context("write the head image's checksums")?;
    }
    dir.set_mark("head", mark)?;
    Ok(())
}

/// Brings head images from `head_seq` up to `durable` by replaying the journal (after a crash).
pub fn catch_up(
    dir: &GroupDir,
    heads: &[File],
    touched: &Touched,
    head_seq: u64,
    durable: u64,
) -> Result<(), ApplyError> {
    let mut segments = Vec::new();
    for seg in dir.segments().map_err(|source| read::ReadError::Io {
        path: dir.journal_dir(),
        source,
    })? {
        let (entries, _) = seg.load_index().map_err(|source| read::ReadError::Io {
            path: seg.path.clone(),
            source,
        })?;
        if entries.last().is_some_and(|e| e.seq > head_seq) {
            segments.push((seg, entries));
        }
    }
    let mut images = Images::new(heads).map_err(|source| read::ReadError::Io {
        path: dir.path.join("head"),
        source,
    })?;
    let mut target = Marking {
        images: &mut images,
        touched,
    };
    read::replay(&segments, head_seq + 1, durable, &mut target)?;
    Ok(())
}

/// Makes the head images again: the base images copied, then the journal replayed onto them
/// up to `durable`; every chunk is rehashed.
pub fn rebuild(
    dir: &GroupDir,
    meta: &journal::store::GroupMeta,
    heads: &[File],
    touched: &Touched,
    durable: u64,
) -> Result<(), ApplyError> {
    let io = |path: std::path::PathBuf| move |source| read::ReadError::Io { path, source };
    let base = dir.mark("base").map_err(io(dir.path.join("base.json")))?;
    for (v, head) in meta.volumes.iter().zip(heads) {
        let from = dir
            .open_image("base", &v.name, journal::store::Access::Read)
            .map_err(io(dir.image("base", &v.name)))?;
        read::copy_sparse(&from, head, v.size).map_err(io(dir.image("head", &v.name)))?;
    }
    {
        let mut t = touched.lock().unwrap_or_else(|p| p.into_inner());
        *t = meta.volumes.iter().map(|v| ChunkSet::all(v.size)).collect();
    }
    catch_up(dir, heads, touched, base.seq, durable)
}
