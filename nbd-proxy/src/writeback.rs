//! The disks' writeback while replicating: the guest's writes leave the page cache for the disk
//! a little at a time, so that the replicator's journal writes and fsyncs (on the same disk, in
//! the usual set-up) never queue behind many of them.
//!
//! Left to the kernel, dirty pages expire after 30 s and the whole lot reaches the disk at once
//! (a 1 GiB image written at random: about a second in which the journal's writes wait). Writing
//! back everything once a second still sent a second of random 4 KiB writes at a time, which
//! held the journal's writes for 100–300 ms every few seconds (`lag_ms` p99 156–208 ms at half
//! the plain proxy's rate). Writing back everything after every 32 MiB of guest writes kept the
//! bursts small, but wrote every guest write as its own 4 KiB request, soon after it landed:
//! nothing was absorbed by a later write to the same page, little merged with its neighbours,
//! and the completions of those many small requests lengthened the guest's own write latency
//! (4k QD1 p99 178 µs against 140 µs with no writeback at all).
//!
//! So the thread *sweeps*: each tick it starts the writeback of the next slice of each image,
//! in file order, wrapping at the end. A full pass takes [`PASS`], or less when the guest
//! writes fast: never more than `pass_bytes` of guest writes (see [`pass_bytes`]), so the dirty
//! pages of an image stay well below the kernel's background-writeback threshold. A page is
//! written back at most one pass after it was dirtied, after the guest's later writes to it have
//! been absorbed and together with the dirty pages around it.
//!
//! What the sweep cannot prevent: `sync_file_range` never marks the inode clean (as we read the
//! kernel), so while the guest keeps writing, the kernel's flusher still finds the image's inode
//! dirty for 30 s and writes back all its dirty pages then, every 30 s or so (seen as `Dirty:`
//! in /proc/meminfo falling from about 250 MB to 10–90 MB at 60,000 IOPS). The sweep bounds
//! what it finds to about a pass's worth, in file order; `lag_ms` max 55–245 ms at half the
//! plain rate.
//!
//! **Only when the store shares a disk with the images.** The sweep protects the journal's
//! writes and fsyncs from the images' writeback, and the guest pays for it: within a pass few
//! rewrites of a page are absorbed, and every page written back costs CPU. Without the byte
//! bound (a pass per 15 s only), async 4k QD32 ran 1.29x faster here, but the kernel's 30 s
//! flush could then find the whole image dirty, and the lag's p99 at half rate went from 29 to
//! 166 ms (BENCHMARKS.md, tenth pass). The replicator's Welcome
//! names the disks its store lives on ([`journal::disks`]); with `--writeback auto` (the
//! default) the thread sweeps only while they share one with an image, or while that is
//! unknown (before the first Welcome, or from a replicator too old to say), and otherwise
//! leaves the images' writeback to the kernel, as the plain proxy does. `--writeback sweep`
//! and `kernel` force either.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::capture::Capture;

/// A full pass over each image takes at most this long while the guest writes: within the
/// kernel's 30 s expiry of dirty data, so a trickle is written back in slices too.
const PASS: Duration = Duration::from_secs(15);
/// Bounds of the guest bytes written during one pass (see [`pass_bytes`]).
const PASS_BYTES_MIN: u64 = 32 << 20;
const PASS_BYTES_MAX: u64 = 512 << 20;
/// How often the thread writes back a slice.
const TICK: Duration = Duration::from_millis(10);
const PAGE: u64 = 4096;

/// `--writeback`: who writes the images' dirty pages back while replicating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Setting {
    /// Sweep while the replicator's store shares a disk with an image (or nobody knows yet),
    /// leave it to the kernel otherwise.
    Auto,
    /// Always sweep.
    Sweep,
    /// Never sweep: the kernel writes back, as without replication.
    Kernel,
}

/// Whether the thread sweeps, from `--writeback` and what the replicator said about its store.
#[derive(Debug)]
pub struct Policy {
    setting: Setting,
    /// The disks the images live on (None: unknown).
    images: Option<Vec<String>>,
    /// What the last Welcome said: one of UNKNOWN, SHARED, APART.
    store: AtomicU8,
}

const UNKNOWN: u8 = 0;
const SHARED: u8 = 1;
const APART: u8 = 2;

impl Policy {
    pub fn new(setting: Setting, images: &[PathBuf]) -> Policy {
        let images = images
            .iter()
            .map(|p| journal::disks::disks_of(p))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        Policy {
            setting,
            images,
            store: AtomicU8::new(UNKNOWN),
        }
    }

    /// A Welcome named the store's disks (None: the replicator did not say).
    pub fn store_is_on(&self, store: Option<&[String]>) {
        let state = match (store, &self.images) {
            (Some(store), Some(images)) if !journal::disks::share_a_disk(store, images) => APART,
            (Some(_), Some(_)) => SHARED,
            _ => UNKNOWN,
        };
        self.store.store(state, Ordering::Relaxed);
    }

    pub fn sweeps(&self) -> bool {
        self.sweeps_if(self.store.load(Ordering::Relaxed))
    }

    fn sweeps_if(&self, store: u8) -> bool {
        match self.setting {
            Setting::Sweep => true,
            Setting::Kernel => false,
            Setting::Auto => store != APART,
        }
    }

    /// For `nbd-proxy status`: whether the thread sweeps, and a sentence saying who writes
    /// back and why; both from one reading of what the replicator said, so that a Welcome in
    /// between cannot make them disagree.
    pub fn describe(&self) -> (bool, String) {
        let store = self.store.load(Ordering::Relaxed);
        let sweeps = self.sweeps_if(store);
        let who = if sweeps {
            "swept by the proxy"
        } else {
            "left to the kernel"
        };
        let why = match (self.setting, store) {
            (Setting::Sweep, _) => "--writeback sweep",
            (Setting::Kernel, _) => "--writeback kernel",
            (Setting::Auto, SHARED) => "the replicator's store shares a disk with the images",
            (Setting::Auto, APART) => "the replicator's store is on other disks",
            (Setting::Auto, _) => "not known whether the replicator's store shares a disk",
        };
        (sweeps, format!("{who} ({why})"))
    }
}

/// The guest bytes one pass may take at most: a quarter of the dirty memory at which the kernel
/// starts writing back in the background (`vm.dirty_background_bytes`, or
/// `vm.dirty_background_ratio` of the available memory), within 32 MiB..=512 MiB. Read once.
fn pass_bytes() -> u64 {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let number = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
    let available = || {
        read("/proc/meminfo")?
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    let threshold = match number(read("/proc/sys/vm/dirty_background_bytes")) {
        Some(b) if b > 0 => Some(b),
        _ => number(read("/proc/sys/vm/dirty_background_ratio"))
            .zip(available())
            .map(|(ratio, avail)| avail / 100 * ratio),
    };
    threshold
        .map_or(PASS_BYTES_MAX, |t| t / 4)
        .clamp(PASS_BYTES_MIN, PASS_BYTES_MAX)
}

/// The share of a pass due now: `elapsed` since the last slice and `written` guest bytes since
/// then, whichever asks for more; at most a whole pass.
fn share(elapsed: Duration, written: u64, pass_bytes: u64) -> f64 {
    let by_time = elapsed.as_secs_f64() / PASS.as_secs_f64();
    let by_bytes = written as f64 / pass_bytes.max(1) as f64;
    by_time.max(by_bytes).min(1.0)
}

/// Where a sweep over one image stands.
#[derive(Debug)]
struct Sweep {
    len: u64,
    /// Where the next slice starts, below `len`.
    pos: u64,
}

impl Sweep {
    fn new(len: u64) -> Sweep {
        Sweep { len, pos: 0 }
    }

    /// The next slice, `share` of the image rounded up to whole pages (one page at least), as
    /// one range (offset, length) or two when it wraps past the end.
    fn next(&mut self, share: f64) -> Vec<(u64, u64)> {
        if self.len == 0 {
            return Vec::new();
        }
        let want = ((self.len as f64 * share).ceil() as u64)
            .div_ceil(PAGE)
            .max(1)
            .saturating_mul(PAGE);
        if want >= self.len {
            self.pos = 0;
            return vec![(0, self.len)];
        }
        let start = self.pos;
        let end = start + want;
        if end < self.len {
            self.pos = end;
            vec![(start, want)]
        } else {
            self.pos = end - self.len;
            let mut v = vec![(start, self.len - start)];
            if self.pos > 0 {
                v.push((0, self.pos));
            }
            v
        }
    }
}

/// Runs on its own thread for the life of the process. From start-up, while the guest writes, and
/// for one pass after its last write, each tick starts the writeback of the next slice of every
/// image, as long as the policy says to sweep.
pub fn run(capture: Arc<Capture>, images: Vec<File>, policy: Arc<Policy>) {
    let pass_bytes = pass_bytes();
    let mut sweeps: Vec<Sweep> = images
        .iter()
        .map(|f| Sweep::new(f.metadata().map_or(0, |m| m.len())))
        .collect();
    let bytes = || capture.stats.guest_write_bytes.load(Ordering::Relaxed);
    let (mut seen, mut at) = (bytes(), Instant::now());
    // A first pass from start-up: an image copied just before may still be dirty.
    let mut last_write = Instant::now();
    loop {
        std::thread::sleep(TICK);
        let now = bytes();
        if now != seen {
            last_write = Instant::now();
        }
        let share = share(at.elapsed(), now - seen, pass_bytes);
        (seen, at) = (now, Instant::now());
        if last_write.elapsed() > PASS + TICK || !policy.sweeps() {
            continue;
        }
        for (file, sweep) in images.iter().zip(&mut sweeps) {
            for (offset, len) in sweep.next(share) {
                start(file, offset, len);
            }
        }
    }
}

/// Starts writing a range's dirty pages to disk without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): not a durability step (the guest's flush is).
fn start(file: &File, offset: u64, len: u64) {
    // SAFETY: a valid open fd; no memory is passed. A failure only leaves the writeback to the
    // kernel. `len` is never 0 (which would mean "to the end of the file").
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_takes_its_time_or_its_bytes_whichever_comes_first() {
        let mib = 1 << 20;
        assert_eq!(share(Duration::ZERO, 0, 512 * mib), 0.0);
        assert_eq!(share(PASS / 10, 0, 512 * mib), 0.1);
        assert_eq!(share(PASS / 10, 256 * mib, 512 * mib), 0.5);
        assert_eq!(share(PASS * 3, 0, 512 * mib), 1.0, "never more than a pass");
        assert_eq!(share(Duration::ZERO, 4096 * mib, 512 * mib), 1.0);
    }

    #[test]
    fn it_sweeps_unless_the_store_is_known_to_be_on_other_disks() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, b"x").unwrap();
        let ours = journal::disks::disks_of(&image).unwrap();
        let elsewhere = vec!["another-machine/8:0".to_string()];
        let auto = Policy::new(Setting::Auto, std::slice::from_ref(&image));
        assert!(auto.sweeps(), "before the first Welcome");
        auto.store_is_on(Some(&elsewhere));
        assert!(!auto.sweeps());
        assert!(
            auto.describe().1.starts_with("left to the kernel"),
            "{}",
            auto.describe().1
        );
        auto.store_is_on(Some(&ours));
        assert!(auto.sweeps(), "{}", auto.describe().1);
        auto.store_is_on(Some(&elsewhere));
        auto.store_is_on(None);
        assert!(auto.sweeps(), "a replicator that does not say");
        for (setting, sweeps) in [(Setting::Sweep, true), (Setting::Kernel, false)] {
            let forced = Policy::new(setting, std::slice::from_ref(&image));
            for store in [None, Some(&elsewhere), Some(&ours)] {
                forced.store_is_on(store.map(Vec::as_slice));
                assert_eq!(forced.sweeps(), sweeps, "{setting:?}, store {store:?}");
            }
        }
        let unknown = Policy::new(Setting::Auto, &[dir.path().join("missing")]);
        unknown.store_is_on(Some(&elsewhere));
        assert!(unknown.sweeps(), "images whose disks are unknown");
    }

    #[test]
    fn the_kernels_threshold_bounds_a_pass() {
        let b = pass_bytes();
        assert!((PASS_BYTES_MIN..=PASS_BYTES_MAX).contains(&b), "{b}");
    }

    #[test]
    fn slices_cover_every_page_once_per_pass_in_order_and_wrap() {
        let len = 10 * PAGE + 100; // an image need not end on a page
        let mut s = Sweep::new(len);
        let mut covered = vec![0u32; len as usize];
        let mark = |covered: &mut Vec<u32>, ranges: Vec<(u64, u64)>| {
            for (o, l) in ranges {
                assert!(l > 0 && o + l <= len, "({o}, {l}) within the image");
                for b in o..o + l {
                    covered[b as usize] += 1;
                }
            }
        };
        // Three pages a slice: 11 pages (the last one partial) take 4 slices, the fourth wraps
        // to the start.
        for _ in 0..3 {
            mark(&mut covered, s.next(3.0 * PAGE as f64 / len as f64 - 1e-9));
        }
        assert!(covered[..9 * PAGE as usize].iter().all(|&c| c == 1));
        assert!(covered[9 * PAGE as usize..].iter().all(|&c| c == 0));
        let wrapped = s.next(3.0 * PAGE as f64 / len as f64 - 1e-9);
        assert_eq!(wrapped, vec![(9 * PAGE, PAGE + 100), (0, 2 * PAGE - 100)]);
        mark(&mut covered, wrapped);
        assert!(
            covered.iter().all(|&c| c >= 1),
            "a whole pass covers it all"
        );

        assert_eq!(s.next(0.0).len(), 1, "at least a page each tick");
        assert_eq!(s.next(1.0), vec![(0, len)], "a whole pass at once");
        assert_eq!(s.next(1e-12), vec![(0, PAGE)], "then it starts over");
        assert!(
            Sweep::new(0).next(1.0).is_empty(),
            "an empty image has no slices"
        );
    }
}
