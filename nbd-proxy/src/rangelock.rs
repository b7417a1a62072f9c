//! Async range locks: writes to overlapping byte ranges of one disk take turns, so the order
//! in which they reach the image is the order of their seqs (invariant 1). Ranges that do not
//! overlap proceed at once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: AtomicU64,
    /// Lockers waiting for a range: a release wakes them only when there are some (a wake-up
    /// takes the Notify's own lock, on every write's path otherwise).
    waiting: AtomicUsize,
    released: Notify,
}

#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// Waits until no held range overlaps `start..start+len`, then holds it.
    pub async fn lock(&self, start: u64, len: u64) -> RangeGuard<'_> {
        let end = start.saturating_add(len.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if self.try_hold(start, end, id) {
            return RangeGuard { locks: self, id };
        }
        // Boxed: the future of every change holds only a pointer to the waiting state.
        Box::pin(self.wait_for(start, end, id)).await
    }

    async fn wait_for(&self, start: u64, end: u64, id: u64) -> RangeGuard<'_> {
        // Counted before the waiter is registered and the ranges looked at again: a release
        // that sees no waiter removed its range before that second look, so it is not missed.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.try_hold(start, end, id) {
                return RangeGuard { locks: self, id };
            }
            released.await;
        }
    }

    fn try_hold(&self, start: u64, end: u64, id: u64) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.iter().any(|&(s, e, _)| s < end && start < e) {
            return false;
        }
        held.push((start, end, id));
        true
    }
}

/// A locker waiting; uncounted when it holds its range or gives up (its future dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|&(_, _, id)| id == self.id) {
            held.swap_remove(i);
        }
        drop(held);
        if self.locks.waiting.load(Ordering::SeqCst) > 0 {
            self.locks.released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn overlapping_ranges_wait_and_others_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.lock(0, 4096).await;
        // Disjoint: immediate.
        let b = locks.lock(4096, 4096).await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _c = l2.lock(100, 10).await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.unwrap();
        drop(b);
    }
}
