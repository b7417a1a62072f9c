//! Seeding and resync: sends the current content of chunks the replicator may lack, between a
//! `SyncBegin` and a `SyncEnd` record. Each chunk is read under its range lock and numbered
//! like a write, so it lands in the stream in order with the guest's own writes (invariant 1);
//! restore treats the points between the two markers as not consistent (invariant 6).
//!
//! With hashes from the replicator (a full sync: first contact, or after a proxy restart), a
//! chunk whose hash equals the replicator's is skipped, so re-seeding an unchanged disk moves
//! only the hashes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use journal::record::{Encoded, Kind};
use journal::wire::{chunk_hash, HASH_CHUNK};
use nbd_server::BlockBackend;
use tracing::info;

use crate::capture::{Capture, CaptureBackend};

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
    let mut buf = vec![0u8; HASH_CHUNK as usize];
    for (d, set) in sets.iter().enumerate() {
        let disk = &disks[d];
        let size = disk.size_bytes();
        let chunks: Vec<u64> = set.chunks().collect();
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
            let range = disk.locks.lock(off, len as u64).await;
            if let Err(e) = disk.file.read(off, &mut buf[..len]).await {
                tracing::error!("{}: read of disk {d} at {off} failed: {e}", plan.reason);
                capture.requeue(d, std::iter::once(c));
                continue;
            }
            let same = plan
                .hashes
                .as_ref()
                .and_then(|h| h.get(d))
                .and_then(|h| h.get(c as usize))
                .is_some_and(|&h| h == chunk_hash(&buf[..len]));
            if same {
                stats.sync_chunks_skipped.fetch_add(1, Ordering::Relaxed);
            } else {
                let enc = Encoded::data(Kind::SyncData, d as u16, off, &buf[..len], true);
                capture.push_sync(enc, d as u16, off, len as u64).await;
                stats
                    .sync_bytes_sent
                    .fetch_add(len as u64, Ordering::Relaxed);
            }
            drop(range);
            stats.sync_chunks_done.fetch_add(1, Ordering::Relaxed);
        }
    }
    if total == 0 && !plan.full {
        // Nothing to resend (begin_sync placed no markers).
        stats.syncs_completed.fetch_add(1, Ordering::Relaxed);
        capture.syncing.store(false, Ordering::Release);
        return;
    }
    let end = capture.push_control(Encoded::control(Kind::SyncEnd, 0, 0, 0, plan.reason));
    if let Some(end) = end {
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
