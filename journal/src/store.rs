//! The store on disk: the replicator writes it, restore and `replicator check` read it.
//!
//! ```text
//! STORE/<group>/group.json          name, volumes (name, size), format version
//!              base.json, base/<volume>.img   images with every record <= base_seq applied
//!              head.json, head/<volume>.img   images with every record <= head_seq applied
//!                                             (a cache of the latest state; rebuilt from the
//!                                             journal at start-up when behind)
//!              journal/<first seq, 20 digits>.seg   records, append-only
//!              journal/<first seq>.idx              index of a sealed segment
//!              status.json                          live state of `replicator serve`
//! ```
//!
//! Metadata files are replaced atomically (write, fsync, rename, fsync the directory).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::segment::{self, IndexEntry, Scan, SegmentHeader, SEGMENT_HEADER_LEN};
use crate::wire::Volume;

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    pub format: u32,
    pub name: String,
    pub volumes: Vec<Volume>,
    pub created_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SeqMark {
    pub seq: u64,
    /// Time of the record at `seq` (0 when none).
    pub time_ns: u64,
}

/// A group's directory in the store.
#[derive(Debug, Clone)]
pub struct GroupDir {
    pub path: PathBuf,
}

/// A group name is used as a directory name: keep it to a safe alphabet.
pub fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The groups found in a store directory, sorted by name.
pub fn list_groups(store: &Path) -> io::Result<Vec<GroupDir>> {
    let mut groups = Vec::new();
    for entry in fs::read_dir(store)? {
        let path = entry?.path();
        if path.join("group.json").is_file() {
            groups.push(GroupDir { path });
        }
    }
    groups.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(groups)
}

impl GroupDir {
    pub fn new(store: &Path, name: &str) -> GroupDir {
        GroupDir {
            path: store.join(name),
        }
    }

    pub fn exists(&self) -> bool {
        self.path.join("group.json").is_file()
    }

    /// Creates the group's directories, empty (sparse) base and head images, and metadata.
    pub fn create(&self, meta: &GroupMeta) -> io::Result<()> {
        for dir in ["base", "head", "journal"] {
            fs::create_dir_all(self.path.join(dir))?;
        }
        for v in &meta.volumes {
            for dir in ["base", "head"] {
                let f = File::create(self.image(dir, &v.name))?;
                f.set_len(v.size)?;
                f.sync_all()?;
            }
        }
        for dir in ["base", "head", "journal"] {
            sync_dir(&self.path.join(dir))?;
        }
        write_json_atomic(&self.path.join("base.json"), &SeqMark::default())?;
        write_json_atomic(&self.path.join("head.json"), &SeqMark::default())?;
        // group.json last: a group without it is not one (list_groups skips it).
        write_json_atomic(&self.path.join("group.json"), meta)
    }

    pub fn meta(&self) -> io::Result<GroupMeta> {
        let meta: GroupMeta = read_json(&self.path.join("group.json"))?;
        if meta.format != FORMAT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: store format {} is not supported (this build reads {FORMAT})",
                    self.path.display(),
                    meta.format
                ),
            ));
        }
        Ok(meta)
    }

    pub fn image(&self, which: &str, volume: &str) -> PathBuf {
        self.path.join(which).join(format!("{volume}.img"))
    }

    pub fn mark(&self, which: &str) -> io::Result<SeqMark> {
        read_json(&self.path.join(format!("{which}.json")))
    }

    pub fn set_mark(&self, which: &str, mark: SeqMark) -> io::Result<()> {
        write_json_atomic(&self.path.join(format!("{which}.json")), &mark)
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.path.join("journal")
    }

    /// Segment files, by first seq.
    pub fn segments(&self) -> io::Result<Vec<SegmentPath>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.journal_dir())? {
            let path = entry?.path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".seg"))
            else {
                continue;
            };
            if let Ok(first_seq) = stem.parse::<u64>() {
                out.push(SegmentPath { first_seq, path });
            }
        }
        out.sort_by_key(|s| s.first_seq);
        Ok(out)
    }

    pub fn segment_path(&self, first_seq: u64) -> SegmentPath {
        SegmentPath {
            first_seq,
            path: self.journal_dir().join(format!("{first_seq:020}.seg")),
        }
    }

    /// Bytes the group takes on disk (allocated blocks, so sparse images count what they hold).
    pub fn disk_usage(&self) -> io::Result<u64> {
        fn walk(p: &Path) -> io::Result<u64> {
            use std::os::unix::fs::MetadataExt;
            let meta = fs::symlink_metadata(p)?;
            if meta.is_dir() {
                let mut sum = 0;
                for e in fs::read_dir(p)? {
                    sum += walk(&e?.path())?;
                }
                Ok(sum)
            } else {
                Ok(meta.blocks() * 512)
            }
        }
        walk(&self.path)
    }
}

/// A reader's claim on history: retention folds nothing newer than a pinned seq into the base,
/// so a point-in-time export keeps reading what it started with. Removed when dropped; a pin
/// left by a dead process is ignored.
#[derive(Debug)]
pub struct Pin {
    path: PathBuf,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct PinFile {
    seq: u64,
    pid: u32,
}

impl GroupDir {
    /// Pins `seq` for as long as the returned guard lives.
    pub fn pin(&self, seq: u64) -> io::Result<Pin> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = self.path.join("pins");
        fs::create_dir_all(&dir)?;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{}-{n}.json", std::process::id()));
        write_json_atomic(
            &path,
            &PinFile {
                seq,
                pid: std::process::id(),
            },
        )?;
        Ok(Pin { path })
    }

    /// The oldest seq any live reader has pinned.
    pub fn min_pinned(&self) -> Option<u64> {
        let entries = fs::read_dir(self.path.join("pins")).ok()?;
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| read_json::<PinFile>(&e.path()).ok().map(|p| (e.path(), p)))
            .filter(|(path, p)| {
                let alive = Path::new(&format!("/proc/{}", p.pid)).exists();
                if !alive {
                    let _ = fs::remove_file(path);
                }
                alive
            })
            .map(|(_, p)| p.seq)
            .min()
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentPath {
    pub first_seq: u64,
    pub path: PathBuf,
}

impl SegmentPath {
    pub fn index_path(&self) -> PathBuf {
        self.path.with_extension("idx")
    }

    /// The segment's index: from its `.idx` file when that is present and agrees with the
    /// segment, else by reading the segment's records (checking each one).
    pub fn load_index(&self) -> io::Result<(Vec<IndexEntry>, Option<Scan>)> {
        let len = fs::metadata(&self.path)?.len();
        if let Ok(bytes) = fs::read(self.index_path()) {
            if let Ok(entries) = segment::decode_index(&bytes, len) {
                return Ok((entries, None));
            }
        }
        let scan = self.scan(|_, _| {})?;
        Ok((scan.entries.clone(), Some(scan)))
    }

    /// Reads every record of the segment, checking checksums.
    pub fn scan(&self, visit: impl FnMut(&crate::record::RecordRef<'_>, u64)) -> io::Result<Scan> {
        let bytes = fs::read(&self.path)?;
        segment::scan(&bytes, visit).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", self.path.display()),
            )
        })
    }
}

/// The journal's writing end: appends records to the newest segment, rotates segments.
#[derive(Debug)]
pub struct JournalWriter {
    dir: GroupDir,
    file: File,
    current: SegmentPath,
    len: u64,
    entries: Vec<IndexEntry>,
    last_seq: u64,
    last_time_ns: u64,
    segment_limit: u64,
}

/// What opening the journal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub last_seq: u64,
    pub last_time_ns: u64,
    /// A torn or bad tail that was cut off: where, how many bytes, and why.
    pub truncated: Option<(PathBuf, u64, u64, String)>,
}

impl JournalWriter {
    /// Opens the newest segment for appending (creating the first one if there is none), after
    /// reading it whole and cutting off a torn tail. `base_seq` is where the journal starts when
    /// it is empty.
    pub fn open(
        dir: &GroupDir,
        base_seq: u64,
        segment_limit: u64,
    ) -> io::Result<(JournalWriter, OpenReport)> {
        let segments = dir.segments()?;
        let Some(newest) = segments.last().cloned() else {
            let w = JournalWriter::create_segment(dir, base_seq + 1, segment_limit, base_seq, 0)?;
            return Ok((
                w,
                OpenReport {
                    last_seq: base_seq,
                    last_time_ns: 0,
                    truncated: None,
                },
            ));
        };
        if fs::metadata(&newest.path)?.len() < SEGMENT_HEADER_LEN as u64 {
            // A crash while the segment was being created: it holds no record.
            fs::remove_file(&newest.path)?;
            sync_dir(&dir.journal_dir())?;
            let (w, mut report) = JournalWriter::open(dir, base_seq, segment_limit)?;
            report.truncated.get_or_insert((
                newest.path.clone(),
                0,
                0,
                "segment created but never written (removed)".into(),
            ));
            return Ok((w, report));
        }
        let mut last_time_ns = 0;
        let scan = newest.scan(|r, _| last_time_ns = r.header.time_ns)?;
        let mut truncated = None;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&newest.path)?;
        let file_len = file.metadata()?.len();
        if scan.valid_len < file_len {
            let why = scan
                .stop
                .as_ref()
                .map(|(_, s)| s.to_string())
                .unwrap_or_default();
            file.set_len(scan.valid_len)?;
            file.sync_all()?;
            truncated = Some((
                newest.path.clone(),
                scan.valid_len,
                file_len - scan.valid_len,
                why,
            ));
        }
        // A stale index of the newest segment would disagree with appended records.
        let _ = fs::remove_file(newest.index_path());
        let last_seq = scan
            .entries
            .last()
            .map(|e| e.seq)
            .unwrap_or(newest.first_seq - 1);
        if last_time_ns == 0 {
            // An empty newest segment: the time of the last record is in the previous one's index.
            if let Some(prev) = segments.len().checked_sub(2).map(|i| &segments[i]) {
                if let Ok((entries, _)) = prev.load_index() {
                    if let Some(e) = entries.last() {
                        last_time_ns = read_header_at(&prev.path, e.pos)
                            .map(|h| h.time_ns)
                            .unwrap_or(0);
                    }
                }
            }
        }
        Ok((
            JournalWriter {
                dir: dir.clone(),
                file,
                current: newest,
                len: scan.valid_len,
                entries: scan.entries,
                last_seq,
                last_time_ns,
                segment_limit,
            },
            OpenReport {
                last_seq,
                last_time_ns,
                truncated,
            },
        ))
    }

    fn create_segment(
        dir: &GroupDir,
        first_seq: u64,
        segment_limit: u64,
        last_seq: u64,
        last_time_ns: u64,
    ) -> io::Result<JournalWriter> {
        let current = dir.segment_path(first_seq);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&current.path)?;
        let header = SegmentHeader {
            first_seq,
            created_ns: crate::now_ns(),
        };
        file.write_all(&header.encode())?;
        file.sync_all()?;
        sync_dir(&dir.journal_dir())?;
        Ok(JournalWriter {
            dir: dir.clone(),
            file,
            current,
            len: SEGMENT_HEADER_LEN as u64,
            entries: Vec::new(),
            last_seq,
            last_time_ns,
            segment_limit,
        })
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn last_time_ns(&self) -> u64 {
        self.last_time_ns
    }

    /// Appends already-checked records (sealed bytes, consecutive seqs after `last_seq`).
    /// Not durable until [`JournalWriter::sync`].
    pub fn append(&mut self, records: &[crate::record::RecordRef<'_>]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(records.iter().map(|r| r.header.record_len()).sum());
        let mut pos = self.len;
        for r in records {
            debug_assert_eq!(r.header.seq, self.last_seq + 1);
            let mut head = [0u8; crate::record::HEADER_LEN];
            encode_header_bytes(r, &mut head);
            buf.extend_from_slice(&head);
            buf.extend_from_slice(r.stored);
            self.entries.push(IndexEntry::from_header(&r.header, pos));
            pos += r.header.record_len() as u64;
            self.last_seq = r.header.seq;
            self.last_time_ns = r.header.time_ns;
        }
        self.file.write_all_at(&buf, self.len)?;
        self.len = pos;
        Ok(())
    }

    /// Makes every appended record durable; then seals the segment if it is full.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        if self.len >= self.segment_limit {
            self.rotate()?;
        }
        Ok(())
    }

    /// Seals the current segment (writes its index) and starts the next.
    pub fn rotate(&mut self) -> io::Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let idx = segment::encode_index(self.current.first_seq, self.len, &self.entries);
        write_file_atomic(&self.current.index_path(), &idx)?;
        let next = JournalWriter::create_segment(
            &self.dir,
            self.last_seq + 1,
            self.segment_limit,
            self.last_seq,
            self.last_time_ns,
        )?;
        *self = next;
        Ok(())
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

fn encode_header_bytes(
    r: &crate::record::RecordRef<'_>,
    out: &mut [u8; crate::record::HEADER_LEN],
) {
    let h = &r.header;
    out[0..4].copy_from_slice(&crate::record::MAGIC.to_le_bytes());
    out[4] = h.kind as u8;
    out[5] = u8::from(h.compressed);
    out[6..8].copy_from_slice(&h.disk.to_le_bytes());
    out[8..16].copy_from_slice(&h.seq.to_le_bytes());
    out[16..24].copy_from_slice(&h.time_ns.to_le_bytes());
    out[24..32].copy_from_slice(&h.offset.to_le_bytes());
    out[32..40].copy_from_slice(&h.length.to_le_bytes());
    out[40..44].copy_from_slice(&h.stored_len.to_le_bytes());
    out[44..48].copy_from_slice(&h.data_crc.to_le_bytes());
    out[48..52].fill(0);
    out[52..56].copy_from_slice(&h.crc.to_le_bytes());
}

/// Reads and decodes the record header at `pos` of a segment file.
pub fn read_header_at(path: &Path, pos: u64) -> io::Result<crate::record::Header> {
    let f = File::open(path)?;
    let mut head = [0u8; crate::record::HEADER_LEN];
    f.read_exact_at(&mut head, pos)?;
    crate::record::Header::decode(&head)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// Reads a whole record at `entry` from an open segment file, checking it.
pub fn read_record(file: &File, entry: &IndexEntry, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.resize(entry.end() as usize - entry.pos as usize, 0);
    file.read_exact_at(buf, entry.pos)?;
    match crate::record::parse(buf) {
        Ok(Some(r)) if r.header.seq == entry.seq => Ok(()),
        Ok(Some(r)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "expected seq {} at {}, found {}",
                entry.seq, entry.pos, r.header.seq
            ),
        )),
        Ok(None) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("record seq {} at {} is cut short", entry.seq, entry.pos),
        )),
        Err(e) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record seq {} at {}: {e}", entry.seq, entry.pos),
        )),
    }
}

pub fn read_json<T: for<'a> Deserialize<'a>>(path: &Path) -> io::Result<T> {
    let mut s = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    serde_json::from_str(&s).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_file_atomic(path, &bytes)
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content, never a mix.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Encoded, Kind};

    fn meta() -> GroupMeta {
        GroupMeta {
            format: FORMAT,
            name: "g".into(),
            volumes: vec![Volume {
                name: "root".into(),
                size: 1 << 20,
            }],
            created_ns: 1,
        }
    }

    fn append(w: &mut JournalWriter, seqs: std::ops::RangeInclusive<u64>) {
        let sealed: Vec<Vec<u8>> = seqs
            .map(|s| Encoded::data(Kind::Write, 0, s * 512, &[s as u8; 512], true).seal(s, s))
            .collect();
        let refs: Vec<_> = sealed
            .iter()
            .map(|b| crate::record::parse(b).unwrap().unwrap())
            .collect();
        w.append(&refs).unwrap();
        w.sync().unwrap();
    }

    #[test]
    fn journal_appends_rotates_and_reopens_after_a_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let g = GroupDir::new(tmp.path(), "g");
        g.create(&meta()).unwrap();
        let (mut w, report) = JournalWriter::open(&g, 0, 1024).unwrap();
        assert_eq!(report.last_seq, 0);
        append(&mut w, 1..=10);
        append(&mut w, 11..=20);
        let segs = g.segments().unwrap();
        assert!(segs.len() >= 2, "rotated at 1 KiB: {segs:?}");
        // Sealed segments have valid indexes.
        let (entries, scan) = segs[0].load_index().unwrap();
        assert!(scan.is_none());
        assert_eq!(entries[0].seq, 1);
        drop(w);

        // A crash while creating a segment leaves a file shorter than its header.
        let newest = g.segments().unwrap().last().unwrap().clone();
        let f = OpenOptions::new().write(true).open(&newest.path).unwrap();
        f.set_len(7).unwrap();
        let (mut w, report) = JournalWriter::open(&g, 0, 1 << 20).unwrap();
        assert_eq!(report.last_seq, 20);
        assert!(report.truncated.is_some());
        assert!(!newest.path.exists());
        append(&mut w, 21..=25);
        drop(w);

        // Tear the newest segment's tail.
        let newest = g.segments().unwrap().last().unwrap().clone();
        let len = fs::metadata(&newest.path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&newest.path).unwrap();
        f.set_len(len - 7).unwrap();
        let (w, report) = JournalWriter::open(&g, 0, 1 << 20).unwrap();
        assert_eq!(report.last_seq, 24);
        let (path, _, cut, _) = report.truncated.unwrap();
        assert_eq!(path, newest.path);
        assert!(cut > 0);
        assert_eq!(w.last_seq(), 24);
    }

    #[test]
    fn group_names_are_safe_directory_names() {
        assert!(valid_group_name("web-01.prod_a"));
        for bad in ["", "..", ".hidden", "a/b", "x y", &"a".repeat(200)] {
            assert!(!valid_group_name(bad), "{bad:?}");
        }
    }
}
