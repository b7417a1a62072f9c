//! The hashes a proxy's delta sync compares: one per 256 KiB chunk of each volume, as of the
//! durable seq. No image of the latest state is kept for them: ingest only notes which chunks
//! each record changes (from its header), and a changed chunk is hashed from the point itself
//! (base image + journal records, read as restore reads a point) when a proxy asks for hashes.
//! Nothing but check, append, fsync and ack is on the ingest path.
//!
//! Made hashes are kept (`head/<volume>.sums`, then `head.json` naming their seq) with the
//! chunks changed since listed as stale, so a restarted replicator hashes again only what
//! changed after them. That file is a cache: when it is missing, damaged or older than the base
//! (retention folded the records that came after it), the base's checksums serve instead,
//! with every chunk a record after the base changed hashed again.
//!
//! A view of the latest point is safe against a retention fold running meanwhile: a fold
//! rewrites only base bytes that records after the loaded base cover, and those bytes are read
//! from the records (whose segments stay open). A fold that finished between reading
//! `base.json` and listing the segments shows as a gap in seqs, and the view is built again.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use journal::pit::{DiskMap, History, Sealed, Segment, Source};
use journal::read::SegmentFile;
use journal::segment::IndexEntry;
use journal::store::{Access, GroupDir, GroupMeta, SeqMark};
use journal::sums::{self, ChunkSet, Sums};
use journal::wire;
use journal::writer::JournalWriter;
use tracing::{info, warn};

/// Sent for a chunk whose hash could not be made (one of its records does not read back):
/// no proxy's chunk hashes to it in practice, so the proxy sends the chunk again.
const UNKNOWN_HASH: u128 = 0;

/// Attempts at building a view while retention folds under it.
const VIEW_ATTEMPTS: usize = 5;

/// Each volume's chunk hashes as of the durable seq, made on demand.
#[derive(Debug)]
pub struct Hashes {
    /// Per volume: every chunk's hash, current but for the chunks in `changed`.
    sums: Vec<Sums>,
    /// Per volume: chunks a record changed since their hash in `sums` was made.
    changed: Vec<ChunkSet>,
}

impl Hashes {
    /// The hashes of a group opened for writing: the kept ones when they are usable, else the
    /// base's; the chunks that records after them changed are marked to be hashed again.
    pub fn open(
        dir: &GroupDir,
        meta: &GroupMeta,
        base: SeqMark,
        journal: &JournalWriter,
    ) -> Hashes {
        let last = journal.last_seq();
        let mut sums = Vec::new();
        let mut changed = Vec::new();
        let mut since = Vec::new();
        for v in &meta.volumes {
            let kept = dir.sums("head", &v.name).and_then(|s| {
                if s.size == v.size && s.seq >= base.seq && s.seq <= last {
                    Ok(s)
                } else {
                    Err(io::Error::other(format!(
                        "they are of seq {} (base {}, journal end {last})",
                        s.seq, base.seq
                    )))
                }
            });
            let (s, set) = match kept {
                Ok(s) => {
                    let stale = s.stale();
                    (s, stale)
                }
                Err(why) => {
                    if dir.mark("head").is_ok_and(|m| m.seq > 0) {
                        info!(
                            group = %meta.name,
                            "kept hashes of {} are not usable ({why}): the base's checksums \
                             serve, and chunks changed since the base are hashed when asked",
                            v.name
                        );
                    }
                    base_sums(dir, &v.name, v.size, base.seq)
                }
            };
            since.push(s.seq);
            sums.push(s);
            changed.push(set);
        }
        let mut hashes = Hashes { sums, changed };
        let oldest = since.iter().copied().min().unwrap_or(last);
        if let Err(e) = each_entry_after(dir, journal, oldest, |e| {
            if since.get(usize::from(e.disk)).is_some_and(|&s| e.seq > s) {
                hashes.note(e.disk, e.kind, e.offset, e.length);
            }
        }) {
            warn!(
                group = %meta.name,
                "the journal's indexes could not be read ({e}): every chunk is hashed again when asked"
            );
            for (set, v) in hashes.changed.iter_mut().zip(&meta.volumes) {
                *set = ChunkSet::all(v.size);
            }
        }
        hashes
    }

    /// A record was appended: the chunks it changes are to be hashed again.
    pub fn note(&mut self, disk: u16, kind: journal::record::Kind, offset: u64, length: u64) {
        if kind.changes_data() && length > 0 {
            if let Some(set) = self.changed.get_mut(usize::from(disk)) {
                set.mark(offset, length);
            }
        }
    }

    /// Hands every volume's hashes as of `durable` (the journal's end) to `send`, as
    /// (disk, first chunk, hashes) in pieces of at most [`wire::HASHES_PER_FRAME`] and at
    /// least twice a second, so that a long rehash keeps the link alive. Changed chunks are
    /// hashed from the point as they come; then the hashes are kept.
    pub fn send(
        &mut self,
        dir: &GroupDir,
        meta: &GroupMeta,
        journal: &JournalWriter,
        durable: SeqMark,
        mut send: impl FnMut(u16, u64, &[u128]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut point = if self.changed.iter().any(|c| !c.is_empty()) {
            Some(Point::open(dir, meta, durable.seq, Some(journal))?)
        } else {
            None
        };
        let mut buf = Vec::new();
        for (d, v) in meta.volumes.iter().enumerate() {
            let chunks = sums::chunks(v.size);
            let mut frames = Frames::new(d as u16, chunks);
            for c in 0..chunks {
                let h = match point.as_mut().filter(|_| self.changed[d].contains(c)) {
                    None => self.sums[d].get(c),
                    Some(p) => match p.hash(d, c, v.size, &mut buf) {
                        Ok(h) => {
                            self.sums[d].set(c, h);
                            self.changed[d].remove(c);
                            h
                        }
                        Err(e) => {
                            warn!(
                                group = %meta.name,
                                "chunk {c} of {} cannot be hashed: {e}; the proxy sends it again",
                                v.name
                            );
                            UNKNOWN_HASH
                        }
                    },
                };
                frames.push(c, h, &mut send)?;
            }
        }
        drop(point);
        if let Err(e) = self.keep(dir, meta, durable) {
            warn!(group = %meta.name, "keeping the hashes failed: {e}; they are made again after a restart");
        }
        Ok(())
    }

    /// Writes the hashes, as of `mark` (the durable seq), with the chunks changed since listed
    /// as stale, then `head.json` naming the seq.
    pub fn keep(&self, dir: &GroupDir, meta: &GroupMeta, mark: SeqMark) -> io::Result<()> {
        make_head_dir(dir)?;
        for ((v, s), changed) in meta.volumes.iter().zip(&self.sums).zip(&self.changed) {
            let mut s = s.clone();
            for c in changed.clone().take() {
                s.set_stale(c);
            }
            s.seq = mark.seq;
            dir.set_sums("head", &v.name, &s)?;
        }
        dir.set_mark("head", mark)
    }
}

/// Hashes of one volume gathered into frames: sent when a frame is full, the volume ends, or
/// half a second passed since the last one.
struct Frames {
    disk: u16,
    chunks: u64,
    first: u64,
    part: Vec<u128>,
    last_sent: Instant,
}

impl Frames {
    fn new(disk: u16, chunks: u64) -> Frames {
        Frames {
            disk,
            chunks,
            first: 0,
            part: Vec::with_capacity(wire::HASHES_PER_FRAME),
            last_sent: Instant::now(),
        }
    }

    /// Adds chunk `c`'s hash (chunks come in order).
    fn push(
        &mut self,
        c: u64,
        hash: u128,
        send: &mut impl FnMut(u16, u64, &[u128]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.part.push(hash);
        let full = self.part.len() == wire::HASHES_PER_FRAME || c + 1 == self.chunks;
        if full || self.last_sent.elapsed() >= Duration::from_millis(500) {
            send(self.disk, self.first, &self.part)?;
            self.first = c + 1;
            self.part.clear();
            self.last_sent = Instant::now();
        }
        Ok(())
    }
}

/// Makes the kept hashes the base's (`replicator repair`: records after the base may be gone):
/// chunks that records after it change are hashed again when asked. A base whose checksums do
/// not read leaves no kept hashes (then every chunk is).
pub fn reset(dir: &GroupDir, meta: &GroupMeta, base: SeqMark) -> io::Result<()> {
    make_head_dir(dir)?;
    for v in &meta.volumes {
        match dir.sums("base", &v.name) {
            Ok(s) => dir.set_sums("head", &v.name, &s)?,
            Err(_) => {
                match std::fs::remove_file(dir.path.join("head").join(format!("{}.sums", v.name))) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
    }
    dir.set_mark("head", base)
}

/// Where the hashes are kept (a store rebuilt from a bucket has no such directory yet).
fn make_head_dir(dir: &GroupDir) -> io::Result<()> {
    let head = dir.path.join("head");
    if !head.is_dir() {
        std::fs::create_dir_all(&head)?;
        journal::store::sync_dir(&dir.path)?;
    }
    Ok(())
}

/// The base's checksums and no changed chunk; or, when they do not read, none and every chunk
/// changed (each is hashed from the point when asked).
fn base_sums(dir: &GroupDir, volume: &str, size: u64, base_seq: u64) -> (Sums, ChunkSet) {
    match dir.sums("base", volume) {
        Ok(s) if s.size == size && s.seq == base_seq && !s.has_stale() => (s, ChunkSet::new(size)),
        other => {
            if let Err(e) = other {
                warn!("base checksums of {volume} do not read ({e}): every chunk is hashed when asked");
            }
            (Sums::zeroes(size, base_seq), ChunkSet::all(size))
        }
    }
}

/// Calls `f` with the index entry of every record after `after`, in seq order: sealed
/// segments from their indexes, the one being written from the writer.
fn each_entry_after(
    dir: &GroupDir,
    journal: &JournalWriter,
    after: u64,
    mut f: impl FnMut(&IndexEntry),
) -> io::Result<()> {
    let segments = dir.segments()?;
    let current = journal.current_segment();
    for (i, seg) in segments.iter().enumerate() {
        // A segment ends where the next begins: skip those entirely at or before `after`.
        if segments
            .get(i + 1)
            .is_some_and(|n| n.first_seq <= after + 1)
        {
            continue;
        }
        if seg.path == current.path {
            journal
                .current_entries()
                .iter()
                .filter(|e| e.seq > after)
                .for_each(&mut f);
        } else {
            seg.load_index()?
                .0
                .iter()
                .filter(|e| e.seq > after)
                .for_each(&mut f);
        }
    }
    Ok(())
}

/// A point, read as restore reads one: the source map of each disk, the base images and the
/// segments (open descriptors: a segment retention deletes stays readable).
pub struct Point {
    maps: Vec<DiskMap>,
    bases: Vec<File>,
    segments: Vec<SegmentFile>,
    pieces: Vec<(u64, u64, Source)>,
    record: Vec<u8>,
    /// The last payload read, by (segment, position): a large record spans several chunks.
    payload: Option<((u32, u64), Vec<u8>)>,
}

impl Point {
    /// The point at `seq`; `writer`: the journal's writing end, which knows the entries of the
    /// segment being written (else that segment is scanned).
    pub fn open(
        dir: &GroupDir,
        meta: &GroupMeta,
        seq: u64,
        writer: Option<&JournalWriter>,
    ) -> io::Result<Point> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Point::try_open(dir, meta, seq, writer) {
                Ok(p) => return Ok(p),
                // A retention fold moved the base and removed a segment meanwhile.
                Err(e) if attempt < VIEW_ATTEMPTS => {
                    tracing::debug!("view of seq {seq} changed while it was built ({e}); again")
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_open(
        dir: &GroupDir,
        meta: &GroupMeta,
        seq: u64,
        writer: Option<&JournalWriter>,
    ) -> io::Result<Point> {
        let base = dir.mark("base")?;
        let mut sealed = Vec::new();
        for seg in dir.segments()? {
            let entries = match writer {
                Some(w) if w.current_segment().path == seg.path => w.current_entries().to_vec(),
                _ => seg.load_index()?.0,
            };
            if entries.last().is_none_or(|e| e.seq <= base.seq) {
                continue;
            }
            let file = SegmentFile::open(&seg.path).map_err(io::Error::from)?;
            let segment = Segment {
                path: seg.path,
                first_seq: seg.first_seq,
                entries,
                file,
            };
            // Bookmark names are not needed: none is read.
            let bookmarks = Some(Vec::new());
            sealed.push(Sealed { segment, bookmarks });
        }
        let history = History::sealed(meta.clone(), base, sealed)?;
        if history.last_seq < seq || seq < base.seq {
            return Err(io::Error::other(format!(
                "the journal holds seqs {}..={}, not {seq}",
                base.seq, history.last_seq
            )));
        }
        let bases = meta
            .volumes
            .iter()
            .map(|v| dir.open_image("base", &v.name, Access::Read))
            .collect::<io::Result<Vec<_>>>()?;
        let segments = history.segments.iter().map(|s| s.file.clone()).collect();
        Ok(Point {
            maps: history.view(seq),
            bases,
            segments,
            pieces: Vec::new(),
            record: Vec::new(),
            payload: None,
        })
    }

    /// The hash of chunk `c` of disk `d` (of `size` bytes) at the point.
    pub fn hash(&mut self, d: usize, c: u64, size: u64, buf: &mut Vec<u8>) -> io::Result<u128> {
        let r = sums::chunk_range(c, size);
        buf.resize((r.end - r.start) as usize, 0);
        self.maps[d].lookup(r.start, r.end - r.start, &mut self.pieces);
        for &(at, len, source) in &self.pieces {
            let out = &mut buf[(at - r.start) as usize..(at - r.start + len) as usize];
            match source {
                Source::Base => self.bases[d].read_exact_at(out, at)?,
                Source::Zero => out.fill(0),
                Source::Record {
                    segment,
                    len: record_len,
                    pos,
                    skip,
                } => {
                    if self
                        .payload
                        .as_ref()
                        .is_none_or(|(at, _)| *at != (segment, pos))
                    {
                        let file = self
                            .segments
                            .get(segment as usize)
                            .ok_or_else(|| io::Error::other("the view names an unknown segment"))?;
                        let rec = file
                            .read_at(pos, u64::from(record_len), None, &mut self.record)
                            .map_err(io::Error::from)?;
                        let data = file.payload(pos, &rec).map_err(io::Error::other)?;
                        self.payload = Some(((segment, pos), data.into_owned()));
                    }
                    let data = self.payload.as_ref().map_or(&[][..], |(_, d)| d);
                    let from = skip as usize;
                    let piece = data.get(from..from + len as usize).ok_or_else(|| {
                        io::Error::other("a record is shorter than the view says")
                    })?;
                    out.copy_from_slice(piece);
                }
            }
        }
        Ok(wire::chunk_hash(buf))
    }
}

#[cfg(test)]
mod tests;
