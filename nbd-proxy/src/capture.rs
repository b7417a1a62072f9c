//! Capture: every change the guest makes becomes a record, in an order that replays to the
//! image (invariant 1), held in a change log bounded by bytes (invariant 5) until the
//! replicator acknowledges it durable.
//!
//! A write takes a range lock, is applied to the image, and is given its seq while the lock is
//! still held; so of two overlapping writes, the one applied last has the higher seq. The
//! sequencer's mutex only numbers records and hands them to the shipper through a crossbeam
//! channel, in seq order; a record holds the guest's data in the buffer the connection read
//! it into, and the shipper sums and compresses it ([`crate::record`]), off the reply path.
//!
//! When the log is full (or before the first contact with the replicator) the proxy stops
//! queueing records and marks dirty chunks instead (`--on-full bitmap`), or makes the guest
//! wait (`--on-full block`). A resync ([`crate::resync`]) later sends the current content of
//! the dirty chunks between `SyncBegin` and `SyncEnd` records.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use journal::record::Kind;
use journal::wire::HASH_CHUNK;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tracing::warn;

use crate::record::Record;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Reply to the guest after the local write; replication follows (seconds of RPO at most).
    Async,
    /// Reply to the guest only after the replicator has the write durably (RPO 0).
    Sync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// Keep serving the guest at full speed; remember which chunks changed and resynchronize
    /// them when the replicator catches up (those points are not consistent until then).
    Bitmap,
    /// Make guest writes wait until the replicator frees room in the log.
    Block,
}

/// Chunks of one disk that changed without a record in the log.
#[derive(Debug, Clone, Default)]
pub struct Dirty {
    bits: Vec<u64>,
    count: u64,
}

impl Dirty {
    fn new(size: u64) -> Dirty {
        Dirty {
            bits: vec![0; size.div_ceil(HASH_CHUNK).div_ceil(64) as usize],
            count: 0,
        }
    }

    pub fn mark(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let first = offset / HASH_CHUNK;
        let last = (offset + length - 1) / HASH_CHUNK;
        for c in first..=last {
            let (w, b) = ((c / 64) as usize, c % 64);
            if let Some(word) = self.bits.get_mut(w) {
                if *word & (1 << b) == 0 {
                    *word |= 1 << b;
                    self.count += 1;
                }
            }
        }
    }

    pub fn mark_all(&mut self, size: u64) {
        self.mark(0, size);
    }

    pub fn chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(w, &word)| {
            (0..64)
                .filter(move |b| word & (1u64 << b) != 0)
                .map(move |b| w as u64 * 64 + b)
        })
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

#[derive(Debug)]
struct SeqState {
    next_seq: u64,
    /// Records are being queued (else changes only mark `dirty`).
    live: bool,
    dirty: Vec<Dirty>,
    /// The replicator's copy is of unknown relation to ours: compare hashes of everything.
    full_sync_needed: bool,
    /// Fresh process with a trusted activity log: take the replicator's seq at the first
    /// handshake, provided it has at least this one.
    adopt_seq: Option<u64>,
    warned_full: bool,
    /// Syncs begun so far (a dirty mark made at generation g is sent by sync g + 1).
    sync_gen: u64,
    /// Refusals so far (each dropped records from the log).
    drops: u64,
}

/// Outcome of handing a record to the log.
enum Pushed {
    /// Numbered: (seq, refusals so far).
    Queued(u64, u64),
    /// Marked dirty; the next sync to begin (generation + 1) carries it.
    Dirty(u64),
    Full,
}

/// What became of a change: a record with its seq, or a dirty mark that the sync after
/// generation `.0` will carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Captured {
    /// A record: its seq, and how many refusals had dropped records when it was numbered.
    Seq {
        seq: u64,
        epoch: u64,
    },
    Dirty(u64),
    /// Not captured at all (the change failed).
    None,
}

impl Captured {
    pub fn seq(self) -> Option<u64> {
        match self {
            Captured::Seq { seq, .. } => Some(seq),
            _ => None,
        }
    }
}

/// Records a refusal dropped: seqs `from..=last` numbered before it (`epoch`: the refusal
/// count after it); their changes became dirty marks carried by the sync after `generation`.
#[derive(Debug, Clone, Copy)]
struct Dropped {
    epoch: u64,
    from: u64,
    last: u64,
    generation: u64,
}

/// The replication state shared by every disk of a group.
#[derive(Debug)]
pub struct Capture {
    state: Mutex<SeqState>,
    tx: crossbeam_channel::Sender<Record>,
    /// Memory the change log's records hold ([`Record::mem_bytes`]), bounded by `capacity`.
    pub log_bytes: AtomicU64,
    pub capacity: u64,
    space: Notify,
    pub acked: watch::Sender<u64>,
    pub mode: Mode,
    pub on_full: OnFull,
    pub sizes: Vec<u64>,
    pub syncing: AtomicBool,
    pub stats: Stats,
    /// When the group's data records are worth compressing (skips lz4 on data that is not);
    /// the shipper consults it as it seals records.
    pub compress: journal::record::CompressGate,
    pub activity: Option<Arc<crate::activity::ActivityLog>>,
    /// Sync mode: how long a write waits for the replicator before sync mode degrades to
    /// async (None: wait for as long as it takes).
    pub sync_timeout: Option<std::time::Duration>,
    /// Sync mode is degraded: writes are acknowledged before the replicator has them, until
    /// it has caught up with every record captured up to `degraded_until`.
    pub degraded: AtomicBool,
    degraded_until: AtomicU64,
    /// The newest sync generation whose SyncEnd is durable: every change marked dirty before
    /// it began is at the replicator.
    pub(crate) durable_gen: watch::Sender<u64>,
    /// A sync that ended (generation, SyncEnd seq) but is not durable yet.
    ended: Mutex<Option<(u64, u64)>>,
    /// What refusals dropped (the most recent few).
    dropped: Mutex<VecDeque<Dropped>>,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub records: AtomicU64,
    /// Changes marked in the dirty chunks instead of numbered as records (log full, before the
    /// first contact, after a refusal).
    pub dirty_marked: AtomicU64,
    /// Times the change log filled and recording stopped for dirty tracking (--on-full bitmap).
    pub log_overflows: AtomicU64,
    pub sync_chunks_total: AtomicU64,
    pub sync_chunks_done: AtomicU64,
    pub sync_bytes_sent: AtomicU64,
    pub sync_chunks_skipped: AtomicU64,
    pub syncs_completed: AtomicU64,
    /// Capture time of the oldest record not yet durable (0: none).
    pub oldest_unacked_ns: AtomicU64,
    /// The last record the replicator refused, and why.
    pub last_refusal: Mutex<Option<String>>,
    /// Chunks a sync could not read (it left its window open and will retry).
    pub sync_read_failures: AtomicU64,
    /// Replication lag samples in microseconds, most recent last: per ack, from the capture of
    /// the oldest record it freed to the ack.
    pub lag_us: Mutex<VecDeque<u64>>,
    /// Guest WRITE requests completed, and their bytes (status rates, `--metrics`).
    pub guest_writes: AtomicU64,
    pub guest_write_bytes: AtomicU64,
    /// Records the replicator acknowledged as durable.
    pub records_acked: AtomicU64,
    /// Bytes of batch frames written to the replicator (records and frame headers).
    pub bytes_shipped: AtomicU64,
}

impl Stats {
    /// A guest WRITE of `bytes` completed.
    pub fn guest_write(&self, bytes: u64) {
        self.guest_writes.fetch_add(1, Ordering::Relaxed);
        self.guest_write_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Capture {
    pub fn new(
        sizes: Vec<u64>,
        capacity: u64,
        mode: Mode,
        on_full: OnFull,
        sync_timeout: Option<std::time::Duration>,
        activity: Option<(
            crate::activity::ActivityLog,
            Option<crate::activity::Recovered>,
        )>,
    ) -> (Arc<Capture>, crossbeam_channel::Receiver<Record>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut dirty: Vec<Dirty> = sizes.iter().map(|&s| Dirty::new(s)).collect();
        let (activity, recovered) = match activity {
            Some((log, recovered)) => (Some(Arc::new(log)), recovered),
            None => (None, None),
        };
        let adopt_seq = recovered.as_ref().map(|r| r.acked_seq);
        if let Some(r) = &recovered {
            for (d, extents) in r.extents.iter().enumerate() {
                for &e in extents {
                    let start = e * crate::activity::EXTENT;
                    let len = crate::activity::EXTENT.min(sizes[d].saturating_sub(start));
                    dirty[d].mark(start, len);
                }
            }
        }
        let capture = Capture {
            state: Mutex::new(SeqState {
                next_seq: 1,
                live: false,
                dirty,
                full_sync_needed: recovered.is_none(),
                adopt_seq,
                warned_full: false,
                sync_gen: 0,
                drops: 0,
            }),
            tx,
            log_bytes: AtomicU64::new(0),
            capacity,
            space: Notify::new(),
            acked: watch::channel(0).0,
            mode,
            on_full,
            sizes,
            syncing: AtomicBool::new(false),
            stats: Stats::default(),
            compress: Default::default(),
            activity,
            sync_timeout,
            degraded: AtomicBool::new(false),
            degraded_until: AtomicU64::new(0),
            durable_gen: watch::channel(0).0,
            ended: Mutex::new(None),
            dropped: Mutex::new(VecDeque::new()),
        };
        (Arc::new(capture), rx)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SeqState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_push(
        &self,
        rec: Record,
        disk: u16,
        range: Option<(u64, u64)>,
        force: bool,
    ) -> (Pushed, Option<Record>) {
        let mut st = self.state();
        if !st.live {
            if let Some((off, len)) = range {
                st.dirty[usize::from(disk)].mark(off, len);
                self.stats.dirty_marked.fetch_add(1, Ordering::Relaxed);
            }
            return (Pushed::Dirty(st.sync_gen), None);
        }
        let len = rec.mem_bytes();
        if !force && self.log_bytes.load(Ordering::Acquire) + len > self.capacity {
            match self.on_full {
                OnFull::Block => return (Pushed::Full, Some(rec)),
                OnFull::Bitmap => {
                    st.live = false;
                    self.stats.log_overflows.fetch_add(1, Ordering::Relaxed);
                    if let Some((off, len)) = range {
                        st.dirty[usize::from(disk)].mark(off, len);
                        self.stats.dirty_marked.fetch_add(1, Ordering::Relaxed);
                    }
                    if !st.warned_full {
                        st.warned_full = true;
                        warn!(
                            "change log full ({} bytes): tracking dirty chunks until the replicator catches up",
                            self.capacity
                        );
                    }
                    return (Pushed::Dirty(st.sync_gen), None);
                }
            }
        }
        let epoch = st.drops;
        (Pushed::Queued(self.queue(&mut st, rec), epoch), None)
    }

    /// Numbers a record and hands it to the shipper; the caller holds the sequencer lock.
    fn queue(&self, st: &mut SeqState, mut rec: Record) -> u64 {
        let len = rec.mem_bytes();
        let seq = st.next_seq;
        st.next_seq += 1;
        let now = journal::now_ns();
        (rec.seq, rec.time_ns) = (seq, now);
        // The log was empty: this record is now the oldest one not yet durable.
        let _ = self.stats.oldest_unacked_ns.compare_exchange(
            0,
            now,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        self.log_bytes.fetch_add(len, Ordering::AcqRel);
        self.stats.records.fetch_add(1, Ordering::Relaxed);
        // The shipper holds the receiver for the life of the process.
        let _ = self.tx.send(rec);
        seq
    }

    /// Hands a guest's change to the log: its seq, or a dirty mark when records are not kept
    /// (`--on-full bitmap`). Never waits: gives the record back when the log is full and the
    /// change has to wait for room ([`Capture::push_when_room`]: `--on-full block`, sync
    /// mode). A guest write calls this and boxes the rare wait, so the future of every write
    /// stays small.
    #[allow(clippy::result_large_err)] // the Err is the record itself, handed back to wait
    pub(crate) fn push_now(
        &self,
        rec: Record,
        disk: u16,
        range: Option<(u64, u64)>,
    ) -> Result<Captured, Record> {
        // Sync mode never trades a guest write for a dirty mark while records are kept: a
        // full log makes the write wait, as --on-full block does.
        let wait = self.on_full == OnFull::Block || self.sync_waits();
        let (pushed, back) = if wait {
            self.try_push_waiting(rec, disk, range)
        } else {
            self.try_push(rec, disk, range, false)
        };
        match pushed {
            Pushed::Queued(seq, epoch) => Ok(Captured::Seq { seq, epoch }),
            Pushed::Dirty(generation) => Ok(Captured::Dirty(generation)),
            Pushed::Full => match back {
                Some(rec) => Err(rec),
                None => Ok(Captured::None),
            },
        }
    }

    /// Waits for room in the log, then hands the change to it.
    pub(crate) async fn push_when_room(
        &self,
        mut rec: Record,
        disk: u16,
        range: Option<(u64, u64)>,
    ) -> Captured {
        loop {
            self.room_for(rec.mem_bytes()).await;
            // Another change may have taken the room meanwhile: then wait again.
            rec = match self.push_now(rec, disk, range) {
                Ok(captured) => return captured,
                Err(rec) => rec,
            };
        }
    }

    fn try_push_waiting(
        &self,
        rec: Record,
        disk: u16,
        range: Option<(u64, u64)>,
    ) -> (Pushed, Option<Record>) {
        if self.full_for(rec.mem_bytes()) {
            return (Pushed::Full, Some(rec));
        }
        self.try_push(rec, disk, range, true)
    }

    /// Whether a record of `len` bytes has to wait for room: the log is live and it would pass
    /// the budget (an empty log takes any record).
    fn full_for(&self, len: u64) -> bool {
        let used = self.log_bytes.load(Ordering::Acquire);
        used > 0 && used + len > self.capacity && self.state().live
    }

    /// Waits until a record of `len` bytes fits in the log, or records are not kept (it would
    /// be a dirty mark). A sync waits here before it takes a chunk's range lock, so that a
    /// guest write to that chunk never waits on the replicator behind the sync.
    pub async fn room_for(&self, len: u64) {
        loop {
            // Registered before the look, so a release in between is not missed.
            let room = self.space.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if !self.full_for(len) {
                return;
            }
            room.await;
        }
    }

    /// A chunk read by a sync under its range lock: queued without waiting, even past the
    /// budget (by this one chunk: the sync waited in [`Capture::room_for`] before it took the
    /// lock, and a guest write may have filled the log since), or marked dirty when records
    /// are not kept.
    pub fn push_sync(&self, rec: Record, disk: u16, offset: u64, length: u64) -> Option<u64> {
        self.push_forced(rec, disk, Some((offset, length)))
    }

    /// A small record (flush, bookmark, sync marker): queued past the byte budget when live.
    pub fn push_control(&self, rec: Record) -> Option<u64> {
        self.push_forced(rec, 0, None)
    }

    fn push_forced(&self, rec: Record, disk: u16, range: Option<(u64, u64)>) -> Option<u64> {
        match self.try_push(rec, disk, range, true).0 {
            Pushed::Queued(seq, _) => Some(seq),
            _ => None,
        }
    }

    /// Whether sync mode makes writes wait for the replicator now (it does not once degraded).
    pub fn sync_waits(&self) -> bool {
        self.mode == Mode::Sync && !self.degraded.load(Ordering::Acquire)
    }

    /// A sync-mode write waited `--sync-timeout` in vain: from now on writes are acknowledged
    /// without waiting (async, with dirty tracking when the log fills) until the replicator has
    /// everything captured so far.
    pub(crate) fn degrade(&self, seq: u64) {
        self.degraded_until
            .fetch_max(self.last_seq(), Ordering::AcqRel);
        if !self.degraded.swap(true, Ordering::AcqRel) {
            warn!(
                "sync mode DEGRADED: the replicator has not acknowledged seq {seq} within \
                 --sync-timeout ({:?}); writes are acknowledged before they are replicated \
                 (RPO > 0) until it catches up",
                self.sync_timeout.unwrap_or_default()
            );
        }
    }

    /// A sync of generation `generation` queued its SyncEnd at `end`: once that is durable, the
    /// changes it carried are.
    pub fn sync_ended(&self, generation: u64, end: u64) {
        *self.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some((generation, end));
        self.publish_durable_gen(*self.acked.borrow());
    }

    /// The generation of the sync begun last.
    pub fn sync_gen(&self) -> u64 {
        self.state().sync_gen
    }

    fn publish_durable_gen(&self, acked: u64) {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((generation, end)) = *ended {
            if acked >= end {
                self.durable_gen.send_if_modified(|g| {
                    let newer = generation > *g;
                    *g = (*g).max(generation);
                    newer
                });
                *ended = None;
            }
        }
    }

    /// Called by the shipper when records up to `seq` are durable.
    pub fn release(&self, bytes: u64, seq: u64) {
        self.publish_durable_gen(seq);
        if self.degraded.load(Ordering::Acquire)
            && seq >= self.degraded_until.load(Ordering::Acquire)
            && self.degraded.swap(false, Ordering::AcqRel)
        {
            tracing::info!("sync mode restored: the replicator has caught up (seq {seq})");
        }
        self.log_bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.acked.send_if_modified(|a| {
            if seq > *a {
                *a = seq;
                true
            } else {
                false
            }
        });
        self.space.notify_waiters();
    }

    /// Waits until the replicator has `seq` durably.
    pub async fn durable(&self, seq: u64) {
        let mut rx = self.acked.subscribe();
        let _ = rx.wait_for(|a| *a >= seq).await;
    }

    pub fn is_live(&self) -> bool {
        self.state().live
    }

    /// Highest seq handed out so far.
    pub fn last_seq(&self) -> u64 {
        self.state().next_seq - 1
    }

    pub fn dirty_chunks(&self) -> u64 {
        self.state().dirty.iter().map(Dirty::count).sum()
    }

    pub fn full_sync_needed(&self) -> bool {
        self.state().full_sync_needed
    }

    /// The shipper's view at a handshake, taken under the sequencer lock so no record is
    /// numbered meanwhile: drains records not yet seen by the shipper into `unacked`, then
    /// decides whether the stream can resume after `durable`.
    /// `ours`: the replicator's journal ends with this proxy's own stream (see
    /// [`journal::wire::Hello::stream`]); when it does not, only a full comparison will do.
    pub fn handshake(
        &self,
        durable: u64,
        known: bool,
        ours: bool,
        rx: &crossbeam_channel::Receiver<Record>,
        unacked: &mut VecDeque<Record>,
        have_hashes: bool,
    ) -> Handshake {
        let mut st = self.state();
        if !ours {
            st.full_sync_needed = true;
        }
        if let Some(acked) = st.adopt_seq.take() {
            if known && durable >= acked && ours {
                // The activity log names every extent that may differ: resync those.
                st.next_seq = durable + 1;
            } else {
                warn!(
                    "the replicator has seq {durable} but this proxy's activity log says seq {acked} \
                     was durable: comparing every chunk by hash instead"
                );
                st.full_sync_needed = true;
            }
        }
        while let Ok(r) = rx.try_recv() {
            unacked.push_back(r);
        }
        // Records at or below the replicator's seq are durable there, when its journal holds
        // this stream; else the records it holds under those seqs are not ours.
        let mut freed = 0u64;
        while ours && unacked.front().is_some_and(|r| r.seq <= durable) {
            if let Some(r) = unacked.pop_front() {
                freed += r.mem_bytes();
            }
        }
        let continues = unacked
            .front()
            .map(|r| r.seq == durable + 1)
            .unwrap_or(st.next_seq == durable + 1);
        let decision = if st.full_sync_needed || !continues {
            if !have_hashes {
                st.full_sync_needed = true;
                Handshake::NeedHashes
            } else {
                // Start over from the replicator's seq: what we held is superseded by a full
                // comparison of content; a sync-mode write waiting for one of those records now
                // waits for that comparison instead.
                if let Some(from) = unacked.front().map(|r| r.seq) {
                    self.note_dropped(&mut st, from);
                }
                for r in unacked.drain(..) {
                    freed += r.mem_bytes();
                }
                st.next_seq = durable + 1;
                st.live = false;
                // Acks now count from the replicator's seq, even if it went back.
                self.acked.send_replace(durable);
                Handshake::FullSync
            }
        } else if !st.live || !known {
            Handshake::DirtySync
        } else {
            Handshake::Resume
        };
        drop(st);
        let acked = if ours { durable } else { *self.acked.borrow() };
        self.release(freed, acked);
        decision
    }

    /// Records that the records numbered from `from` (up to the last one numbered) were dropped
    /// from the log: their changes reach the replicator with the next sync instead. A sync end
    /// among them no longer counts. The caller holds the sequencer lock.
    fn note_dropped(&self, st: &mut SeqState, from: u64) {
        st.drops += 1;
        let lost = Dropped {
            epoch: st.drops,
            from,
            last: st.next_seq.saturating_sub(1),
            generation: st.sync_gen,
        };
        let mut d = self.dropped.lock().unwrap_or_else(|p| p.into_inner());
        if d.len() >= 64 {
            d.pop_front();
        }
        d.push_back(lost);
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.is_some_and(|(_, end)| end >= from) {
            *ended = None;
        }
    }

    /// Starts a sync: the log goes live again, a `SyncBegin` record is queued, and the chunks to
    /// send are returned (all of them for a full sync).
    pub fn begin_sync(&self, full: bool, reason: &str) -> Vec<Dirty> {
        let mut st = self.state();
        let mut dirty: Vec<Dirty> = st
            .dirty
            .iter_mut()
            .map(|d| std::mem::replace(d, Dirty::new(0)))
            .collect();
        for (d, &size) in st.dirty.iter_mut().zip(&self.sizes) {
            *d = Dirty::new(size);
        }
        if full {
            for (d, &size) in dirty.iter_mut().zip(&self.sizes) {
                *d = Dirty::new(size);
                d.mark_all(size);
            }
            st.full_sync_needed = false;
        }
        st.live = true;
        st.warned_full = false;
        st.sync_gen += 1;
        // Nothing changed without a record: the stream is consistent as it is, no markers.
        if !full && dirty.iter().all(|d| d.count() == 0) {
            return dirty;
        }
        // Queued under the same lock that turns the log live: no change can be numbered
        // between the last consistent point and this marker.
        self.queue(&mut st, Record::control(Kind::SyncBegin, 0, 0, 0, reason));
        dirty
    }

    /// The replicator refused the record at `seq` and will store nothing after it: that record
    /// and every later one leave the log (their ranges become dirty chunks, also in the
    /// activity log), numbering goes back to `seq`, and dirty tracking stays on until a resync
    /// sends those chunks' current content. So a refused record is never sent again.
    pub fn refused(
        &self,
        seq: u64,
        rx: &crossbeam_channel::Receiver<Record>,
        log: &mut VecDeque<Record>,
    ) -> u64 {
        let mut st = self.state();
        while let Ok(r) = rx.try_recv() {
            log.push_back(r);
        }
        let keep = log.partition_point(|r| r.seq < seq);
        let mut freed = 0u64;
        let mut dropped = 0u64;
        for r in log.drain(keep..) {
            freed += r.mem_bytes();
            dropped += 1;
            let (disk, offset, length) = r.range();
            if r.kind().changes_data() && length > 0 {
                if let Some(d) = st.dirty.get_mut(usize::from(disk)) {
                    d.mark(offset, length);
                }
                if let Some(al) = &self.activity {
                    al.unrecorded(usize::from(disk), offset, length);
                }
            }
        }
        self.note_dropped(&mut st, seq);
        st.next_seq = st.next_seq.min(seq);
        st.live = false;
        drop(st);
        self.log_bytes.fetch_sub(freed, Ordering::AcqRel);
        self.space.notify_waiters();
        dropped
    }

    /// If the record numbered `seq` in `epoch` was dropped by a later refusal: the generation
    /// after which the sync that carries its change instead is durable.
    pub(crate) fn dropped_generation(&self, seq: u64, epoch: u64) -> Option<u64> {
        let d = self.dropped.lock().unwrap_or_else(|p| p.into_inner());
        if d.front().is_some_and(|f| f.epoch > epoch.saturating_add(1)) && d.len() >= 64 {
            // Forgotten: assume the worst and wait for the newest generation.
            return d.back().map(|l| l.generation);
        }
        d.iter()
            .find(|l| l.epoch > epoch && l.from <= seq && seq <= l.last)
            .map(|l| l.generation)
    }

    /// Puts chunks a sync could not send back into the dirty set.
    pub fn requeue(&self, disk: usize, chunks: impl Iterator<Item = u64>) {
        let mut st = self.state();
        for c in chunks {
            st.dirty[disk].mark(c * HASH_CHUNK, 1);
        }
    }
}

/// What a handshake decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Send the unacked records after the durable seq; nothing else is missing.
    Resume,
    /// Resume, then resynchronize the dirty chunks.
    DirtySync,
    /// Compare every chunk with the replicator's hashes and send those that differ.
    FullSync,
    /// Reconnect asking for hashes (a full sync is needed).
    NeedHashes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_marks_chunks_once() {
        let mut d = Dirty::new(10 * HASH_CHUNK);
        d.mark(HASH_CHUNK - 1, 2);
        d.mark(0, 1);
        d.mark(9 * HASH_CHUNK, HASH_CHUNK);
        assert_eq!(d.chunks().collect::<Vec<_>>(), vec![0, 1, 9]);
        assert_eq!(d.count(), 3);
        d.mark_all(10 * HASH_CHUNK);
        assert_eq!(d.count(), 10);
    }
}
