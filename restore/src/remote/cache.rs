//! Range GETs for restore: a pool of fetch threads (each with its own client) and a bounded
//! cache of checked blocks of the bucket's objects, with read-ahead on sequential access and
//! (for exports) a background fetch of everything the point may read, so that reads that
//! would each need a GET (a sequential scan over random records) become local ones.
//!
//! A block is [`BLOCK`] bytes of one object. Blocks of base chunks are checked against the
//! base's checksums (one xxh3-128 per 256 KiB, from a sums object whose sha256 the manifest
//! names) before they enter the cache; blocks of segments are checked by their reader, record
//! by record (record crc, seq and length against the index, whose sha256 the manifest names).
//! So no byte reaches a client unchecked. The cache is a sparse file holding at most its budget
//! of blocks (least recently used go first, never one being read); blocks being fetched are
//! waited for, never fetched twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::{mpsc, Arc, Condvar, Mutex, RwLock};

use bucket::{Bucket, Location, Settings};
use bytes::Bytes;
use journal::sums::Sums;
use tracing::{error, info};

/// The unit of range GETs and of the cache: the base checksums' chunk.
pub const BLOCK: u64 = journal::wire::HASH_CHUNK;
/// Read-ahead grows to this many blocks (4 MiB) while a reader goes on sequentially.
const AHEAD_MAX: u64 = 16;
/// Consecutive blocks of an object fetched by one GET, at most (4 MiB).
const RUN_MAX: u64 = 16;

type Job = Box<dyn FnOnce(&Bucket) + Send>;

#[derive(Default)]
struct Queues {
    /// What a reader waits for, first.
    demand: VecDeque<Job>,
    /// Read-ahead, when no reader waits.
    ahead: VecDeque<Job>,
}

/// Threads that make the bucket's requests. Restore's own threads may run inside an async
/// runtime, where a blocking client must not be driven: every request goes through here.
pub struct Pool {
    queues: Mutex<Queues>,
    work: Condvar,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

impl Pool {
    /// `threads` fetchers for `location` (no request is made yet).
    pub fn start(
        location: &Location,
        settings: &Settings,
        threads: usize,
    ) -> anyhow::Result<Arc<Pool>> {
        let pool = Arc::new(Pool {
            queues: Mutex::new(Queues::default()),
            work: Condvar::new(),
        });
        for i in 0..threads.max(1) {
            let bucket = Bucket::open(location.clone(), settings)?;
            let p = pool.clone();
            std::thread::Builder::new()
                .name(format!("fetch-{i}"))
                .spawn(move || p.serve(&bucket))?;
        }
        Ok(pool)
    }

    fn serve(&self, bucket: &Bucket) {
        loop {
            let job = {
                let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(j) = q.demand.pop_front().or_else(|| q.ahead.pop_front()) {
                        break j;
                    }
                    q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            job(bucket);
        }
    }

    fn submit(&self, job: Job, ahead: bool) {
        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if ahead {
            q.ahead.push_back(job);
        } else {
            q.demand.push_back(job);
        }
        drop(q);
        self.work.notify_one();
    }

    /// Runs `f` on a fetcher; its result arrives on the returned channel.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Bucket) -> T + Send + 'static,
    ) -> mpsc::Receiver<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            Box::new(move |b| {
                let _ = tx.send(f(b));
            }),
            false,
        );
        rx
    }

    /// Runs `f` on a fetcher and waits for it.
    pub fn call<T: Send + 'static>(&self, f: impl FnOnce(&Bucket) -> T + Send + 'static) -> T {
        self.spawn(f).recv().expect("fetch threads never stop")
    }
}

/// How a block of an object is checked before it is cached.
#[derive(Debug, Clone)]
pub enum Check {
    /// By its reader (segments: record by record).
    Reader,
    /// Block j is chunk `first + j` of a base image of `size` bytes, which `sums` lists.
    Sums {
        sums: Arc<Sums>,
        first: u64,
        size: u64,
    },
}

#[derive(Debug, Clone)]
struct Object {
    key: String,
    len: u64,
    check: Check,
    /// Where its blocks go in the cache file.
    at: u64,
}

pub type BlockId = (u32, u64);

#[derive(Debug)]
enum Slot {
    Pending,
    /// In the cache file; `pins` readers are reading it (it is not evicted meanwhile).
    Ready {
        tick: u64,
        len: u64,
        pins: u32,
    },
    Failed(String),
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<BlockId, Slot>,
    /// Ready blocks by last use.
    lru: BTreeMap<u64, BlockId>,
    tick: u64,
    /// Bytes of ready blocks in the cache file.
    bytes: u64,
    /// Per reader stream (an object, or a base image): the last block read and the window.
    streams: HashMap<u64, (u64, u64)>,
    /// Fetches submitted by the hydrator and not finished.
    hydrating: usize,
}

/// The cache of checked blocks: a sparse file (unlinked: gone at exit) at most `budget` bytes
/// of which hold data; the kernel's page cache keeps the hot ones in memory.
#[derive(Debug)]
pub struct Blocks {
    pool: Arc<Pool>,
    objects: RwLock<Vec<Object>>,
    file: std::fs::File,
    state: Mutex<State>,
    done: Condvar,
    budget: u64,
}

impl Blocks {
    /// A cache whose file is made in `dir`.
    pub fn new(pool: Arc<Pool>, dir: &std::path::Path, budget: u64) -> io::Result<Arc<Blocks>> {
        let file = tempfile::Builder::new()
            .prefix("restore-blocks-")
            .tempfile_in(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?
            .into_file();
        Ok(Arc::new(Blocks {
            pool,
            objects: RwLock::new(Vec::new()),
            file,
            state: Mutex::new(State::default()),
            done: Condvar::new(),
            budget: budget.max(4 * BLOCK),
        }))
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Makes an object readable through the cache; returns its id.
    pub fn add(&self, key: String, len: u64, check: Check) -> u32 {
        let mut o = self.objects.write().unwrap_or_else(|p| p.into_inner());
        let at = o.last().map_or(0, |l| l.at + l.len.div_ceil(BLOCK) * BLOCK);
        o.push(Object {
            key,
            len,
            check,
            at,
        });
        (o.len() - 1) as u32
    }

    /// Every block of every object, in the order they were added.
    pub fn all(&self) -> Vec<BlockId> {
        let o = self.objects.read().unwrap_or_else(|p| p.into_inner());
        o.iter()
            .enumerate()
            .flat_map(|(i, ob)| (0..ob.len.div_ceil(BLOCK)).map(move |b| (i as u32, b)))
            .collect()
    }

    fn place(&self, (id, block): BlockId) -> u64 {
        self.objects.read().unwrap_or_else(|p| p.into_inner())[id as usize].at + block * BLOCK
    }

    /// Copies `dst.len()` bytes from byte `from` of block `block` of object `id`, fetching
    /// (and checking) the block unless the cache holds it.
    pub fn read(
        self: &Arc<Self>,
        (id, block): BlockId,
        from: u64,
        dst: &mut [u8],
    ) -> io::Result<()> {
        let k = (id, block);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match st.slots.get_mut(&k) {
                Some(Slot::Ready { tick, len, pins }) => {
                    if from + dst.len() as u64 > *len {
                        return Err(io::Error::other(format!(
                            "a read past the end of block {block} of an object"
                        )));
                    }
                    *pins += 1;
                    let old = *tick;
                    st.tick += 1;
                    let t = st.tick;
                    if let Some(Slot::Ready { tick, .. }) = st.slots.get_mut(&k) {
                        *tick = t;
                    }
                    st.lru.remove(&old);
                    st.lru.insert(t, k);
                    drop(st);
                    let r = std::os::unix::fs::FileExt::read_exact_at(
                        &self.file,
                        dst,
                        self.place(k) + from,
                    );
                    let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(Slot::Ready { pins, .. }) = st.slots.get_mut(&k) {
                        *pins -= 1;
                    }
                    return r;
                }
                Some(Slot::Pending) => {
                    st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                Some(Slot::Failed(_)) => {
                    // Said once where it failed; a later read tries again.
                    if let Some(Slot::Failed(why)) = st.slots.remove(&k) {
                        return Err(io::Error::other(why));
                    }
                }
                None => {
                    st.slots.insert(k, Slot::Pending);
                    self.fetch(k, 1, false, false);
                }
            }
        }
    }

    /// Starts fetching blocks a reader is about to need (those not cached or coming).
    pub fn want(self: &Arc<Self>, blocks: impl IntoIterator<Item = BlockId>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.submit_runs(&mut st, blocks, false, false);
    }

    /// Marks the blocks of `blocks` that are neither cached nor coming as coming, and fetches
    /// them, consecutive ones of an object (up to [`RUN_MAX`]) by one GET. The number of GETs.
    fn submit_runs(
        self: &Arc<Self>,
        st: &mut State,
        blocks: impl IntoIterator<Item = BlockId>,
        ahead: bool,
        hydrating: bool,
    ) -> usize {
        let mut run: Option<(BlockId, u64)> = None;
        let mut gets = 0;
        for k in blocks {
            if st.slots.contains_key(&k) {
                continue;
            }
            st.slots.insert(k, Slot::Pending);
            run = match run {
                Some(((id, first), n)) if id == k.0 && first + n == k.1 && n < RUN_MAX => {
                    Some(((id, first), n + 1))
                }
                Some((first, n)) => {
                    self.fetch(first, n, ahead, hydrating);
                    gets += 1;
                    Some((k, 1))
                }
                None => Some((k, 1)),
            };
        }
        if let Some((first, n)) = run {
            self.fetch(first, n, ahead, hydrating);
            gets += 1;
        }
        gets
    }

    /// After a read of `block` in `stream`: when it follows the stream's last block, fetch the
    /// next ones in the background (the window doubles each time, up to [`AHEAD_MAX`]).
    /// `next(i)` names the i-th block after `block` (None: nothing to fetch there).
    pub fn ahead(self: &Arc<Self>, stream: u64, block: u64, next: impl Fn(u64) -> Option<BlockId>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let window = match st.streams.get(&stream) {
            Some(&(last, w)) if block == last + 1 => (w * 2).clamp(2, AHEAD_MAX),
            Some(&(last, w)) if block == last => w,
            _ => 0,
        };
        st.streams.insert(stream, (block, window));
        let blocks: Vec<BlockId> = (1..=window).filter_map(next).collect();
        self.submit_runs(&mut st, blocks, true, false);
    }

    /// Fetches `order` in the background, `parallel` at a time and behind what readers wait
    /// for, until every block is cached or the cache is full. Logs what it did.
    pub fn hydrate(self: &Arc<Self>, order: Vec<BlockId>, parallel: usize, what: String) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("hydrate".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let mut fetched = 0u64;
                let mut full = false;
                let mut i = 0;
                while i < order.len() {
                    let mut st = me.state.lock().unwrap_or_else(|p| p.into_inner());
                    while st.hydrating >= parallel.max(1) {
                        st = me.done.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    // The next run of blocks not cached: consecutive in one object.
                    let mut j = i;
                    while j < order.len()
                        && j - i < RUN_MAX as usize
                        && (j == i
                            || (order[j].0 == order[j - 1].0 && order[j].1 == order[j - 1].1 + 1))
                        && !st.slots.contains_key(&order[j])
                    {
                        j += 1;
                    }
                    if j == i {
                        i += 1; // cached or coming already
                        continue;
                    }
                    if st.bytes + (j - i) as u64 * BLOCK > me.budget {
                        full = true;
                        break;
                    }
                    let gets = me.submit_runs(&mut st, order[i..j].iter().copied(), true, true);
                    st.hydrating += gets;
                    fetched += (j - i) as u64;
                    i = j;
                }
                let mut st = me.state.lock().unwrap_or_else(|p| p.into_inner());
                while st.hydrating > 0 {
                    st = me.done.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                let held = st.bytes;
                drop(st);
                info!(
                    "{what}: fetched {} MiB more in {:.1} s; the cache holds {} MiB{}",
                    (fetched * BLOCK) >> 20,
                    started.elapsed().as_secs_f64(),
                    held >> 20,
                    if full {
                        " and is full (--cache-size): the rest is fetched when read"
                    } else {
                        ", all of it"
                    }
                );
            });
        if let Err(e) = spawned {
            error!("cannot start fetching in the background: {e}");
        }
    }

    /// Fetches `count` blocks of an object from `first` on by one range GET; each is checked
    /// and written to the cache file, then ready (or failed) for its readers.
    fn fetch(self: &Arc<Self>, first: BlockId, count: u64, ahead: bool, hydrating: bool) {
        let me = self.clone();
        self.pool.submit(
            Box::new(move |bucket| {
                let (id, b0) = first;
                let run = me.load(bucket, id, b0, count);
                let mut done = Vec::with_capacity(count as usize);
                for j in 0..count {
                    let k = (id, b0 + j);
                    let r = run.as_ref().map_err(Clone::clone).and_then(|data| {
                        let from = (j * BLOCK) as usize;
                        let block = &data[from..data.len().min(from + BLOCK as usize)];
                        me.check(id, k.1, block)?;
                        std::os::unix::fs::FileExt::write_all_at(&me.file, block, me.place(k))
                            .map_err(|e| format!("write the restore cache: {e}"))?;
                        Ok(block.len() as u64)
                    });
                    done.push((k, r));
                }
                let mut st = me.state.lock().unwrap_or_else(|p| p.into_inner());
                if hydrating {
                    st.hydrating -= 1;
                }
                for (k, r) in done {
                    match r {
                        Ok(len) => {
                            st.tick += 1;
                            let t = st.tick;
                            st.bytes += len;
                            st.lru.insert(t, k);
                            st.slots.insert(
                                k,
                                Slot::Ready {
                                    tick: t,
                                    len,
                                    pins: 0,
                                },
                            );
                        }
                        Err(why) => {
                            error!("{why}; reads of it fail with EIO, nothing of it is served");
                            st.slots.insert(k, Slot::Failed(why));
                        }
                    }
                }
                me.evict(&mut st);
                drop(st);
                me.done.notify_all();
            }),
            ahead,
        );
    }

    /// Drops the least recently used blocks no reader holds until the cache fits its budget.
    fn evict(&self, st: &mut State) {
        let mut skipped = Vec::new();
        while st.bytes > self.budget {
            let Some((t, old)) = st.lru.pop_first() else {
                break;
            };
            match st.slots.get(&old) {
                Some(Slot::Ready { pins: 0, len, .. }) => {
                    let len = *len;
                    st.slots.remove(&old);
                    st.bytes -= len;
                    if let Err(e) = journal::read::punch(&self.file, self.place(old), len) {
                        error!("free restore cache space: {e}");
                    }
                }
                _ => skipped.push((t, old)),
            }
        }
        st.lru.extend(skipped);
    }

    /// One range GET: `count` blocks of object `id` from block `first` on.
    fn load(&self, bucket: &Bucket, id: u32, first: u64, count: u64) -> Result<Bytes, String> {
        let (key, len) = {
            let o = &self.objects.read().unwrap_or_else(|p| p.into_inner())[id as usize];
            (o.key.clone(), o.len)
        };
        let start = first * BLOCK;
        let end = ((first + count) * BLOCK).min(len);
        if start >= end || end - start <= (count - 1) * BLOCK {
            return Err(format!(
                "{key}: no blocks {first}..{} in {len} bytes",
                first + count
            ));
        }
        let data = bucket
            .get_range(&key, start..end)
            .map_err(|e| e.to_string())?;
        if data.len() as u64 != end - start {
            return Err(format!(
                "{key}: a range GET of bytes {start}..{end} returned {} bytes",
                data.len()
            ));
        }
        Ok(data)
    }

    /// Checks block `block` of object `id` where it can be checked here (base blocks).
    fn check(&self, id: u32, block: u64, data: &[u8]) -> Result<(), String> {
        let o = &self.objects.read().unwrap_or_else(|p| p.into_inner())[id as usize];
        let Check::Sums { sums, first, size } = &o.check else {
            return Ok(());
        };
        let c = first + block;
        let want = journal::sums::chunk_range(c, *size);
        if want.end - want.start != data.len() as u64
            || journal::wire::chunk_hash(data) != sums.get(c)
        {
            return Err(bucket::manifest::Damaged {
                key: o.key.clone(),
                why: format!(
                    "block {block} (disk bytes {}..{}) does not match the base's checksum",
                    want.start, want.end
                ),
            }
            .to_string());
        }
        Ok(())
    }
}

/// A segment in the bucket, read through the cache (its reader checks every record).
#[derive(Debug)]
pub struct RemoteObject {
    pub blocks: Arc<Blocks>,
    pub id: u32,
    pub len: u64,
}

impl RemoteObject {
    fn blocks_of(&self, pos: u64, len: u64) -> impl Iterator<Item = BlockId> + '_ {
        let end = (pos + len).min(self.len);
        (pos / BLOCK..end.div_ceil(BLOCK)).map(|b| (self.id, b))
    }
}

impl journal::read::Blob for RemoteObject {
    fn read_up_to(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let end = (pos + buf.len() as u64).min(self.len);
        // Every block of the range at once: they arrive in parallel.
        self.blocks
            .want(self.blocks_of(pos, buf.len() as u64).skip(1));
        let last = self.len.div_ceil(BLOCK);
        let mut at = pos;
        while at < end {
            let b = at / BLOCK;
            let from = at - b * BLOCK;
            let n = (end - at).min(BLOCK - from);
            self.blocks.read(
                (self.id, b),
                from,
                &mut buf[(at - pos) as usize..][..n as usize],
            )?;
            self.blocks.ahead(u64::from(self.id), b, |i| {
                (b + i < last).then_some((self.id, b + i))
            });
            at += n;
        }
        Ok(end.saturating_sub(pos) as usize)
    }

    fn prefetch(&self, pos: u64, len: u64) {
        self.blocks.want(self.blocks_of(pos, len));
    }
}
