//! Seeding and resync: sends the current content of chunks the replicator may lack, between a
//! `SyncBegin` and a `SyncEnd` record. Each chunk is read under its range lock and numbered
//! like a write, so it lands in the stream in order with the guest's own writes (invariant 1);
//! restore treats the points between the two markers as not consistent (invariant 6). A chunk
//! waits for room in the change log before its lock is taken, never while holding it: a guest
//! write to that chunk must not wait on the replicator behind a sync.
//!
//! With hashes from the replicator (a full sync: first contact, or after a proxy restart), a
//! chunk whose hash equals the replicator's is skipped, so re-seeding an unchanged disk moves
//! only the hashes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use journal::record::Kind;
use journal::wire::{chunk_hash, HASH_CHUNK};
use nbd_server::{BlockBackend, Buffer};
use tracing::info;

use crate::capture::Capture;
use crate::disk::CaptureBackend;
use crate::record::Record;

#[derive(Debug)]
pub struct Plan {
    pub full: bool,
    /// Per disk, the replicator's chunk hashes (full syncs only).
    pub hashes: Option<Vec<Vec<u128>>>,
    pub reason: &'static str,
}

pub async fn run(capture: Arc<Capture>, disks: Vec<Arc<CaptureBackend>>, plan: Plan) {
    let started = std::time::Instant::now();
    if let (true, Some(al)) = (plan.full, &capture.activity) {
        // Until this comparison completes, the activity log proves nothing.
        if let Err(e) = al.set_synced(false) {
            tracing::error!("write activity log {}: {e}", al.path().display());
        }
    }
    let sets = capture.begin_sync(plan.full, plan.reason);
    let generation = capture.sync_gen();
    let stats = &capture.stats;
    let total: u64 = sets.iter().map(|d| d.count()).sum();
    stats.sync_chunks_total.store(total, Ordering::Relaxed);
    stats.sync_chunks_done.store(0, Ordering::Relaxed);
    stats.sync_chunks_skipped.store(0, Ordering::Relaxed);
    stats.sync_bytes_sent.store(0, Ordering::Relaxed);
    info!(
        "{} started: {total} chunks of {} KiB to {}",
        plan.reason,
        HASH_CHUNK / 1024,
        if plan.hashes.is_some() {
            "compare"
        } else {
            "send"
        }
    );
    let mut unread = 0u64;
    for (d, set) in sets.iter().enumerate() {
        let disk = &disks[d];
        let size = disk.size_bytes();
        let chunks: Vec<u64> = set.chunks().collect();
        let mut uncache = Uncache::default();
        for (i, &c) in chunks.iter().enumerate() {
            if !capture.is_live() {
                capture.requeue(d, chunks[i..].iter().copied());
                for later in sets.iter().enumerate().skip(d + 1) {
                    capture.requeue(later.0, later.1.chunks());
                }
                info!(
                    "{} interrupted (the change log filled again); it will resume",
                    plan.reason
                );
                capture.syncing.store(false, Ordering::Release);
                return;
            }
            let off = c * HASH_CHUNK;
            let len = HASH_CHUNK.min(size - off) as usize;
            // Room first, then the lock: a guest write to this chunk must not wait behind a
            // sync that waits for the replicator (with --on-full bitmap it would otherwise
            // never wait at all).
            capture.room_for(len as u64).await;
            let range = disk.locks.lock(off, len as u64).await;
            // Pooled: a chunk sent stays in the change log in this buffer, not a copy of it.
            let mut buf = Buffer::take(len);
            if let Err(e) = disk.file.read(off, &mut buf).await {
                tracing::error!(
                    "{}: read of disk {d} at {off} failed: {e}; the chunk stays dirty and the \
                     sync's window stays open (not consistent) until it is read",
                    plan.reason
                );
                capture.requeue(d, std::iter::once(c));
                stats.sync_read_failures.fetch_add(1, Ordering::Relaxed);
                unread += 1;
                continue;
            }
            uncache.read(off, len as u64, |o, l| disk.file.uncache(o, l));
            let same = plan
                .hashes
                .as_ref()
                .and_then(|h| h.get(d))
                .and_then(|h| h.get(c as usize))
                .is_some_and(|&h| h == chunk_hash(&buf));
            if same {
                stats.sync_chunks_skipped.fetch_add(1, Ordering::Relaxed);
            } else {
                let rec = Record::data(Kind::SyncData, d as u16, off, buf);
                capture.push_sync(rec, d as u16, off, len as u64);
                stats
                    .sync_bytes_sent
                    .fetch_add(len as u64, Ordering::Relaxed);
            }
            drop(range);
            stats.sync_chunks_done.fetch_add(1, Ordering::Relaxed);
        }
        uncache.finish(|o, l| disk.file.uncache(o, l));
    }
    if total == 0 && !plan.full {
        // Nothing to resend (begin_sync placed no markers).
        capture.sync_ended(generation, 0);
        stats.syncs_completed.fetch_add(1, Ordering::Relaxed);
        capture.syncing.store(false, Ordering::Release);
        return;
    }
    if unread > 0 {
        // A window closes only when every chunk in it was sent: no SyncEnd. The unread chunks
        // are dirty again; the shipper retries them, and that sync's SyncEnd closes the window.
        tracing::error!(
            "{} incomplete: {unread} of {total} chunks could not be read; points stay marked \
             not consistent until a retry sends them",
            plan.reason
        );
        capture.syncing.store(false, Ordering::Release);
        return;
    }
    let end = capture.push_control(Record::control(Kind::SyncEnd, 0, 0, 0, plan.reason));
    if let Some(end) = end {
        capture.sync_ended(generation, end);
        stats.syncs_completed.fetch_add(1, Ordering::Relaxed);
        if let Some(al) = &capture.activity {
            // Changes made while only dirty chunks were tracked are covered from here on.
            al.resynced(end);
            if plan.full {
                if let Err(e) = al.set_synced(true) {
                    tracing::error!("write activity log {}: {e}", al.path().display());
                }
            }
        }
    }
    info!(
        "{} done in {:.1} s: {} of {total} chunks sent ({} bytes), {} unchanged",
        plan.reason,
        started.elapsed().as_secs_f64(),
        total - stats.sync_chunks_skipped.load(Ordering::Relaxed),
        stats.sync_bytes_sent.load(Ordering::Relaxed),
        stats.sync_chunks_skipped.load(Ordering::Relaxed),
    );
    capture.syncing.store(false, Ordering::Release);
}

/// What a sync reads is sent once and not worth keeping in the page cache: it is dropped
/// ([`nbd_server::FileBackend::uncache`]) a window at a time once the sync has moved past it.
/// Whole windows, because the kernel drops only folios entirely inside the range (read ahead,
/// they are up to 2 MiB here). Left cached, a seed's read of the image made the guest's 4k
/// writes 3-4x slower afterwards (BENCHMARKS.md, sixth pass).
#[derive(Default)]
struct Uncache {
    /// The windows read and not dropped yet (the last one is still being read).
    pending: Option<(u64, u64)>,
}

/// Bytes the page cache is dropped in, aligned.
const UNCACHE_WINDOW: u64 = 8 << 20;

impl Uncache {
    /// `offset..offset+length` was read; `evict` is given each range to drop now.
    fn read(&mut self, offset: u64, length: u64, mut evict: impl FnMut(u64, u64)) {
        let start = offset / UNCACHE_WINDOW * UNCACHE_WINDOW;
        let end = (offset + length).div_ceil(UNCACHE_WINDOW) * UNCACHE_WINDOW;
        self.pending = match self.pending {
            // Moved on within a run of windows: drop those behind.
            Some((s, e)) if start <= e => {
                if start > s {
                    evict(s, start - s);
                }
                Some((start.max(s), e.max(end)))
            }
            _ => {
                self.finish(evict);
                Some((start, end))
            }
        };
    }

    /// The sync is done with this disk: drop what is left.
    fn finish(&mut self, mut evict: impl FnMut(u64, u64)) {
        if let Some((s, e)) = self.pending.take() {
            evict(s, e - s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Mode, OnFull};
    use nbd_server::FileBackend;

    fn kinds(rx: &crossbeam_channel::Receiver<Record>) -> Vec<Kind> {
        rx.try_iter().map(|r| r.kind()).collect()
    }

    /// An image of four chunks of 7s at `path`, captured async with `--on-full bitmap`.
    fn four_chunk_disk(
        path: &std::path::Path,
        capacity: u64,
    ) -> (
        Arc<Capture>,
        crossbeam_channel::Receiver<Record>,
        Arc<CaptureBackend>,
    ) {
        let size = 4 * HASH_CHUNK;
        std::fs::write(path, vec![7u8; size as usize]).unwrap();
        let (capture, rx) = Capture::new(
            vec![size],
            capacity,
            Mode::Async,
            OnFull::Bitmap,
            None,
            None,
        );
        let disk = Arc::new(CaptureBackend {
            file: FileBackend::open(path, false).unwrap(),
            locks: Default::default(),
            capture: capture.clone(),
            disk: 0,
        });
        (capture, rx, disk)
    }

    /// A chunk that cannot be read keeps the sync's window open: no SyncEnd until a retry has
    /// sent it. (Before the fix, a failed read still ended the window: a point missing that
    /// chunk was marked consistent.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_that_cannot_be_read_keeps_the_window_open() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, size) = (tmp.path().join("d.img"), 4 * HASH_CHUNK);
        let (capture, rx, disk) = four_chunk_disk(&path, 64 << 20);
        // The image loses its second half under the proxy: those chunks fail to read.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(2 * HASH_CHUNK + 100)
            .unwrap();
        let plan = Plan {
            full: true,
            hashes: None,
            reason: "seed",
        };
        capture.syncing.store(true, Ordering::Release);
        run(capture.clone(), vec![disk.clone()], plan).await;
        let got = kinds(&rx);
        assert_eq!(got.first(), Some(&Kind::SyncBegin));
        assert_eq!(got.iter().filter(|k| **k == Kind::SyncData).count(), 2);
        assert!(!got.contains(&Kind::SyncEnd), "{got:?}");
        assert_eq!(capture.dirty_chunks(), 2);
        assert_eq!(capture.stats.sync_read_failures.load(Ordering::Relaxed), 2);
        assert!(!capture.syncing.load(Ordering::Acquire));

        // Once the chunks read again, the retry sends them and closes the window.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(size)
            .unwrap();
        let retry = Plan {
            full: false,
            hashes: None,
            reason: "resync",
        };
        capture.syncing.store(true, Ordering::Release);
        run(capture.clone(), vec![disk], retry).await;
        let got = kinds(&rx);
        assert_eq!(got.iter().filter(|k| **k == Kind::SyncData).count(), 2);
        assert_eq!(got.last(), Some(&Kind::SyncEnd));
        assert_eq!(capture.dirty_chunks(), 0);
    }

    /// A sync waits for room in the log before it takes a chunk's range lock. With the log
    /// full, a guest write to the very chunk the sync is about to send completes at once
    /// (`--on-full bitmap`: the change becomes a dirty mark). Before, the sync held the chunk's
    /// lock while it waited, and the guest's write waited for the replicator with it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_sync_waiting_for_room_does_not_hold_its_chunks_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d.img");
        let chunk = HASH_CHUNK as usize;
        let one = Record::data(Kind::Write, 0, 0, Buffer::take(chunk)).mem_bytes();
        // Room for two chunk-sized records, not three.
        let (capture, rx, disk) = four_chunk_disk(&path, 2 * one + one / 2);
        // Live (as after the first contact); two writes fill the log, the third overflows it
        // and marks chunk 2 dirty.
        capture.begin_sync(false, "test");
        for c in 0..3u64 {
            disk.write(c * HASH_CHUNK, &vec![1u8; chunk], false)
                .await
                .unwrap();
        }
        assert!(!capture.is_live());
        assert_eq!(capture.dirty_chunks(), 1);

        // The resync turns the log live again and waits for room to send chunk 2.
        capture.syncing.store(true, Ordering::Release);
        let plan = Plan {
            full: false,
            hashes: None,
            reason: "resync",
        };
        let sync = tokio::spawn(run(capture.clone(), vec![disk.clone()], plan));
        while !capture.is_live() {
            tokio::task::yield_now().await;
        }
        // Time for a sync that holds the lock while it waits to get that far.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;

        // The guest rewrites chunk 2: the lock is free, the full log makes it a dirty mark.
        // (The timeout only turns the old behaviour, a write stuck until the replicator
        // frees room, into a failure instead of a hang.)
        let twos = vec![2u8; chunk];
        let write = disk.write(2 * HASH_CHUNK, &twos, false);
        tokio::time::timeout(std::time::Duration::from_secs(60), write)
            .await
            .expect("a guest write waited behind a sync waiting for room")
            .unwrap();
        assert_eq!(capture.stats.log_overflows.load(Ordering::Relaxed), 2);
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[2 * chunk..3 * chunk].iter().all(|&b| b == 2));

        // The replicator frees the log: the sync goes on, finds records not kept any more,
        // and leaves chunk 2 dirty for the next one; its window stays open (no SyncEnd).
        let queued: Vec<Record> = rx.try_iter().collect();
        let bytes = queued.iter().map(Record::mem_bytes).sum();
        capture.release(bytes, capture.last_seq());
        sync.await.unwrap();
        assert_eq!(capture.dirty_chunks(), 1);
        assert!(!kinds(&rx).contains(&Kind::SyncEnd));
        assert!(!capture.syncing.load(Ordering::Acquire));
    }

    /// A sync's reads are dropped from the page cache a whole window at a time, each window
    /// once, and only once the sync has moved past it (or is done with the disk).
    #[test]
    fn a_sync_drops_whole_windows_behind_it() {
        let w = UNCACHE_WINDOW;
        let c = HASH_CHUNK;
        let mut dropped = Vec::new();
        let mut u = Uncache::default();
        // A run of chunks through two windows and into a third.
        for i in 0..(2 * w / c + 1) {
            u.read(i * c, c, |o, l| dropped.push((o, l)));
        }
        assert_eq!(dropped, [(0, w), (w, w)], "the window being read stays");
        // A gap: the pending window goes, the next one starts.
        u.read(10 * w + c, c, |o, l| dropped.push((o, l)));
        assert_eq!(dropped[2..], [(2 * w, w)]);
        // A chunk across a window boundary, then the end of the disk.
        u.read(11 * w - c / 2, c, |o, l| dropped.push((o, l)));
        u.finish(|o, l| dropped.push((o, l)));
        assert_eq!(dropped[3..], [(10 * w, 2 * w)]);
    }
}
