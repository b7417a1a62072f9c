//! The disks' writeback while replicating: the guest's writes leave the page cache for the disk
//! in small bursts, soon after they land, so that the replicator's journal writes and fsyncs
//! (on the same disk, in the usual set-up) never queue behind many of them.
//!
//! Left to the kernel, dirty pages expire after 30 s and the whole lot reaches the disk at once
//! (a 1 GiB image written at random: about a second in which the journal's writes wait). Writing
//! back once a second still sent a second of random 4 KiB writes at a time, which held the
//! journal's writes for 100–300 ms every few seconds (`lag_ms` p99 156–208 ms at half the plain
//! proxy's rate). So a burst is bounded by bytes: writeback starts once [`BURST`] bytes were
//! written since the last one (or a second has passed with anything written).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::capture::Capture;

/// Guest bytes written that start a writeback: what the disk receives at once, at most (plus
/// one tick's worth of writes).
pub const BURST: u64 = 32 << 20;
/// A trickle of writes is written back after this long, as the kernel would much later.
const AT_LEAST_EVERY: Duration = Duration::from_secs(1);
/// How often the thread looks at the guest's bytes while the guest writes, and when it does not.
const TICK: Duration = Duration::from_millis(10);
const IDLE_TICK: Duration = Duration::from_millis(100);

/// Whether to start a writeback now: `written` guest bytes since the last one, `since` it.
pub fn due(written: u64, since: Duration) -> bool {
    written >= BURST || (written > 0 && since >= AT_LEAST_EVERY)
}

/// Runs on its own thread for the life of the process.
pub fn run(capture: Arc<Capture>, images: Vec<File>) {
    let bytes = || capture.stats.guest_write_bytes.load(Ordering::Relaxed);
    let (mut done, mut at) = (bytes(), Instant::now());
    let mut last = done;
    loop {
        let now = bytes();
        let tick = if now == last { IDLE_TICK } else { TICK };
        last = now;
        if due(now - done, at.elapsed()) {
            start(&images);
            (done, at) = (now, Instant::now());
        }
        std::thread::sleep(tick);
    }
}

/// Starts writing the files' dirty pages to disk without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): not a durability step (the guest's flush is).
fn start(files: &[File]) {
    for f in files {
        // SAFETY: a valid open fd; no memory is passed. A failure only leaves the writeback
        // to the kernel.
        unsafe {
            libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_bytes_or_a_second_of_a_trickle_starts_a_writeback() {
        assert!(
            !due(0, Duration::from_secs(60)),
            "nothing written: nothing to do"
        );
        assert!(!due(BURST - 1, Duration::from_millis(999)));
        assert!(due(BURST, Duration::ZERO));
        assert!(due(4096, AT_LEAST_EVERY));
        assert!(!due(4096, AT_LEAST_EVERY - Duration::from_millis(1)));
    }
}
