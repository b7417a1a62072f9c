//! One group's store, open for writing: the journal's append end, the head images kept at the
//! durable seq, and the checks every incoming record passes before it is stored.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use journal::record::{Kind, RecordRef};
use journal::store::{self, GroupDir, GroupMeta, JournalWriter, SeqMark};
use journal::wire::{self, Volume};
use tracing::{info, warn};

/// Brings the head images up to the durable seq on a thread of its own, reading the records
/// back from the journal files (in the page cache), so that ingest (check, append, fsync, ack)
/// never waits for head writes and holds no payloads for them. The head is a cache: it may lag.
#[derive(Debug)]
struct HeadApplier {
    tx: crossbeam_channel::Sender<HeadWork>,
    /// Highest seq applied to the head images (retention folds nothing beyond it).
    applied: Arc<AtomicU64>,
}

enum HeadWork {
    /// Records up to this seq are durable.
    Durable(u64),
    /// Replies once everything up to the seq is applied (with the first error, if any).
    Drain(u64, crossbeam_channel::Sender<io::Result<()>>),
}

/// Where the applier reads next: a segment and a byte position in it.
struct Cursor {
    dir: GroupDir,
    segment: store::SegmentPath,
    pos: u64,
    applied: u64,
}

impl Cursor {
    /// Applies every record up to `durable`, following segment rotations.
    fn advance(&mut self, heads: &[File], durable: u64) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut window = 8usize << 20;
        while self.applied < durable {
            let file = match File::open(&self.segment.path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Retention folded this segment after it was read to its end (it folds
                    // nothing past the applied seq): go on with the next one.
                    let next = self.dir.segment_path(self.applied + 1);
                    if next.path == self.segment.path || !next.path.exists() {
                        return Err(e);
                    }
                    self.segment = next;
                    self.pos = journal::segment::SEGMENT_HEADER_LEN as u64;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let len = file.metadata()?.len();
            if self.pos >= len {
                // This segment is done: the next starts after the last applied seq.
                let next = self.dir.segment_path(self.applied + 1);
                if !next.path.exists() {
                    return Err(io::Error::other(format!(
                        "{} is missing: the head images stop at seq {}",
                        next.path.display(),
                        self.applied
                    )));
                }
                self.segment = next;
                self.pos = journal::segment::SEGMENT_HEADER_LEN as u64;
                continue;
            }
            let want = (len - self.pos).min(window as u64) as usize;
            buf.resize(want, 0);
            file.read_exact_at(&mut buf, self.pos)?;
            let mut at = 0;
            while self.applied < durable {
                let r = match journal::record::parse(&buf[at..]) {
                    Ok(Some(r)) => r,
                    // Cut at the read window (or a record not yet durable): read on.
                    Ok(None) => break,
                    Err(e) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{} at byte {}: {e}",
                                self.segment.path.display(),
                                self.pos + at as u64
                            ),
                        ))
                    }
                };
                if r.header.seq != self.applied + 1 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "head applier expected seq {}, found {}",
                            self.applied + 1,
                            r.header.seq
                        ),
                    ));
                }
                apply_record(heads, &r)?;
                self.applied = r.header.seq;
                at += r.header.record_len();
            }
            if at == 0 {
                // A record longer than the window: widen it to the record, if it is all there.
                let whole = buf
                    .first_chunk::<{ journal::record::HEADER_LEN }>()
                    .and_then(|h| journal::Header::decode(h).ok())
                    .map(|h| h.record_len());
                match whole {
                    Some(n) if n > want && self.pos + n as u64 <= len => {
                        window = n;
                        continue;
                    }
                    _ => return Ok(()), // nothing more durable to read yet
                }
            }
            self.pos += at as u64;
        }
        Ok(())
    }
}

impl HeadApplier {
    fn start(heads: &[File], cursor: Cursor) -> io::Result<HeadApplier> {
        let files = heads
            .iter()
            .map(File::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        let applied = Arc::new(AtomicU64::new(cursor.applied));
        let (tx, rx) = crossbeam_channel::unbounded::<HeadWork>();
        let shared = applied.clone();
        std::thread::Builder::new()
            .name("head-applier".into())
            .spawn(move || {
                let mut cursor = cursor;
                let mut failed: Option<io::Error> = None;
                let mut durable = cursor.applied;
                while let Ok(first) = rx.recv() {
                    // Take everything queued: only the newest durable seq matters.
                    let mut drains = Vec::new();
                    for work in std::iter::once(first).chain(rx.try_iter()) {
                        match work {
                            HeadWork::Durable(seq) => durable = durable.max(seq),
                            HeadWork::Drain(seq, reply) => {
                                durable = durable.max(seq);
                                drains.push(reply);
                            }
                        }
                    }
                    if let Err(e) = cursor.advance(&files, durable) {
                        tracing::error!("head images: {e}");
                        failed.get_or_insert(e);
                    }
                    shared.store(cursor.applied, Ordering::Release);
                    for reply in drains {
                        let _ = reply.send(failed.take().map_or(Ok(()), Err));
                    }
                }
            })?;
        Ok(HeadApplier { tx, applied })
    }

    /// Highest seq in the head images, for retention (which folds nothing beyond it).
    pub fn applied(&self) -> Arc<AtomicU64> {
        self.applied.clone()
    }

    fn durable(&self, seq: u64) {
        let _ = self.tx.send(HeadWork::Durable(seq));
    }

    fn drain(&self, seq: u64) -> io::Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx
            .send(HeadWork::Drain(seq, tx))
            .map_err(|_| io::Error::other("head applier stopped"))?;
        rx.recv()
            .map_err(|_| io::Error::other("head applier stopped"))?
    }
}

#[derive(Debug)]
pub struct Group {
    pub dir: GroupDir,
    pub meta: GroupMeta,
    journal: JournalWriter,
    heads: Vec<File>,
    applier: HeadApplier,
    /// Stored bytes appended since the last commit.
    uncommitted: usize,
    /// Highest seq made durable (fsynced) in the journal.
    pub durable_seq: u64,
    pub durable_time_ns: u64,
    pub records_in: u64,
    pub bytes_in: u64,
    pub stored_in: u64,
}

/// Bytes appended before a commit is forced (group commit's upper bound).
pub const PENDING_LIMIT: usize = 64 << 20;

impl Group {
    /// Opens a group's store, or creates it for `volumes`. An existing group must have the same
    /// volumes (names and sizes, in order).
    pub fn open(
        dir: GroupDir,
        name: &str,
        volumes: &[Volume],
        segment_limit: u64,
    ) -> anyhow::Result<(Group, bool)> {
        let known = dir.exists();
        if !known {
            info!(
                group = name,
                "new group: creating its store at {}",
                dir.path.display()
            );
            dir.create(&GroupMeta {
                format: store::FORMAT,
                name: name.to_owned(),
                volumes: volumes.to_vec(),
                created_ns: journal::now_ns(),
            })
            .with_context(|| format!("create group store {}", dir.path.display()))?;
        }
        let meta = dir.meta()?;
        check_volumes(&dir, &meta, volumes)?;
        let base = dir.mark("base")?;
        let (journal, report) = JournalWriter::open(&dir, base.seq, segment_limit)
            .with_context(|| format!("open journal of group {name}"))?;
        if let Some((path, at, cut, why)) = &report.truncated {
            warn!(
                group = name,
                "journal tail cut at start-up: {} at byte {at}, {cut} bytes removed ({why}); \
                 nothing acknowledged is lost (records are acknowledged after fsync)",
                path.display()
            );
        }
        let mut heads = Vec::new();
        for v in &meta.volumes {
            let path = dir.image("head", &v.name);
            heads.push(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("open head image {}", path.display()))?,
            );
        }
        // Placeholder until the heads are caught up below; replaced right after.
        let (placeholder, _) = crossbeam_channel::unbounded();
        let mut group = Group {
            dir,
            meta,
            journal,
            heads,
            applier: HeadApplier {
                tx: placeholder,
                applied: Arc::new(AtomicU64::new(0)),
            },
            uncommitted: 0,
            durable_seq: report.last_seq,
            durable_time_ns: report.last_time_ns,
            records_in: 0,
            bytes_in: 0,
            stored_in: 0,
        };
        group.catch_up_heads()?;
        let cursor = Cursor {
            dir: group.dir.clone(),
            segment: group.journal.current_segment().clone(),
            pos: group.journal.current_len(),
            applied: group.durable_seq,
        };
        group.applier = HeadApplier::start(&group.heads, cursor)?;
        Ok((group, known))
    }

    /// Replays durable records the head images may lack (after a crash) onto them.
    fn catch_up_heads(&mut self) -> anyhow::Result<()> {
        let head = self.dir.mark("head")?;
        if head.seq >= self.durable_seq {
            return Ok(());
        }
        let from = head.seq + 1;
        info!(
            group = %self.meta.name,
            "bringing head images from seq {} to {}", head.seq, self.durable_seq
        );
        let mut buf = Vec::new();
        for seg in self.dir.segments()? {
            let (entries, _) = seg.load_index()?;
            if entries.last().is_none_or(|e| e.seq < from) {
                continue;
            }
            let file = File::open(&seg.path)?;
            for e in entries
                .iter()
                .filter(|e| e.seq >= from && e.seq <= self.durable_seq)
            {
                store::read_record(&file, e, &mut buf)?;
                let Ok(Some(r)) = journal::record::parse(&buf) else {
                    bail!(
                        "record seq {} in {} does not parse",
                        e.seq,
                        seg.path.display()
                    );
                };
                apply_record(&self.heads, &r)
                    .with_context(|| format!("seq {} in {}", e.seq, seg.path.display()))?;
            }
        }
        self.mark_heads()?;
        Ok(())
    }

    /// Checks a batch and appends its new records to the journal (not yet durable). Records at
    /// or below the durable seq are duplicates of a resent stream and are skipped.
    pub fn ingest(&mut self, body: &[u8]) -> anyhow::Result<()> {
        let mut accepted: Vec<RecordRef<'_>> = Vec::new();
        let mut next = self.journal.last_seq() + 1;
        for r in wire::batch_records(body) {
            let r = r?;
            let h = r.header;
            if h.seq < next {
                continue;
            }
            if h.seq != next {
                bail!(
                    "seq {} arrived when {} was expected: the stream has a gap",
                    h.seq,
                    next
                );
            }
            let Some(volume) = self.meta.volumes.get(usize::from(h.disk)) else {
                bail!(
                    "record seq {} names disk {} of {}",
                    h.seq,
                    h.disk,
                    self.meta.volumes.len()
                );
            };
            if h.kind.changes_data() && h.offset + h.length > volume.size {
                bail!(
                    "record seq {} covers {}..{} past the end of {} ({} bytes)",
                    h.seq,
                    h.offset,
                    h.offset + h.length,
                    volume.name,
                    volume.size
                );
            }
            if h.kind.carries_data() {
                // The payload itself is checked too (decompressed, crc) before it is stored.
                r.payload()
                    .with_context(|| format!("record seq {}", h.seq))?;
            }
            self.uncommitted += h.record_len();
            self.bytes_in += if h.kind.carries_data() { h.length } else { 0 };
            self.stored_in += h.record_len() as u64;
            accepted.push(r);
            next += 1;
        }
        self.records_in += accepted.len() as u64;
        self.journal
            .append(&accepted)
            .context("append to journal")?;
        Ok(())
    }

    /// Whether enough is pending that the caller should commit before reading more.
    pub fn should_commit(&self) -> bool {
        self.uncommitted >= PENDING_LIMIT
    }

    /// Makes what was ingested durable (fsync), then applies it to the head images. Returns the
    /// durable seq to acknowledge.
    pub fn commit(&mut self) -> anyhow::Result<u64> {
        if self.journal.last_seq() == self.durable_seq {
            return Ok(self.durable_seq);
        }
        let before = self.journal.current_segment().first_seq;
        self.journal.sync().context("fsync journal")?;
        self.durable_seq = self.journal.last_seq();
        self.durable_time_ns = self.journal.last_time_ns();
        self.applier.durable(self.durable_seq);
        self.uncommitted = 0;
        if self.journal.current_segment().first_seq != before {
            // A segment was sealed: a good moment to checkpoint the head images.
            self.sync_heads()?;
        }
        Ok(self.durable_seq)
    }

    /// The seq the head images have reached (shared with retention).
    pub fn head_applied(&self) -> Arc<AtomicU64> {
        self.applier.applied()
    }

    /// Flushes the head images and records the seq they hold.
    pub fn sync_heads(&mut self) -> anyhow::Result<()> {
        self.applier.drain(self.durable_seq)?;
        self.mark_heads()
    }

    /// Flushes the head images (already at the durable seq) and records that seq.
    fn mark_heads(&mut self) -> anyhow::Result<()> {
        for f in &self.heads {
            f.sync_data()?;
        }
        self.dir.set_mark(
            "head",
            SeqMark {
                seq: self.durable_seq,
                time_ns: self.durable_time_ns,
            },
        )?;
        Ok(())
    }

    /// Hashes of the head image of `disk`, one per [`wire::HASH_CHUNK`].
    pub fn head_hashes(&self, disk: usize) -> io::Result<Vec<u128>> {
        self.applier.drain(self.durable_seq)?;
        let size = self.meta.volumes[disk].size;
        let file = &self.heads[disk];
        let chunk = wire::HASH_CHUNK;
        let zero_hash = wire::chunk_hash(&vec![0u8; chunk as usize]);
        let mut out = Vec::with_capacity(size.div_ceil(chunk) as usize);
        let mut buf = vec![0u8; chunk as usize];
        let mut next_data = 0u64;
        let mut off = 0u64;
        while off < size {
            let len = chunk.min(size - off) as usize;
            if next_data < off {
                next_data = seek_data(file, off)?.unwrap_or(u64::MAX);
            }
            if next_data >= off + len as u64 && len as u64 == chunk {
                out.push(zero_hash);
            } else {
                file.read_exact_at(&mut buf[..len], off)?;
                out.push(wire::chunk_hash(&buf[..len]));
            }
            off += len as u64;
        }
        Ok(out)
    }
}

/// A proxy must offer the volumes the group was stored with (names and sizes, in order).
pub fn check_volumes(dir: &GroupDir, meta: &GroupMeta, volumes: &[Volume]) -> anyhow::Result<()> {
    if meta.volumes != volumes {
        bail!(
            "group {} was stored with volumes {} but the proxy sends {}; \
             use another group name or remove {}",
            meta.name,
            describe(&meta.volumes),
            describe(volumes),
            dir.path.display()
        );
    }
    Ok(())
}

/// Applies one checked record to the head images.
fn apply_record(heads: &[File], r: &RecordRef<'_>) -> io::Result<()> {
    let h = &r.header;
    let file = &heads[usize::from(h.disk)];
    match h.kind {
        Kind::Write | Kind::SyncData => {
            let data = r.payload().map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("seq {}: {e}", h.seq))
            })?;
            file.write_all_at(&data, h.offset)
        }
        Kind::Zero | Kind::Trim => punch(file, h.offset, h.length),
        _ => Ok(()),
    }
}

fn describe(volumes: &[Volume]) -> String {
    volumes
        .iter()
        .map(|v| format!("{} ({} bytes)", v.name, v.size))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Zeroes a range by punching a hole; writes zeroes where the file system cannot.
pub fn punch(file: &File, offset: u64, length: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags as F};
    let mode = F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE;
    if fallocate(file.as_raw_fd(), mode, offset as i64, length as i64).is_ok() {
        return Ok(());
    }
    let zeroes = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < length {
        let n = (length - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The next offset at or after `off` that holds data, or None when only a hole follows.
fn seek_data(file: &File, off: u64) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a valid descriptor owned by `file`; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Ok(Some(off)),
        };
    }
    Ok(Some(r as u64))
}
