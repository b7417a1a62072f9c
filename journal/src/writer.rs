//! The journal's writing end: appends records to the newest segment, makes them durable, seals
//! full segments and keeps the durable checkpoint ([`crate::checkpoint`]).
//!
//! The corruption policy, applied when the journal is opened:
//!
//! * Bytes up to the checkpoint were fsynced and may have been acknowledged. A record there that
//!   does not read back is **corruption**: opening fails with [`Damage`] (file, byte, seq), and
//!   nothing is cut. An operator decides (`replicator repair`).
//! * Bytes past the checkpoint were never acknowledged (the acknowledgement follows the
//!   checkpoint's fsync). A record there that is cut short or bad is a **torn tail** of the last
//!   commit: it is cut off, and the cut is reported with its place.
//! * A journal without its checkpoint is damage too (which records were acknowledged is
//!   unknown); only an empty journal may lack one.
//!
//! After a failed write the file is cut back to what was written before; after a failed fsync
//! its state is unknown, so it is cut back to the checkpoint (what is known durable) and the
//! writer refuses all further use: the caller reopens it, which verifies what is there.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::append::Appender;
use crate::checkpoint::{self, Checkpoint};
use crate::record::RecordRef;
use crate::segment::{self, IndexEntry, SegmentHeader, SEGMENT_HEADER_LEN};
use crate::store::{sync_dir, write_file_atomic, GroupDir, SegmentPath};

/// The journal cannot be opened for writing without losing acknowledged records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the journal is damaged: {} at byte {pos} (seq {seq}): {why}. Records up to seq {durable_seq} \
     were acknowledged as durable, so this is not a torn tail and nothing was cut; restore serves \
     the points before seq {seq}. Run `replicator check`, then `replicator repair` to cut the \
     journal there (the bytes after it are kept aside)",
    path.display()
)]
pub struct Damage {
    pub path: PathBuf,
    pub pos: u64,
    /// The first seq that cannot be read.
    pub seq: u64,
    pub why: String,
    /// The checkpoint's seq: everything up to it was acknowledged.
    pub durable_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Damaged(#[from] Damage),
}

/// A torn tail cut off at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub path: PathBuf,
    /// Where the cut is, and how many bytes went.
    pub at: u64,
    pub bytes: u64,
    pub why: String,
}

/// What opening the journal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub last_seq: u64,
    pub last_time_ns: u64,
    /// The seq the checkpoint names as durable (acknowledged at most this far).
    pub durable_seq: u64,
    pub cut: Option<Cut>,
}

/// The durable checkpoint file of a group, open for writing.
#[derive(Debug)]
struct CheckpointFile {
    file: File,
    last: Checkpoint,
}

impl CheckpointFile {
    fn create(dir: &GroupDir, first: Checkpoint) -> io::Result<CheckpointFile> {
        let path = dir.checkpoint_path();
        let mut bytes = vec![0u8; checkpoint::FILE_LEN];
        let at = first.slot_offset() as usize;
        bytes[at..at + checkpoint::SLOT_LEN].copy_from_slice(&first.encode());
        write_file_atomic(&path, &bytes)?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(CheckpointFile { file, last: first })
    }

    fn open_or_create(dir: &GroupDir, last: Option<Checkpoint>) -> io::Result<CheckpointFile> {
        let Some(last) = last else {
            return CheckpointFile::create(dir, Checkpoint::default());
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.checkpoint_path())?;
        Ok(CheckpointFile { file, last })
    }

    /// Writes the next checkpoint to the other slot and syncs it.
    fn put(&mut self, segment: u64, len: u64, last_seq: u64, last_time_ns: u64) -> io::Result<()> {
        let next = Checkpoint {
            counter: self.last.counter + 1,
            segment,
            len,
            last_seq,
            last_time_ns,
        };
        self.file.write_all_at(&next.encode(), next.slot_offset())?;
        self.file.sync_data()?;
        self.last = next;
        Ok(())
    }
}

/// The journal's writing end.
#[derive(Debug)]
pub struct JournalWriter {
    dir: GroupDir,
    out: Appender,
    current: SegmentPath,
    /// Bytes of the current segment written (durable once synced).
    len: u64,
    entries: Vec<IndexEntry>,
    last_seq: u64,
    last_time_ns: u64,
    checkpoint: CheckpointFile,
    segment_limit: u64,
    /// Seal the current segment once its first record is this old (a bucket gets only sealed
    /// segments: this bounds how far it lags when writes trickle or stop).
    seal_after: Option<std::time::Duration>,
    /// When the current segment got its first record (or was reopened holding some).
    first_at: Option<std::time::Instant>,
    /// Why the writer may not be used any more (a failed fsync or an unrepaired write).
    failed: Option<String>,
    /// Bytes appended since the last sync, and the size of the last commit.
    pending: u64,
    last_commit: u64,
}

/// Commits of at most this many bytes (a few 4 KiB records: a guest waiting on each write)
/// are latency-bound: zeros are written ahead of them (sync 4k QD1 ran 1.13x faster; sync 4k
/// QD32, with larger commits, neither faster nor slower).
pub const SMALL_COMMIT: u64 = 16 << 10;
/// Zeros are written ahead, [`ZEROS_PIECE`] at a time, when fewer than this many are left.
pub const ZEROS_LOW: u64 = 256 << 10;
/// A commit that arrives while zeros are written waits for them: at 1 MiB (under a
/// millisecond here) that is one commit in about 250 of 4 KiB, out of the 99th percentile.
pub const ZEROS_PIECE: u64 = 1 << 20;

impl JournalWriter {
    /// Opens the newest segment for appending (creating the first one if there is none), after
    /// checking it against the durable checkpoint: a torn tail past the checkpoint is cut, a bad
    /// record before it is [`Damage`]. `base_seq` is where the journal starts when it is empty.
    pub fn open(
        dir: &GroupDir,
        base_seq: u64,
        segment_limit: u64,
    ) -> Result<(JournalWriter, OpenReport), OpenError> {
        let ckpt = dir.checkpoint()?;
        let durable_seq = ckpt.map(|c| c.last_seq);
        let segments = dir.segments()?;
        if ckpt.is_none() && !segments.is_empty() {
            // Every journal this version writes has one: which records were acknowledged is
            // unknown, so none may be cut.
            return Err(Damage {
                path: dir.checkpoint_path(),
                pos: 0,
                seq: segments[0].first_seq,
                why: "the durable checkpoint is missing".into(),
                durable_seq: 0,
            }
            .into());
        }
        let Some(newest) = segments.last().cloned() else {
            if let Some(d) = durable_seq.filter(|&d| d > base_seq) {
                return Err(Damage {
                    path: dir.journal_dir(),
                    pos: 0,
                    seq: base_seq + 1,
                    why: "no journal segment is left".into(),
                    durable_seq: d,
                }
                .into());
            }
            let (file, current) = new_segment(dir, base_seq + 1)?;
            let mut w = JournalWriter {
                dir: dir.clone(),
                out: Appender::new(file, &current.path, SEGMENT_HEADER_LEN as u64)?,
                current,
                len: SEGMENT_HEADER_LEN as u64,
                entries: Vec::new(),
                last_seq: base_seq,
                last_time_ns: ckpt.map_or(0, |c| c.last_time_ns),
                checkpoint: CheckpointFile::open_or_create(dir, ckpt)?,
                segment_limit,
                seal_after: None,
                first_at: None,
                failed: None,
                pending: 0,
                last_commit: 0,
            };
            w.put_checkpoint()?;
            let report = OpenReport {
                last_seq: base_seq,
                last_time_ns: w.last_time_ns,
                durable_seq: base_seq,
                cut: None,
            };
            return Ok((w, report));
        };
        // Whether the newest segment holds records that were acknowledged.
        let holds_durable = durable_seq.is_some_and(|d| d >= newest.first_seq);
        let damage = |pos: u64, seq: u64, why: String| Damage {
            path: newest.path.clone(),
            pos,
            seq,
            why,
            durable_seq: durable_seq.unwrap_or(0),
        };
        let bytes = fs::read(&newest.path)?;
        let file_len = bytes.len() as u64;
        let scan = match segment::scan(&bytes, |_, _| {}) {
            Ok(scan) => scan,
            Err(e) if holds_durable => {
                return Err(damage(0, newest.first_seq, format!("segment header: {e}")).into())
            }
            Err(e) => {
                // A crash while the segment was being created: it holds nothing acknowledged.
                drop(bytes);
                fs::remove_file(&newest.path)?;
                sync_dir(&dir.journal_dir())?;
                let (w, mut report) = JournalWriter::open(dir, base_seq, segment_limit)?;
                report.cut.get_or_insert(Cut {
                    path: newest.path.clone(),
                    at: 0,
                    bytes: file_len,
                    why: format!("a segment created but never written ({e}); removed"),
                });
                return Ok((w, report));
            }
        };
        drop(bytes);
        let last_valid = scan.entries.last().map_or(newest.first_seq - 1, |e| e.seq);
        if let Some(d) = durable_seq.filter(|&d| holds_durable && last_valid < d) {
            let (pos, why) = match &scan.stop {
                Some((pos, why)) => (*pos, why.to_string()),
                None => (
                    scan.valid_len,
                    format!("the segment ends before seq {d}, which was acknowledged"),
                ),
            };
            return Err(damage(pos, last_valid + 1, why).into());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&newest.path)?;
        let mut cut = None;
        // Past the records there may be zeros to the end of the file (a direct write's padding,
        // zeros written ahead): they are not records, and the next writes cover them.
        if scan.valid_len < file_len && scan.stop.is_some() {
            let why = scan
                .stop
                .as_ref()
                .map(|(_, s)| s.to_string())
                .unwrap_or_default();
            file.set_len(scan.valid_len)?;
            file.sync_all()?;
            cut = Some(Cut {
                path: newest.path.clone(),
                at: scan.valid_len,
                bytes: file_len - scan.valid_len,
                why,
            });
        }
        // A stale index of the newest segment would disagree with appended records.
        let _ = fs::remove_file(newest.index_path());
        let mut last_time_ns = scan.entries.last().map_or(0, |e| e.time_ns);
        if scan.entries.is_empty() {
            // The time of the last record is in the checkpoint, or the previous index.
            last_time_ns = ckpt.map_or(0, |c| c.last_time_ns);
            if let Some(prev) = segments.len().checked_sub(2).map(|i| &segments[i]) {
                if let Ok((entries, _)) = prev.load_index() {
                    last_time_ns = entries.last().map_or(last_time_ns, |e| e.time_ns);
                }
            }
        }
        let mut w = JournalWriter {
            dir: dir.clone(),
            out: Appender::new(file, &newest.path, scan.valid_len)?,
            current: newest,
            len: scan.valid_len,
            entries: scan.entries,
            last_seq: last_valid,
            last_time_ns,
            checkpoint: CheckpointFile::open_or_create(dir, ckpt)?,
            segment_limit,
            seal_after: None,
            first_at: None,
            failed: None,
            pending: 0,
            last_commit: 0,
        };
        if !w.entries.is_empty() {
            w.first_at = Some(std::time::Instant::now());
        }
        // What the file holds now is synced (cut or not): it is the durable position.
        w.out.sync_data()?;
        w.put_checkpoint()?;
        let report = OpenReport {
            last_seq: last_valid,
            last_time_ns,
            durable_seq: durable_seq.unwrap_or(last_valid),
            cut,
        };
        Ok((w, report))
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn last_time_ns(&self) -> u64 {
        self.last_time_ns
    }

    /// The seq the checkpoint names durable.
    pub fn durable_seq(&self) -> u64 {
        self.checkpoint.last.last_seq
    }

    /// Why the writer refuses to be used, if it does.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn usable(&self) -> io::Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(why) => Err(io::Error::other(format!(
                "the journal writer stopped after an earlier failure ({why}); the group must be reopened"
            ))),
        }
    }

    /// Appends checked records (consecutive seqs after `last_seq`) with one write. Not durable
    /// until [`JournalWriter::sync`]. On failure nothing is appended.
    pub fn append(&mut self, records: &[RecordRef<'_>]) -> io::Result<()> {
        self.usable()?;
        if records.is_empty() {
            return Ok(());
        }
        for (i, r) in records.iter().enumerate() {
            let expected = self.last_seq + 1 + i as u64;
            if r.header.seq != expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("append of seq {} where {expected} belongs", r.header.seq),
                ));
            }
        }
        if let Err(e) = self.out.append(self.len, records) {
            // A partial write may have left bytes past the end: cut them.
            if let Err(cut) = self.out.set_len(self.len) {
                self.failed = Some(format!("{e}; then cutting the partial write: {cut}"));
            }
            return Err(e);
        }
        let mut pos = self.len;
        for r in records {
            self.entries.push(IndexEntry::from_header(&r.header, pos));
            pos += r.bytes.len() as u64;
        }
        if let Some(r) = records.last() {
            self.last_seq = r.header.seq;
            self.last_time_ns = r.header.time_ns;
        }
        self.pending += pos - self.len;
        self.len = pos;
        self.first_at.get_or_insert_with(std::time::Instant::now);
        Ok(())
    }

    /// Between commits, when nothing waits: if the last commit was small, keeps zeros written
    /// ahead of the end (see [`crate::append`]), so the next commits overwrite blocks instead
    /// of growing the file. Returns whether it wrote any. Never past the segment's size limit;
    /// a failure is only logged (the zeros are an optimization, and the next append or sync
    /// meets a failing disk itself).
    pub fn zero_ahead(&mut self) -> bool {
        if self.failed.is_some()
            || self.pending > 0
            || self.last_commit > SMALL_COMMIT
            || self.out.zeros_ahead(self.len) >= ZEROS_LOW
        {
            return false;
        }
        match self.out.write_zeros(ZEROS_PIECE, self.segment_limit) {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::debug!(
                    "writing zeros ahead in {}: {e}",
                    self.current.path.display()
                );
                false
            }
        }
    }

    /// Seals segments whose first record is older than `age` (at a sync, or
    /// [`JournalWriter::seal_if_due`]); None: only when full.
    pub fn set_seal_after(&mut self, age: Option<std::time::Duration>) {
        self.seal_after = age;
    }

    fn seal_due(&self) -> bool {
        self.len >= self.segment_limit
            || self
                .seal_after
                .zip(self.first_at)
                .is_some_and(|(age, t)| t.elapsed() >= age)
    }

    /// Seals the current segment if it is due (full, or older than the seal age) and holds
    /// durable records only; for an idle journal, whose syncs do not come.
    pub fn seal_if_due(&mut self) -> io::Result<bool> {
        let durable = self.checkpoint.last.segment == self.current.first_seq
            && self.checkpoint.last.len == self.len;
        if self.failed.is_some() || self.entries.is_empty() || !durable || !self.seal_due() {
            return Ok(false);
        }
        self.rotate()?;
        Ok(true)
    }

    /// Makes every appended record durable and moves the checkpoint to them; then seals the
    /// segment if it is full. Records may be acknowledged once this returns Ok.
    pub fn sync(&mut self) -> io::Result<()> {
        self.usable()?;
        self.last_commit = std::mem::take(&mut self.pending);
        if let Err(e) = self.out.sync_data() {
            self.fail_sync(&e);
            return Err(e);
        }
        if let Err(e) = self.put_checkpoint() {
            self.failed = Some(format!("sync the durable checkpoint: {e}"));
            return Err(e);
        }
        if self.seal_due() {
            // The records are durable either way: a segment that cannot be sealed now grows on
            // and is sealed at a later sync.
            if let Err(e) = self.rotate() {
                tracing::warn!(
                    "sealing {} failed: {e}; it stays open and is sealed later",
                    self.current.path.display()
                );
            }
        }
        Ok(())
    }

    /// After a failed fsync the file's state is unknown: keep only what the checkpoint names
    /// durable, and stop.
    fn fail_sync(&mut self, e: &io::Error) {
        let durable = if self.checkpoint.last.segment == self.current.first_seq {
            self.checkpoint.last.len
        } else {
            SEGMENT_HEADER_LEN as u64
        };
        let cut = self
            .out
            .set_len(durable)
            .and_then(|()| self.out.sync_data());
        self.failed = Some(match cut {
            Ok(()) => format!("fsync of {} failed: {e}", self.current.path.display()),
            Err(c) => format!(
                "fsync of {} failed: {e}; cutting it back to its durable bytes failed too: {c}",
                self.current.path.display()
            ),
        });
    }

    fn put_checkpoint(&mut self) -> io::Result<()> {
        self.checkpoint.put(
            self.current.first_seq,
            self.len,
            self.last_seq,
            self.last_time_ns,
        )
    }

    /// Seals the current segment (writes its index) and starts the next. The records are
    /// already durable; a failure here leaves the current segment open, to be sealed later.
    pub fn rotate(&mut self) -> io::Result<()> {
        self.usable()?;
        if self.entries.is_empty() {
            return Ok(());
        }
        // A sealed segment ends with its last record: no padding after it.
        self.out.set_len(self.len)?;
        self.out.sync_data()?;
        let idx = segment::encode_index(self.current.first_seq, self.len, &self.entries);
        write_file_atomic(&self.current.index_path(), &idx)?;
        let (file, current) = new_segment(&self.dir, self.last_seq + 1)?;
        self.out
            .switch_to(file, &current.path, SEGMENT_HEADER_LEN as u64)?;
        self.current = current;
        self.len = SEGMENT_HEADER_LEN as u64;
        self.entries.clear();
        self.first_at = None;
        self.put_checkpoint().inspect_err(|e| {
            self.failed = Some(format!("sync the durable checkpoint: {e}"));
        })
    }

    /// Index entries of the segment being written.
    pub fn current_entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// Bytes written to the current segment (header included).
    pub fn current_len(&self) -> u64 {
        self.len
    }

    pub fn current_segment(&self) -> &SegmentPath {
        &self.current
    }
}

/// Starts the journal's writing end after sealed segments that came from elsewhere (a group
/// rebuilt from a bucket): an empty segment at `last_seq + 1` and a checkpoint naming every
/// record up to `last_seq` durable, as a rotation leaves them. The journal must have no
/// checkpoint and no segment at `last_seq + 1` yet.
pub fn begin_after(dir: &GroupDir, last_seq: u64, last_time_ns: u64) -> io::Result<()> {
    if dir.checkpoint_path().exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{}: the journal has a checkpoint already",
                dir.checkpoint_path().display()
            ),
        ));
    }
    if dir.segment_path(last_seq + 1).path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("a segment at seq {} is there already", last_seq + 1),
        ));
    }
    let (file, current) = new_segment(dir, last_seq + 1)?;
    drop(file);
    CheckpointFile::create(
        dir,
        Checkpoint {
            counter: 0,
            segment: current.first_seq,
            len: SEGMENT_HEADER_LEN as u64,
            last_seq,
            last_time_ns,
        },
    )?;
    Ok(())
}

/// Creates the segment that starts at `first_seq`, its header synced: written under a
/// temporary name and renamed, so a failure leaves no segment behind (a stray empty segment
/// would make the one being written look sealed to retention).
fn new_segment(dir: &GroupDir, first_seq: u64) -> io::Result<(File, SegmentPath)> {
    let current = dir.segment_path(first_seq);
    let tmp = current.path.with_extension("seg.tmp");
    let made = (|| {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let header = SegmentHeader {
            first_seq,
            created_ns: crate::now_ns(),
        };
        file.write_all(&header.encode())?;
        file.sync_all()?;
        fs::rename(&tmp, &current.path)?;
        sync_dir(&dir.journal_dir())?;
        Ok(file)
    })();
    match made {
        Ok(file) => Ok((file, current)),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            // Renamed but the directory not synced: take it back too, it holds no record.
            if current.path.exists()
                && fs::metadata(&current.path).is_ok_and(|m| m.len() <= SEGMENT_HEADER_LEN as u64)
            {
                let _ = fs::remove_file(&current.path);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests;
