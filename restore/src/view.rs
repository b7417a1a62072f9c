//! A disk as it was at one point: reads follow the source map built from the segment indexes
//! (newest record at or before the point, else the base). Every record is checked (record crc,
//! then payload crc after decompression) before any byte of it is served; a bad one fails the
//! read with EIO and a log line naming it. With an overlay, writes go to a sparse file of the
//! export's own, never to the store.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use journal::pit::{DiskMap, History, Source};
use journal::read::SegmentFile;
use journal::store::GroupDir;
use journal::sums::{ChunkSet, Sums};
use nbd_server::{BlockBackend, Capabilities, Extent, ZeroError, ZeroMode};
use tracing::error;

/// Decompressed, checked payloads kept for reuse (bytes).
const CACHE_BYTES: usize = 64 << 20;
/// Overlay granularity.
const BLOCK: u64 = 4096;

/// A record's place: (segment, byte position).
type RecordAt = (u32, u64);

#[derive(Debug)]
struct Cache {
    entries: HashMap<RecordAt, Arc<Vec<u8>>>,
    /// insertion order, for eviction
    order: std::collections::VecDeque<RecordAt>,
    bytes: usize,
}

/// The segments a set of views reads, as the history opened them: open descriptors keep a
/// segment readable even if retention removes it meanwhile.
#[derive(Debug)]
pub struct Sources {
    segments: Vec<SegmentFile>,
    cache: Mutex<Cache>,
}

impl Sources {
    pub fn new(history: &History) -> Arc<Sources> {
        let segments = history.segments.iter().map(|s| s.file.clone()).collect();
        Arc::new(Sources {
            segments,
            cache: Mutex::new(Cache {
                entries: HashMap::new(),
                order: Default::default(),
                bytes: 0,
            }),
        })
    }

    /// The record at `pos` of segment `segment` will be read soon (unless cached already).
    fn prefetch(&self, segment: u32, pos: u64, len: u32) {
        let cached = {
            let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            c.entries.contains_key(&(segment, pos))
        };
        if let (false, Some(f)) = (cached, self.segments.get(segment as usize)) {
            f.prefetch(pos, u64::from(len));
        }
    }

    /// The checked payload of the record at `pos` of segment `segment` (`len` bytes long with
    /// its header, as the index says): one read, then the record and payload checksums.
    fn payload(&self, segment: u32, pos: u64, len: u32) -> io::Result<Arc<Vec<u8>>> {
        {
            let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(data) = c.entries.get(&(segment, pos)) {
                return Ok(data.clone());
            }
        }
        let file = self.segments.get(segment as usize).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a view names an unknown segment",
            )
        })?;
        let mut bytes = Vec::new();
        let data = file
            .read_at(pos, u64::from(len), None, &mut bytes)
            .map_err(io::Error::from)
            .and_then(|r| Ok(file.payload(pos, &r)?.into_owned()))
            .map_err(|e| {
                error!("{e}; this read fails with EIO and no byte of the record is served");
                io::Error::from_raw_os_error(libc::EIO)
            })?;
        let data = Arc::new(data);
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.entries.insert((segment, pos), data.clone()).is_none() {
            c.bytes += data.len();
            c.order.push_back((segment, pos));
        }
        // First in, first out: O(1) per insertion.
        while c.bytes > CACHE_BYTES {
            let Some(oldest) = c.order.pop_front() else {
                break;
            };
            if let Some(d) = c.entries.remove(&oldest) {
                c.bytes -= d.len();
            }
        }
        Ok(data)
    }
}

/// A base image's bytes, checked against its checksums ([`journal::sums`]) before any is
/// served: each chunk once, the first time a read needs it.
#[derive(Debug)]
pub struct BaseCheck {
    dir: GroupDir,
    volume: String,
    size: u64,
    sums: Mutex<Sums>,
    verified: Mutex<ChunkSet>,
}

impl BaseCheck {
    pub fn new(dir: GroupDir, volume: &str, size: u64, sums: Sums) -> BaseCheck {
        BaseCheck {
            dir,
            volume: volume.to_owned(),
            size,
            sums: Mutex::new(sums),
            verified: Mutex::new(ChunkSet::new(size)),
        }
    }

    /// Reads `out.len()` bytes at `at` of the base, after checking every chunk they lie in.
    fn read(&self, base: &File, at: u64, out: &mut [u8]) -> io::Result<()> {
        for c in journal::sums::chunks_of(at, out.len() as u64) {
            let done = self
                .verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(c);
            if !done {
                self.verify(base, c)?;
            }
        }
        base.read_exact_at(out, at)
    }

    /// Checks one chunk. A retention fold may be rewriting chunks (bytes this view reads from
    /// records, never the ones it reads from the base): then the sums move on; reload them, and
    /// wait for a fold under way to finish, before calling a mismatch damage.
    fn verify(&self, base: &File, c: u64) -> io::Result<()> {
        let mut buf = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let h = journal::read::hash_chunk(base, c, self.size, &mut buf)?;
            let mut sums = self.sums.lock().unwrap_or_else(|p| p.into_inner());
            if sums.get(c) != h {
                if let Ok(fresh) = self.dir.sums("base", &self.volume) {
                    *sums = fresh;
                }
            }
            if sums.get(c) == h {
                self.verified
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(c);
                return Ok(());
            }
            drop(sums);
            // Worth waiting only for a fold a running replicator is doing.
            let folding = self.dir.fold_mark().ok().flatten().is_some();
            let finishing = folding && crate::open::running_replicator(&self.dir).is_some();
            if finishing && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            let r = journal::sums::chunk_range(c, self.size);
            error!(
                "base image of volume {} in {}: chunk {c} (bytes {}..{}) does not match its checksum{}; \
                 reads of it fail with EIO (run `replicator check`)",
                self.volume,
                self.dir.path.display(),
                r.start,
                r.end,
                if folding {
                    " while a retention fold is unfinished (start the replicator to finish it)"
                } else {
                    ""
                }
            );
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
    }
}

/// Where a view reads the base image's bytes.
#[derive(Debug)]
pub enum Base {
    /// The store's image file, each chunk checked at its first read.
    Local { file: File, check: BaseCheck },
    /// A bucket's chunk objects, checked block by block as they are fetched.
    Bucket(crate::remote::RemoteBase),
}

impl Base {
    fn prefetch(&self, at: u64, len: u64) {
        if let Base::Bucket(b) = self {
            b.prefetch(at, len);
        }
    }

    fn read(&self, at: u64, out: &mut [u8]) -> io::Result<()> {
        match self {
            Base::Local { file, check } => check.read(file, at, out),
            Base::Bucket(b) => b.read(at, out),
        }
    }

    /// Whether the base holds data at `pos` (else a hole), and where that run ends (at most
    /// `end`).
    fn data_at(&self, pos: u64, end: u64) -> (bool, u64) {
        match self {
            Base::Local { file, .. } => {
                let data = seek(file, pos, libc::SEEK_DATA).unwrap_or(end).min(end);
                if data > pos {
                    return (false, data);
                }
                let hole = seek(file, pos, libc::SEEK_HOLE).unwrap_or(end).min(end);
                (true, hole.max(pos + 1))
            }
            Base::Bucket(b) => {
                let (data, run_end) = b.data_at(pos);
                (data, run_end.min(end).max(pos + 1))
            }
        }
    }
}

/// One disk at one point.
#[derive(Debug)]
pub struct PointView {
    size: u64,
    map: DiskMap,
    base: Base,
    sources: Arc<Sources>,
    overlay: Option<Overlay>,
}

#[derive(Debug)]
struct Overlay {
    file: File,
    /// One bit per block held by the overlay.
    written: Mutex<Vec<u64>>,
}

impl PointView {
    pub fn new(
        size: u64,
        map: DiskMap,
        base: Base,
        sources: Arc<Sources>,
        overlay: Option<File>,
    ) -> io::Result<PointView> {
        let overlay = match overlay {
            Some(file) => {
                file.set_len(size)?;
                Some(Overlay {
                    file,
                    written: Mutex::new(vec![0; size.div_ceil(BLOCK).div_ceil(64) as usize]),
                })
            }
            None => None,
        };
        Ok(PointView {
            size,
            map,
            base,
            sources,
            overlay,
        })
    }

    /// Reads the point's own bytes (not the overlay's).
    pub fn read_point(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut pieces = Vec::new();
        self.map.lookup(offset, buf.len() as u64, &mut pieces);
        if pieces.len() > 1 {
            // A store in a bucket fetches what the read needs at once, not piece by piece.
            for &(at, len, source) in &pieces {
                match source {
                    Source::Base => self.base.prefetch(at, len),
                    Source::Record {
                        segment, len, pos, ..
                    } => self.sources.prefetch(segment, pos, len),
                    Source::Zero => {}
                }
            }
        }
        for (at, len, source) in pieces {
            let out = &mut buf[(at - offset) as usize..(at - offset + len) as usize];
            match source {
                Source::Base => self.base.read(at, out)?,
                Source::Zero => out.fill(0),
                Source::Record {
                    segment,
                    len: record_len,
                    pos,
                    skip,
                } => {
                    let data = self.sources.payload(segment, pos, record_len)?;
                    let from = skip as usize;
                    out.copy_from_slice(&data[from..from + len as usize]);
                }
            }
        }
        Ok(())
    }

    /// Pieces of the point with their sources (for materialize: holes stay holes).
    pub fn pieces(&self, offset: u64, length: u64, out: &mut Vec<(u64, u64, Source)>) {
        self.map.lookup(offset, length, out);
    }

    fn block_written(&self, written: &[u64], block: u64) -> bool {
        written[(block / 64) as usize] & (1 << (block % 64)) != 0
    }
}

impl BlockBackend for PointView {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let writable = self.overlay.is_some();
        Capabilities {
            read_only: !writable,
            trim: writable,
            write_zeroes: writable,
            fast_zero: false,
            cache: false,
            multi_conn: true,
            rotational: false,
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(ov) = &self.overlay else {
            return self.read_point(offset, buf);
        };
        // Runs of blocks from the overlay or from the point.
        let written = ov.written.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let in_overlay = self.block_written(&written, at / BLOCK);
            let mut run_end = ((at / BLOCK) + 1) * BLOCK;
            while run_end < end && self.block_written(&written, run_end / BLOCK) == in_overlay {
                run_end += BLOCK;
            }
            let run_end = run_end.min(end);
            let out = &mut buf[(at - offset) as usize..(run_end - offset) as usize];
            if in_overlay {
                ov.file.read_exact_at(out, at)?;
            } else {
                self.read_point(at, out)?;
            }
            at = run_end;
        }
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let Some(ov) = &self.overlay else {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        };
        if data.is_empty() {
            return Ok(());
        }
        // Whole blocks: partial ones are filled from the point first. One writer at a time.
        let mut written = ov.written.lock().unwrap_or_else(|p| p.into_inner());
        let first = offset / BLOCK;
        let last = (offset + data.len() as u64 - 1) / BLOCK;
        for block in [first, last] {
            let start = block * BLOCK;
            let len = BLOCK.min(self.size - start) as usize;
            let covered = offset <= start && offset + data.len() as u64 >= start + len as u64;
            if !covered && !self.block_written(&written, block) {
                let mut b = vec![0u8; len];
                self.read_point(start, &mut b)?;
                ov.file.write_all_at(&b, start)?;
            }
        }
        ov.file.write_all_at(data, offset)?;
        for block in first..=last {
            written[(block / 64) as usize] |= 1 << (block % 64);
        }
        drop(written);
        if fua {
            ov.file.sync_data()?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<(), ZeroError> {
        if mode.fast_only {
            return Err(ZeroError::NotFast);
        }
        let zeroes = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(zeroes.len() as u64) as usize;
            self.write(offset + done, &zeroes[..n], fua).await?;
            done += n as u64;
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(
            offset,
            length,
            ZeroMode {
                no_hole: false,
                fast_only: false,
            },
            fua,
        )
        .await
        .map_err(|e| match e {
            ZeroError::Io(e) => e,
            ZeroError::NotFast => io::Error::from_raw_os_error(libc::EIO),
        })
    }

    async fn flush(&self) -> io::Result<()> {
        if let Some(ov) = &self.overlay {
            ov.file.sync_data()?;
        }
        Ok(())
    }

    async fn cache(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }

    async fn extents(
        &self,
        offset: u64,
        length: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        if self.overlay.is_some() {
            // Writable: report data (always true) rather than track the overlay here.
            out.push(Extent {
                length,
                hole: false,
                zero: false,
            });
            return Ok(());
        }
        let mut pieces = Vec::new();
        self.map.lookup(offset, length, &mut pieces);
        for (at, len, source) in pieces {
            let mut push = |length: u64, hole: bool| match out.last_mut() {
                Some(last) if last.hole == hole && last.zero == hole => last.length += length,
                _ => out.push(Extent {
                    length,
                    hole,
                    zero: hole,
                }),
            };
            match source {
                Source::Zero => push(len, true),
                Source::Record { .. } => push(len, false),
                Source::Base => {
                    // Holes of the base image are holes of the point (written by no record).
                    let mut pos = at;
                    let end = at + len;
                    while pos < end {
                        let (data, run_end) = self.base.data_at(pos, end);
                        push(run_end - pos, !data);
                        pos = run_end;
                    }
                }
            }
            if out.len() >= max {
                out.truncate(max);
                break;
            }
        }
        Ok(())
    }
}

/// lseek(SEEK_DATA / SEEK_HOLE); None past the end or on error.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> Option<u64> {
    // SAFETY: lseek on a descriptor owned by `file`; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}
