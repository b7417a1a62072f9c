//! The store on disk: the replicator writes it, restore and `replicator check` read it.
//!
//! ```text
//! STORE/<group>/group.json          name, volumes (name, size), format version
//!              base.json, base/<volume>.img   images with every record <= base_seq applied
//!              head.json, head/<volume>.sums  chunk hashes of the latest state as of head_seq
//!                                             (a cache for delta sync: chunks changed since are
//!                                             listed as stale or found in the journal)
//!              journal/<first seq, 20 digits>.seg   records, append-only
//!              journal/<first seq>.idx              index of a sealed segment
//!              status.json                          live state of `replicator serve`
//! ```
//!
//! Metadata files are replaced atomically (write, fsync, rename, fsync the directory).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::segment::{self, IndexEntry, Scan};
use crate::sums::Sums;
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

/// A retention fold under way: the base images hold every record up to `from`, and some of
/// those up to `to`, until the fold completes. Written before the fold touches the base, removed
/// after `base.json` moved to `to`; a replicator that finds it at start-up finishes the fold.
/// Readers treat points before `to` as gone (their bytes may already be overwritten).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoldMark {
    /// First seq of the segment being folded (its file name).
    pub segment: u64,
    pub from: u64,
    pub to: u64,
    pub to_time_ns: u64,
}

/// A group's directory in the store.
#[derive(Debug, Clone)]
pub struct GroupDir {
    pub path: PathBuf,
}

/// How a store file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
    /// Created; it must not exist yet.
    Create,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The names of a group's metadata: group and volume names valid, volumes unique.
fn check_meta(meta: &GroupMeta) -> Result<(), String> {
    crate::names::check("group", &meta.name)?;
    crate::names::check_volumes(meta.volumes.iter().map(|v| v.name.as_str()))
}

/// Opens `rel` beneath `dir` with openat2(RESOLVE_BENEATH): no `..` or symlink may take the
/// path outside `dir`. Where the kernel lacks openat2, a path with `..` is refused instead.
fn open_beneath(dir: &Path, rel: &str, access: Access) -> io::Result<File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    let flags = libc::O_CLOEXEC
        | match access {
            Access::Read => libc::O_RDONLY,
            Access::ReadWrite => libc::O_RDWR,
            Access::Create => libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
        };
    /// `struct open_how` of openat2(2).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_BENEATH: u64 = 0x08;
    let how = OpenHow {
        flags: flags as u64,
        // openat2 refuses a mode without O_CREAT.
        mode: if access == Access::Create { 0o644 } else { 0 },
        resolve: RESOLVE_BENEATH,
    };
    let dirf = File::open(dir)?;
    let c = std::ffi::CString::new(rel.as_bytes()).map_err(|_| invalid("a NUL in a path"))?;
    // SAFETY: openat2 reads `how` (size given) and the NUL-terminated path; both outlive the
    // call, and the returned descriptor, if any, is owned by the File made from it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirf.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a fresh descriptor from openat2, owned by nobody else.
        return Ok(unsafe { File::from_raw_fd(fd as i32) });
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    let path = Path::new(std::ffi::OsStr::from_bytes(rel.as_bytes()));
    if path.is_absolute()
        || path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(invalid(format!("{rel}: leaves the group directory")));
    }
    let mut o = fs::OpenOptions::new();
    match access {
        Access::Read => o.read(true),
        Access::ReadWrite => o.read(true).write(true),
        Access::Create => o.read(true).write(true).create_new(true),
    };
    o.open(dir.join(path))
}

/// Directories of a store that hold a group's files but no `group.json` (a damaged group:
/// `list_groups` cannot offer them, `check` and `restore list` report them).
pub fn list_broken_groups(store: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(store)? {
        let path = entry?.path();
        let looks_like_one = ["journal", "base", "base.json"]
            .iter()
            .any(|p| path.join(p).exists());
        if looks_like_one && !path.join("group.json").is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
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

    /// Creates the group's directories, empty (sparse) base images, the hashes of their
    /// (zero) chunks, and metadata. The names must be valid ([`crate::names`]); no file outside
    /// the group is touched.
    pub fn create(&self, meta: &GroupMeta) -> io::Result<()> {
        check_meta(meta).map_err(|e| invalid(format!("{}: {e}", self.path.display())))?;
        for dir in ["base", "head", "journal"] {
            fs::create_dir_all(self.path.join(dir))?;
        }
        for v in &meta.volumes {
            let f = self.open_image("base", &v.name, Access::Create)?;
            f.set_len(v.size)?;
            f.sync_all()?;
            for dir in ["base", "head"] {
                self.set_sums(dir, &v.name, &Sums::zeroes(v.size, 0))?;
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
        check_meta(&meta)
            .map_err(|e| invalid(format!("{}: {e}", self.path.join("group.json").display())))?;
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
        debug_assert!(crate::names::valid(volume));
        self.path.join(which).join(format!("{volume}.img"))
    }

    fn sums_path(&self, which: &str, volume: &str) -> PathBuf {
        self.path.join(which).join(format!("{volume}.sums"))
    }

    /// The checksums of a volume's base image, or the kept chunk hashes of its latest state
    /// (`which` = "head") ([`crate::sums`]).
    pub fn sums(&self, which: &str, volume: &str) -> io::Result<Sums> {
        crate::names::check("volume", volume).map_err(invalid)?;
        let path = self.sums_path(which, volume);
        let bytes = fs::read(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Sums::decode(&bytes).map_err(|e| invalid(format!("{}: {e}", path.display())))
    }

    /// Replaces the checksums of a volume's image (atomically, synced).
    pub fn set_sums(&self, which: &str, volume: &str, sums: &Sums) -> io::Result<()> {
        crate::names::check("volume", volume).map_err(invalid)?;
        write_file_atomic(&self.sums_path(which, volume), &sums.encode())
    }

    /// Opens a volume's image (`which` = "base"), resolved beneath the group's directory: a name
    /// that would leave it (`..`, a symlink out) fails instead of reaching another file.
    pub fn open_image(&self, which: &str, volume: &str, access: Access) -> io::Result<File> {
        crate::names::check("volume", volume).map_err(invalid)?;
        let rel = format!("{which}/{volume}.img");
        open_beneath(&self.path, &rel, access).map_err(|e| {
            io::Error::new(e.kind(), format!("{}: {e}", self.path.join(&rel).display()))
        })
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

    /// The stream whose records the journal ends with (see [`crate::wire::Hello::stream`]).
    pub fn stream_owner(&self) -> io::Result<Option<String>> {
        #[derive(Deserialize)]
        struct Owner {
            stream: String,
        }
        match read_json::<Owner>(&self.path.join("stream.json")) {
            Ok(o) => Ok(Some(o.stream)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records that the records from now on are `stream`'s (synced before it returns).
    pub fn set_stream_owner(&self, stream: &str) -> io::Result<()> {
        write_json_atomic(
            &self.path.join("stream.json"),
            &serde_json::json!({ "stream": stream }),
        )
    }

    fn fold_path(&self) -> PathBuf {
        self.path.join("fold.json")
    }

    /// The retention fold under way, if one is.
    pub fn fold_mark(&self) -> io::Result<Option<FoldMark>> {
        match read_json(&self.fold_path()) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn set_fold_mark(&self, mark: Option<&FoldMark>) -> io::Result<()> {
        match mark {
            Some(m) => write_json_atomic(&self.fold_path(), m),
            None => match fs::remove_file(self.fold_path()) {
                Ok(()) => sync_dir(&self.path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            },
        }
    }

    /// The durable checkpoint ([`crate::checkpoint`]) of the journal.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.journal_dir().join("durable")
    }

    /// The journal's durable position: None for a store written before checkpoints existed.
    /// A checkpoint file with no valid slot is an error (the durable position is unknown).
    pub fn checkpoint(&self) -> io::Result<Option<Checkpoint>> {
        let path = self.checkpoint_path();
        match fs::read(&path) {
            Ok(bytes) => Checkpoint::decode_file(&bytes).map(Some).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: the journal's durable checkpoint is unreadable, so which records were \
                         acknowledged is unknown (run `replicator check`)",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
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

/// Reads a JSON file written by [`write_json_atomic`] or [`write_json_in_place`], checking the
/// `crc` it carries (crc32c of the rest of the object, keys sorted): a changed byte is an error
/// that names the file, never a wrong value.
pub fn read_json<T: for<'a> Deserialize<'a>>(path: &Path) -> io::Result<T> {
    let mut s = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut s))
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    decode_checked_json(&s, &path.display().to_string())
}

/// Decodes JSON that [`encode_checked_json`] made, checking its `crc`; errors name `what` (a
/// file, an object in a bucket).
pub fn decode_checked_json<T: for<'a> Deserialize<'a>>(bytes: &[u8], what: &str) -> io::Result<T> {
    let bad = |why: String| invalid(format!("{what}: {why}"));
    let mut value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let Some(map) = value.as_object_mut() else {
        return Err(bad("not a JSON object".into()));
    };
    let Some(stored) = map.remove("crc") else {
        return Err(bad(
            "it carries no checksum (damaged, or written by hand)".into()
        ));
    };
    let computed = json_crc(&value)?;
    if stored.as_str() != Some(computed.as_str()) {
        return Err(bad(format!(
            "checksum mismatch (stored {stored}, computed {computed:?}): it is damaged"
        )));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// crc32c of a JSON object's canonical form (keys sorted, no spaces), as 8 hex digits.
fn json_crc(value: &serde_json::Value) -> io::Result<String> {
    let canonical = serde_json::to_vec(value).map_err(io::Error::other)?;
    Ok(format!("{:08x}", crc32c::crc32c(&canonical)))
}

/// `value` as pretty JSON with its `crc` field added (what [`read_json`] and
/// [`decode_checked_json`] check).
pub fn encode_checked_json<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let mut v = serde_json::to_value(value).map_err(io::Error::other)?;
    let crc = json_crc(&v)?;
    let Some(map) = v.as_object_mut() else {
        return Err(io::Error::other("only JSON objects are stored"));
    };
    map.insert("crc".into(), serde_json::Value::String(crc));
    let mut bytes = serde_json::to_vec_pretty(&v).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    write_file_atomic(path, &encode_checked_json(value)?)
}

/// Bytes a file written by [`write_json_in_place`] is padded to.
const IN_PLACE_LEN: usize = 4096;

/// Writes small, often-rewritten JSON (live status) over the file's existing bytes, padded with
/// spaces, so that it needs no new block: it still works on a full file system. A reader may
/// see a torn write; such files hold nothing another file does not also hold durably.
pub fn write_json_in_place<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut bytes = encode_checked_json(value)?;
    let existing = fs::metadata(path).map(|m| m.len() as usize).unwrap_or(0);
    let len = existing.max(IN_PLACE_LEN).max(bytes.len());
    bytes.resize(len, b' ');
    if existing >= len {
        return fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .write_all_at(&bytes, 0);
    }
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
