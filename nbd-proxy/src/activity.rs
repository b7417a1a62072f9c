//! The activity log: a small file that names every extent of the disks that may hold a change
//! the replicator has not acknowledged, as DRBD's activity log does. An extent is marked (and
//! the file synced) before the first write to it lands on the image; it is cleared lazily once
//! every change in it is durable at the replicator. After a crash (kill -9, power loss) the
//! restarted proxy resends only the marked extents instead of comparing whole disks by hash.
//!
//! File: `CDPAL001`, u32 length of a JSON header (group, disk sizes, extent size, acked seq),
//! the header, one bit per extent per disk, and a crc32c of everything before it. A torn or
//! foreign file is ignored (and a full hash comparison is done instead).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Bytes each bit of the activity log covers.
pub const EXTENT: u64 = 4 << 20;
const MAGIC: &[u8; 8] = b"CDPAL001";
/// `last_seq` of an extent changed while no record was kept (dirty tracking): clean only after
/// a completed resync.
pub const UNRECORDED: u64 = u64::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Header {
    group: String,
    sizes: Vec<u64>,
    extent: u64,
    acked_seq: u64,
    /// The replicator's copy equals the disks except in marked extents. False until a first
    /// full comparison completes: until then the file proves nothing.
    synced: bool,
    /// The id of the stream this proxy numbers ([`journal::wire::Hello::stream`]): kept while
    /// the file is trusted, so a restarted proxy continues its own stream.
    #[serde(default)]
    stream: String,
}

#[derive(Debug)]
struct Extents {
    /// Marked in memory; in the file once `synced` reaches the extent's `marked_gen`.
    hot: Vec<AtomicU64>,
    /// The marking generation when each extent was last marked.
    marked_gen: Vec<AtomicU64>,
    /// Seconds (since the log was opened) of each extent's last change.
    touched: Vec<AtomicU32>,
    /// Highest seq of a change to each extent ([`UNRECORDED`] when one had no record).
    last_seq: Vec<AtomicU64>,
    /// Changes between marking and getting their seq.
    in_flight: Vec<AtomicU32>,
}

#[derive(Debug)]
pub struct ActivityLog {
    path: PathBuf,
    file: Mutex<File>,
    group: String,
    sizes: Vec<u64>,
    disks: Vec<Extents>,
    acked_seq: AtomicU64,
    synced: std::sync::atomic::AtomicBool,
    stream: String,
    /// Marking generations: handed out, and written to the file.
    marked: AtomicU64,
    written: AtomicU64,
    /// A write of the file is under way (off the caller's task, see [`ActivityLog::begin`]).
    writing: std::sync::atomic::AtomicBool,
    /// Woken when a write of the file ends.
    wrote: tokio::sync::Notify,
    /// Writes of the file so far (each one synced), for tests.
    writes: AtomicU64,
    opened: std::time::Instant,
}

/// An extent stays marked this long after its last change, even once durable, so that a busy
/// extent is not cleared and marked again (a file sync) every second.
const IDLE_SECS: u32 = 5;

/// What the file held at start-up.
#[derive(Debug)]
pub struct Recovered {
    /// Per disk, extents that may hold unreplicated changes.
    pub extents: Vec<Vec<u64>>,
    /// The replicator had at least this seq durably when the file was last written.
    pub acked_seq: u64,
}

impl ActivityLog {
    /// Opens (or creates) the log; returns what a previous run left, if it is valid for this
    /// group and these disks.
    pub fn open(
        path: &Path,
        group: &str,
        sizes: &[u64],
    ) -> io::Result<(ActivityLog, Option<Recovered>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let trusted = std::fs::read(path)
            .ok()
            .and_then(|bytes| decode(&bytes))
            .filter(|(h, _)| {
                h.synced
                    && h.group == group
                    && h.sizes == sizes
                    && h.extent == EXTENT
                    && !h.stream.is_empty()
            });
        // A file that proves nothing starts a new stream: the replicator's records after its
        // durable seq may not be this proxy's.
        let stream = trusted
            .as_ref()
            .map_or_else(new_stream_id, |(h, _)| h.stream.clone());
        let recovered = trusted.map(|(h, bits)| Recovered {
            extents: bits,
            acked_seq: h.acked_seq,
        });
        let disks = sizes
            .iter()
            .map(|&size| {
                let n = size.div_ceil(EXTENT) as usize;
                Extents {
                    hot: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
                    marked_gen: (0..n).map(|_| AtomicU64::new(0)).collect(),
                    touched: (0..n).map(|_| AtomicU32::new(0)).collect(),
                    last_seq: (0..n).map(|_| AtomicU64::new(0)).collect(),
                    in_flight: (0..n).map(|_| AtomicU32::new(0)).collect(),
                }
            })
            .collect();
        let log = ActivityLog {
            path: path.to_owned(),
            file: Mutex::new(file),
            group: group.to_owned(),
            sizes: sizes.to_vec(),
            disks,
            acked_seq: AtomicU64::new(recovered.as_ref().map_or(0, |r| r.acked_seq)),
            synced: std::sync::atomic::AtomicBool::new(recovered.is_some()),
            stream,
            marked: AtomicU64::new(0),
            written: AtomicU64::new(0),
            writing: std::sync::atomic::AtomicBool::new(false),
            wrote: tokio::sync::Notify::new(),
            writes: AtomicU64::new(0),
            opened: std::time::Instant::now(),
        };
        // Until the recovered extents are resynced they stay marked.
        if let Some(r) = &recovered {
            for (d, extents) in r.extents.iter().enumerate() {
                for &e in extents {
                    log.set_hot(d, e, true);
                    log.disks[d].last_seq[e as usize].store(UNRECORDED, Ordering::SeqCst);
                }
            }
        }
        log.write()?;
        Ok((log, recovered))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of the stream this proxy numbers.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    fn set_hot(&self, disk: usize, extent: u64, on: bool) -> bool {
        let word = &self.disks[disk].hot[(extent / 64) as usize];
        let bit = 1u64 << (extent % 64);
        let old = if on {
            word.fetch_or(bit, Ordering::SeqCst)
        } else {
            word.fetch_and(!bit, Ordering::SeqCst)
        };
        old & bit != 0
    }

    fn is_hot(&self, disk: usize, extent: u64) -> bool {
        self.disks[disk].hot[(extent / 64) as usize].load(Ordering::SeqCst) & (1 << (extent % 64))
            != 0
    }

    fn extents(offset: u64, length: u64) -> std::ops::RangeInclusive<u64> {
        offset / EXTENT..=(offset + length.max(1) - 1) / EXTENT
    }

    /// Before a change to `offset..offset+length` reaches the image: makes sure the file marks
    /// its extents, writing and syncing it when one was not marked yet. Must be paired with
    /// [`ActivityLog::changed`].
    ///
    /// The file is written whole, with every mark made so far, on a blocking thread while the
    /// caller's task goes on: the other writes of a connection (one task, [`nbd_server`]'s
    /// write task) mark their extents meanwhile and share the next write. A burst of writes
    /// over idle extents then costs about two file syncs per batch the client sends, not one
    /// per extent, each holding up the whole connection.
    pub async fn begin(self: &Arc<Self>, disk: usize, offset: u64, length: u64) -> io::Result<()> {
        let need = self.mark(disk, offset, length);
        if self.written.load(Ordering::SeqCst) >= need {
            return Ok(());
        }
        // Boxed: the future of every change carries only a pointer to this rare wait.
        Box::pin(self.written_to(need)).await
    }

    /// Waits until the file holds generation `need`, writing it unless a write is under way.
    async fn written_to(self: &Arc<Self>, need: u64) -> io::Result<()> {
        loop {
            // Registered before the look, so the end of a write in between is not missed.
            let wrote = self.wrote.notified();
            tokio::pin!(wrote);
            wrote.as_mut().enable();
            if self.written.load(Ordering::SeqCst) >= need {
                return Ok(());
            }
            if self.writing.swap(true, Ordering::AcqRel) {
                wrote.await;
                continue;
            }
            // This change writes the file; the flag is cleared by the write itself, so a
            // change dropped while it waits does not leave the others waiting forever.
            let log = self.clone();
            let write = move || {
                let written = log.write();
                log.writing.store(false, Ordering::Release);
                log.wrote.notify_waiters();
                written
            };
            match tokio::runtime::Handle::try_current() {
                Ok(h) => h.spawn_blocking(write).await.map_err(io::Error::other)??,
                Err(_) => write()?,
            }
        }
    }

    /// Marks the extents of a change in memory; returns the generation the file must reach.
    fn mark(&self, disk: usize, offset: u64, length: u64) -> u64 {
        let d = &self.disks[disk];
        let now = self.opened.elapsed().as_secs() as u32;
        let mut need = 0;
        for e in Self::extents(offset, length) {
            let i = e as usize;
            d.in_flight[i].fetch_add(1, Ordering::SeqCst);
            d.touched[i].store(now, Ordering::Relaxed);
            if !self.is_hot(disk, e) {
                // The generation is stored before the bit, so whoever sees the bit sees it.
                let g = self.marked.fetch_add(1, Ordering::SeqCst) + 1;
                d.marked_gen[i].store(g, Ordering::SeqCst);
                self.set_hot(disk, e, true);
            }
            need = need.max(d.marked_gen[i].load(Ordering::SeqCst));
        }
        need
    }

    /// After the change got its seq (None: it was only marked dirty).
    pub fn changed(&self, disk: usize, offset: u64, length: u64, seq: Option<u64>) {
        for e in Self::extents(offset, length) {
            let last = &self.disks[disk].last_seq[e as usize];
            match seq {
                Some(s) => {
                    let _ = last.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| {
                        (old != UNRECORDED && old < s).then_some(s)
                    });
                }
                None => last.store(UNRECORDED, Ordering::SeqCst),
            }
            self.disks[disk].in_flight[e as usize].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A change whose record was dropped (refused by the replicator): its extents hold a
    /// change no record carries, until a resync completes.
    pub fn unrecorded(&self, disk: usize, offset: u64, length: u64) {
        for e in Self::extents(offset, length) {
            if let Some(last) = self
                .disks
                .get(disk)
                .and_then(|d| d.last_seq.get(e as usize))
            {
                last.store(UNRECORDED, Ordering::SeqCst);
            }
        }
    }

    /// A resync that sent every dirty chunk completed at `seq`: extents whose changes had no
    /// record are now covered by it.
    pub fn resynced(&self, seq: u64) {
        for d in &self.disks {
            for last in &d.last_seq {
                let _ = last.compare_exchange(UNRECORDED, seq, Ordering::SeqCst, Ordering::SeqCst);
            }
        }
    }

    /// Whether the file is trusted: a full comparison completed, or it was recovered so.
    pub fn set_synced(&self, synced: bool) -> io::Result<()> {
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        self.synced.store(synced, Ordering::SeqCst);
        self.write_locked(&file)
    }

    /// Clears extents whose changes are all durable (`acked`) and that have been idle for a
    /// few seconds, and rewrites the file if any was cleared.
    pub fn clean(&self, acked: u64) -> io::Result<usize> {
        self.clean_idle(acked, IDLE_SECS)
    }

    /// At a clean stop: clears every extent whose changes are durable, busy or not.
    pub fn clean_at_stop(&self, acked: u64) -> io::Result<usize> {
        self.clean_idle(acked, 0)
    }

    fn clean_idle(&self, acked: u64, idle_secs: u32) -> io::Result<usize> {
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.opened.elapsed().as_secs() as u32;
        let mut cleared = 0;
        for (d, disk) in self.disks.iter().enumerate() {
            for (e, last) in disk.last_seq.iter().enumerate() {
                let e64 = e as u64;
                if !self.is_hot(d, e64)
                    || disk.in_flight[e].load(Ordering::SeqCst) > 0
                    || last.load(Ordering::SeqCst) > acked
                    || now.saturating_sub(disk.touched[e].load(Ordering::Relaxed)) < idle_secs
                {
                    continue;
                }
                self.set_hot(d, e64, false);
                // A change that marked itself meanwhile saw the bit set: keep it.
                if disk.in_flight[e].load(Ordering::SeqCst) > 0
                    || last.load(Ordering::SeqCst) > acked
                {
                    self.set_hot(d, e64, true);
                } else {
                    cleared += 1;
                }
            }
        }
        let old = self.acked_seq.swap(acked, Ordering::SeqCst);
        if cleared > 0 || old != acked {
            self.write_locked(&file)?;
        }
        Ok(cleared)
    }

    /// Extents marked now.
    pub fn hot_count(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| {
                d.hot
                    .iter()
                    .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                    .sum::<u64>()
            })
            .sum()
    }

    fn write(&self) -> io::Result<()> {
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        self.write_locked(&file)
    }

    fn write_locked(&self, file: &File) -> io::Result<()> {
        // Every mark made up to this generation is set in the bits read below.
        let generation = self.marked.load(Ordering::SeqCst);
        let header = Header {
            group: self.group.clone(),
            sizes: self.sizes.clone(),
            extent: EXTENT,
            acked_seq: self.acked_seq.load(Ordering::SeqCst),
            synced: self.synced.load(Ordering::SeqCst),
            stream: self.stream.clone(),
        };
        let bits: Vec<Vec<u64>> = self
            .disks
            .iter()
            .map(|d| d.hot.iter().map(|w| w.load(Ordering::SeqCst)).collect())
            .collect();
        let bytes = encode(&header, &bits);
        file.write_all_at(&bytes, 0)?;
        file.set_len(bytes.len() as u64)?;
        file.sync_data()?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.written.fetch_max(generation, Ordering::SeqCst);
        Ok(())
    }
}

/// 128 random bits as hex, from the kernel's generator (time and pid if that fails).
pub fn new_stream_id() -> String {
    let mut b = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !random {
        let t = journal::now_ns().to_le_bytes();
        b[..8].copy_from_slice(&t);
        b[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn encode(header: &Header, bits: &[Vec<u64>]) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap_or_default();
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    for disk in bits {
        for w in disk {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The header and, per disk, the marked extents; None for a torn or foreign file.
fn decode(b: &[u8]) -> Option<(Header, Vec<Vec<u64>>)> {
    if b.len() < 16 || &b[..8] != MAGIC {
        return None;
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return None;
    }
    let json_len = u32::from_le_bytes(body[8..12].try_into().ok()?) as usize;
    let header: Header = serde_json::from_slice(body.get(12..12 + json_len)?).ok()?;
    let mut rest = body.get(12 + json_len..)?;
    let mut extents = Vec::new();
    for &size in &header.sizes {
        let n = size.div_ceil(header.extent.max(1));
        let words = n.div_ceil(64) as usize;
        let (mine, tail) = (rest.get(..words * 8)?, rest.get(words * 8..)?);
        rest = tail;
        let mut list = Vec::new();
        for (i, w) in mine.chunks_exact(8).enumerate() {
            let w = u64::from_le_bytes(w.try_into().ok()?);
            for bit in 0..64 {
                let e = i as u64 * 64 + bit;
                if w & (1 << bit) != 0 && e < n {
                    list.push(e);
                }
            }
        }
        extents.push(list);
    }
    rest.is_empty().then_some((header, extents))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn marks_survive_a_restart_and_clear_once_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.cdp-al");
        let sizes = [64 * EXTENT, 3 * EXTENT + 1];
        let (al, rec) = ActivityLog::open(&path, "g", &sizes).unwrap();
        assert!(rec.is_none());
        drop(al);
        let (al, rec) = ActivityLog::open(&path, "g", &sizes).unwrap();
        let al = Arc::new(al);
        assert!(rec.is_none(), "not trusted before a full sync");
        al.set_synced(true).unwrap();
        al.begin(0, 5 * EXTENT + 10, EXTENT).await.unwrap(); // extents 5 and 6
        al.changed(0, 5 * EXTENT + 10, EXTENT, Some(7));
        al.begin(1, 3 * EXTENT, 1).await.unwrap();
        al.changed(1, 3 * EXTENT, 1, None);
        drop(al);
        let (al, rec) = ActivityLog::open(&path, "g", &sizes).unwrap();
        let rec = rec.unwrap();
        assert_eq!(rec.extents, vec![vec![5, 6], vec![3]]);
        // Recovered extents stay marked until a resync completes.
        assert_eq!(al.clean_idle(1000, 0).unwrap(), 0);
        al.resynced(50);
        assert_eq!(al.clean_idle(49, 0).unwrap(), 0);
        assert_eq!(al.clean_idle(50, 0).unwrap(), 3);
        drop(al);
        let (_, rec) = ActivityLog::open(&path, "g", &sizes).unwrap();
        assert!(rec.unwrap().extents.iter().all(Vec::is_empty));
        // Another group's (or a torn) file is not trusted.
        let (_, rec) = ActivityLog::open(&path, "other", &sizes).unwrap();
        assert!(rec.is_none());
        std::fs::write(&path, b"CDPAL001garbage").unwrap();
        let (_, rec) = ActivityLog::open(&path, "g", &sizes).unwrap();
        assert!(rec.is_none());
    }

    #[tokio::test]
    async fn a_change_in_flight_keeps_its_extent() {
        let dir = tempfile::tempdir().unwrap();
        let (al, _) = ActivityLog::open(&dir.path().join("al"), "g", &[8 * EXTENT]).unwrap();
        let al = Arc::new(al);
        al.begin(0, 0, 4096).await.unwrap();
        assert_eq!(
            al.clean_idle(u64::MAX - 1, 0).unwrap(),
            0,
            "in flight: kept"
        );
        al.changed(0, 0, 4096, Some(3));
        assert_eq!(al.clean_idle(2, 0).unwrap(), 0, "not durable yet: kept");
        assert_eq!(al.clean_idle(3, 0).unwrap(), 1);
        assert_eq!(al.hot_count(), 0);
    }

    /// Changes to idle extents made together (like a connection's writes, polled by one task)
    /// share file writes: 32 of them cost at most a few syncs, not 32 one after another, and
    /// each one's mark is in the file once its `begin` returns.
    #[tokio::test]
    async fn changes_to_idle_extents_share_file_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("al");
        let (al, _) = ActivityLog::open(&path, "g", &[64 * EXTENT]).unwrap();
        let al = Arc::new(al);
        al.set_synced(true).unwrap();
        let before = al.writes.load(Ordering::Relaxed);
        let mut changes = tokio::task::JoinSet::new();
        for e in 0..32u64 {
            let al = al.clone();
            changes.spawn(async move {
                al.begin(0, 2 * e * EXTENT, 4096).await.unwrap();
                al.changed(0, 2 * e * EXTENT, 4096, Some(1));
            });
        }
        changes.join_all().await;
        let syncs = al.writes.load(Ordering::Relaxed) - before;
        assert!((1..=4).contains(&syncs), "{syncs} file syncs for 32 marks");
        drop(al);
        let (_, rec) = ActivityLog::open(&path, "g", &[64 * EXTENT]).unwrap();
        let marked: Vec<u64> = (0..32).map(|e| 2 * e).collect();
        assert_eq!(rec.unwrap().extents, vec![marked]);
    }
}
