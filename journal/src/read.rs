//! Reading records back from segment files: the one place that reads, checks and replays them.
//!
//! Every reader of the journal goes through here: the replicator's retention folds and the
//! hashing of changed chunks, `replicator status` and `check`, restore's views and history.
//! A record is trusted only after its record crc, its seq and its length (as the index
//! expects them) are checked; a data record's payload also after decompression against
//! its own crc. A failure names its place: file, byte and seq ([`Corrupt`]).

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::record::{self, Kind, RecordRef, HEADER_LEN};
use crate::segment::IndexEntry;
use crate::store::SegmentPath;

/// A record that is not what its place promises, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt record seq {seq} at byte {pos} of {}: {why}", path.display())]
pub struct Corrupt {
    pub path: PathBuf,
    pub pos: u64,
    /// The seq expected at this place.
    pub seq: u64,
    pub why: String,
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Corrupt(#[from] Corrupt),
}

impl From<ReadError> for io::Error {
    fn from(e: ReadError) -> io::Error {
        match e {
            ReadError::Io { source, path } => {
                io::Error::new(source.kind(), format!("read {}: {source}", path.display()))
            }
            ReadError::Corrupt(c) => io::Error::new(io::ErrorKind::InvalidData, c),
        }
    }
}

impl From<Corrupt> for io::Error {
    fn from(c: Corrupt) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, c)
    }
}

/// Bytes a segment is read from: a file, or something else that reads at offsets (restore
/// reads segments in a bucket through a cache of range GETs).
pub trait Blob: Send + Sync + std::fmt::Debug {
    /// Reads up to `buf.len()` bytes at `pos`; fewer only at the end.
    fn read_up_to(&self, buf: &mut [u8], pos: u64) -> io::Result<usize>;
    /// Bytes `pos..pos + len` will be read soon (a remote blob starts fetching them).
    fn prefetch(&self, _pos: u64, _len: u64) {}
}

impl Blob for File {
    fn read_up_to(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        read_up_to(self, buf, pos)
    }
}

/// A segment file open for reading. An open descriptor keeps the records readable even if
/// retention removes the file meanwhile.
#[derive(Debug, Clone)]
pub struct SegmentFile {
    file: std::sync::Arc<dyn Blob>,
    path: PathBuf,
}

impl SegmentFile {
    pub fn open(path: &Path) -> Result<SegmentFile, ReadError> {
        let file = File::open(path).map_err(|source| ReadError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(SegmentFile {
            file: std::sync::Arc::new(file),
            path: path.to_owned(),
        })
    }

    /// A segment read from `blob`; `path` names it in errors.
    pub fn from_blob(path: PathBuf, blob: std::sync::Arc<dyn Blob>) -> SegmentFile {
        SegmentFile { file: blob, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record of `len` bytes at `pos` will be read soon.
    pub fn prefetch(&self, pos: u64, len: u64) {
        self.file.prefetch(pos, len);
    }

    /// The record an index entry names: one read, then its checks (crc, seq, length).
    pub fn read<'b>(
        &self,
        entry: &IndexEntry,
        buf: &'b mut Vec<u8>,
    ) -> Result<RecordRef<'b>, ReadError> {
        let len = HEADER_LEN as u64 + u64::from(entry.stored_len);
        self.read_at(entry.pos, len, Some(entry.seq), buf)
    }

    /// The record of `len` bytes at `pos`, which should hold `seq` (when given).
    pub fn read_at<'b>(
        &self,
        pos: u64,
        len: u64,
        seq: Option<u64>,
        buf: &'b mut Vec<u8>,
    ) -> Result<RecordRef<'b>, ReadError> {
        let corrupt = |seq: u64, why: String| Corrupt {
            path: self.path.clone(),
            pos,
            seq,
            why,
        };
        if len < HEADER_LEN as u64 || len > HEADER_LEN as u64 + u64::from(record::MAX_STORED) {
            return Err(corrupt(seq.unwrap_or(0), format!("a record of {len} bytes")).into());
        }
        buf.resize(len as usize, 0);
        match self.file.read_up_to(buf, pos) {
            Ok(n) if n == buf.len() => {}
            Ok(_) => {
                return Err(
                    corrupt(seq.unwrap_or(0), "the file ends inside the record".into()).into(),
                )
            }
            Err(source) => {
                return Err(ReadError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        }
        let expected = seq.unwrap_or_else(|| record::seq_of(buf));
        let r = match record::parse(buf) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(corrupt(expected, "record is cut short".into()).into()),
            Err(e) => return Err(corrupt(expected, e.to_string()).into()),
        };
        if r.header.record_len() as u64 != len {
            return Err(corrupt(expected, "its length differs from the index".into()).into());
        }
        if r.header.seq != expected {
            return Err(corrupt(expected, format!("found seq {} there", r.header.seq)).into());
        }
        Ok(r)
    }

    /// A data record's payload, decompressed and checked against its own crc.
    pub fn payload<'b>(&self, pos: u64, r: &RecordRef<'b>) -> Result<Cow<'b, [u8]>, Corrupt> {
        r.payload().map_err(|e| Corrupt {
            path: self.path.clone(),
            pos,
            seq: r.header.seq,
            why: e.to_string(),
        })
    }
}

/// Where replayed records go: disks as files (base images, by retention folds) or in memory
/// (tests).
pub trait Apply {
    fn write(&mut self, disk: u16, offset: u64, data: &[u8]) -> io::Result<()>;
    fn zero(&mut self, disk: u16, offset: u64, length: u64) -> io::Result<()>;
}

/// Image files, one per disk; zeroing punches holes. Large aligned writes (a 1 MiB guest
/// write, a resync chunk) go around the page cache through an `O_DIRECT` twin of each file:
/// replaying a stream into images wrote every byte into fresh page-cache pages,
/// which cost the replicator more CPU than anything else under 1 MiB writes
/// (`copy_folio_from_iter_atomic`). Small writes stay buffered (a direct write waits for the
/// device, and 4 KiB ones would make a fold slow). The kernel keeps both kinds
/// coherent (a direct write flushes and drops cached pages of its range first).
#[derive(Debug)]
pub struct Images {
    files: Vec<File>,
    /// The same files opened `O_DIRECT` (None where refused).
    direct: Vec<Option<File>>,
    buf: crate::append::AlignedBuf,
}

/// Writes at least this large, block-aligned in offset and length, are written direct.
pub const DIRECT_MIN: usize = 256 * 1024;

impl Images {
    pub fn new(files: &[File]) -> io::Result<Images> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let files = files
            .iter()
            .map(File::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        let direct = files
            .iter()
            .map(|f| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
                    .ok()
            })
            .collect();
        Ok(Images {
            files,
            direct,
            buf: Default::default(),
        })
    }

    fn file(&self, disk: u16) -> io::Result<&File> {
        self.files.get(usize::from(disk)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a record names disk {disk} of {}", self.files.len()),
            )
        })
    }

    /// Writes `data` direct if it qualifies; false when it must go through the page cache.
    fn write_direct(&mut self, disk: u16, offset: u64, data: &[u8]) -> io::Result<bool> {
        let block = crate::append::BLOCK;
        let aligned = offset.is_multiple_of(block as u64) && data.len().is_multiple_of(block);
        let d = usize::from(disk);
        let Some(direct) = self.direct.get(d).and_then(Option::as_ref) else {
            return Ok(false);
        };
        if !aligned || data.len() < DIRECT_MIN {
            return Ok(false);
        }
        self.buf.reserve(data.len());
        let buf = &mut self.buf.as_mut()[..data.len()];
        buf.copy_from_slice(data);
        match crate::append::write_all_at(direct, buf, offset) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct[d] = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

impl Apply for Images {
    fn write(&mut self, disk: u16, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.write_direct(disk, offset, data)? {
            return Ok(());
        }
        self.file(disk)?.write_all_at(data, offset)
    }

    fn zero(&mut self, disk: u16, offset: u64, length: u64) -> io::Result<()> {
        punch(self.file(disk)?, offset, length)
    }
}

/// In-memory disks (tests and models).
impl Apply for Vec<Vec<u8>> {
    fn write(&mut self, disk: u16, offset: u64, data: &[u8]) -> io::Result<()> {
        let d = &mut self[usize::from(disk)];
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, disk: u16, offset: u64, length: u64) -> io::Result<()> {
        self[usize::from(disk)][offset as usize..(offset + length) as usize].fill(0);
        Ok(())
    }
}

/// Why a record could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("apply record seq {seq}: {source}")]
    Target {
        seq: u64,
        #[source]
        source: io::Error,
    },
}

impl From<Corrupt> for ApplyError {
    fn from(c: Corrupt) -> ApplyError {
        ApplyError::Read(ReadError::Corrupt(c))
    }
}

impl From<ApplyError> for io::Error {
    fn from(e: ApplyError) -> io::Error {
        match e {
            ApplyError::Read(r) => r.into(),
            ApplyError::Target { seq, source } => {
                io::Error::new(source.kind(), format!("apply record seq {seq}: {source}"))
            }
        }
    }
}

/// Applies one record read from `file` at `pos`: a data record writes its checked payload,
/// zero and trim zero their range, the others change nothing.
pub fn apply(
    file: &SegmentFile,
    pos: u64,
    r: &RecordRef<'_>,
    to: &mut impl Apply,
) -> Result<(), ApplyError> {
    let h = &r.header;
    let target = |source| ApplyError::Target { seq: h.seq, source };
    match h.kind {
        Kind::Write | Kind::SyncData => {
            let data = file.payload(pos, r)?;
            to.write(h.disk, h.offset, &data).map_err(target)
        }
        Kind::Zero | Kind::Trim => to.zero(h.disk, h.offset, h.length).map_err(target),
        Kind::Flush | Kind::Bookmark | Kind::SyncBegin | Kind::SyncEnd => Ok(()),
    }
}

/// Replays the records of `segments` (with their index entries) whose seq is in `from..=to`,
/// in order: every one of them, or an error naming the first seq missing.
pub fn replay(
    segments: &[(SegmentPath, Vec<IndexEntry>)],
    from: u64,
    to: u64,
    target: &mut impl Apply,
) -> Result<(), ApplyError> {
    let mut buf = Vec::new();
    let mut next = from;
    let missing = |seq: u64, path: &Path, pos: u64| Corrupt {
        path: path.to_owned(),
        pos,
        seq,
        why: "no record of the journal has this seq (records are missing)".into(),
    };
    for (seg, entries) in segments {
        let start = next;
        let wanted: Vec<&IndexEntry> = entries
            .iter()
            .filter(|e| e.seq >= start && e.seq <= to)
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let file = SegmentFile::open(&seg.path)?;
        for e in wanted {
            if e.seq != next {
                return Err(missing(next, &seg.path, e.pos).into());
            }
            if e.kind.changes_data() {
                let r = file.read(e, &mut buf)?;
                apply(&file, e.pos, &r, target)?;
            }
            next += 1;
        }
    }
    if next <= to {
        let at = segments
            .last()
            .map_or_else(PathBuf::new, |(s, _)| s.path.clone());
        return Err(missing(next, &at, 0).into());
    }
    Ok(())
}

/// The hash of chunk `c` of an image of `size` bytes, read from `file` into `buf`.
pub fn hash_chunk(file: &File, c: u64, size: u64, buf: &mut Vec<u8>) -> io::Result<u128> {
    let r = crate::sums::chunk_range(c, size);
    buf.resize((r.end - r.start) as usize, 0);
    file.read_exact_at(buf, r.start)?;
    Ok(crate::wire::chunk_hash(buf))
}

/// The chunks of an image that do not match `sums`, leaving out those in `skip` (holes are
/// compared without reading).
pub fn verify_image(
    file: &File,
    sums: &crate::sums::Sums,
    size: u64,
    skip: &crate::sums::ChunkSet,
) -> io::Result<Vec<u64>> {
    let zero = crate::sums::zero_chunk_hash();
    let mut bad = Vec::new();
    let mut buf = Vec::new();
    let mut next_data = 0u64;
    for c in 0..crate::sums::chunks(size) {
        if skip.contains(c) {
            continue;
        }
        let r = crate::sums::chunk_range(c, size);
        if next_data < r.start {
            next_data = seek_data(file, r.start)?.unwrap_or(u64::MAX);
        }
        let hole = next_data >= r.end && r.end - r.start == crate::wire::HASH_CHUNK;
        let h = if hole {
            zero
        } else {
            hash_chunk(file, c, size, &mut buf)?
        };
        if sums.get(c) != h {
            bad.push(c);
        }
    }
    Ok(bad)
}

/// The next offset at or after `off` that holds data, or None when only a hole follows.
pub fn seek_data(file: &File, off: u64) -> io::Result<Option<u64>> {
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

/// Reads as much of `buf` as the file holds at `pos`.
fn read_up_to(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Zeroes a range by punching a hole; writes zeroes where the file system cannot.
pub fn punch(file: &File, offset: u64, length: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor owned by `file`; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, length as i64) };
    if r == 0 {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct and buffered writes over the same ranges, in any order, leave what an in-memory
    /// disk holds after the same writes (direct where the directory allows it, else buffered).
    #[test]
    fn images_written_direct_and_buffered_read_back_as_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 << 20;
        let path = dir.path().join("img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        let mut images = Images::new(std::slice::from_ref(&f)).unwrap();
        let mut model = vec![vec![0u8; size as usize]];
        let writes: [(u64, usize, u8); 7] = [
            (4096, 4096, 1),                // small: buffered
            (0, DIRECT_MIN, 2),             // direct over the buffered one
            (100, 5000, 3),                 // unaligned: buffered, inside the direct one
            (1 << 20, 1 << 20, 4),          // direct
            ((1 << 20) + 512, 8192, 5),     // unaligned over it
            (1 << 20, DIRECT_MIN * 2, 6),   // direct over both
            (3 << 20, DIRECT_MIN + 100, 7), // aligned start, odd length: buffered
        ];
        for (offset, len, byte) in writes {
            let data: Vec<u8> = (0..len).map(|i| byte ^ (i % 251) as u8).collect();
            images.write(0, offset, &data).unwrap();
            model.write(0, offset, &data).unwrap();
        }
        images.zero(0, 8192, 4096).unwrap();
        model.zero(0, 8192, 4096).unwrap();
        assert!(std::fs::read(&path).unwrap() == model[0]);
    }
}
