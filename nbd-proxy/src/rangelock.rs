//! Async range locks: writes to overlapping byte ranges of one disk take turns, so the order
//! in which they reach the image is the order of their seqs (invariant 1). Ranges that do not
//! overlap proceed at once.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: std::sync::atomic::AtomicU64,
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
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                if !held.iter().any(|&(s, e, _)| s < end && start < e) {
                    held.push((start, end, id));
                    return RangeGuard { locks: self, id };
                }
            }
            released.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|&(_, _, id)| id == self.id) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_waiters();
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
