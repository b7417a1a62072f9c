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
                    self.fetch(k, false, false);
                }
            }
        }
    }

    /// Starts fetching blocks a reader is about to need (those not cached or coming).
    pub fn want(self: &Arc<Self>, blocks: impl IntoIterator<Item = BlockId>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for k in blocks {
            if !st.slots.contains_key(&k) {
                st.slots.insert(k, Slot::Pending);
                self.fetch(k, false, false);
            }
        }
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
        for i in 1..=window {
            let Some(k) = next(i) else { continue };
            if !st.slots.contains_key(&k) {
                st.slots.insert(k, Slot::Pending);
                self.fetch(k, true, false);
            }
        }
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
                for k in order {
                    let mut st = me.state.lock().unwrap_or_else(|p| p.into_inner());
                    while st.hydrating >= parallel.max(1) {
                        st = me.done.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    if st.slots.contains_key(&k) {
                        continue;
                    }
                    if st.bytes + BLOCK > me.budget {
                        full = true;
                        break;
                    }
                    st.slots.insert(k, Slot::Pending);
                    st.hydrating += 1;
                    fetched += 1;
                    me.fetch(k, true, true);
                }
                let mut st = me.state.lock().unwrap_or_else(|p| p.into_inner());
                while st.hydrating > 0 {
                    st = me.done.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                let held = st.bytes;
                drop(st);
                info!(
                    "{what}: fetched {} MiB more in {:.1} s; the cache holds {} MiB{}",
                    fetched * BLOCK >> 20,
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

    fn fetch(self: &Arc<Self>, k: BlockId, ahead: bool, hydrating: bool) {
        let me = self.clone();
        self.pool.submit(
            Box::new(move |bucket| {
                let r = me.load(bucket, k).and_then(|data| {
                    std::os::unix::fs::FileExt::write_all_at(&me.file, &data, me.place(k))
                        .map_err(|e| format!("write the restore cache: {e}"))?;
                    Ok(data.len() as u64)
                });
                let mut st = me.state.lock().unwrap_or_else(|p| p.into_inner());
                if hydrating {
                    st.hydrating -= 1;
                }
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
                        me.evict(&mut st);
                    }
                    Err(why) => {
                        error!("{why}; reads of it fail with EIO, nothing of it is served");
                        st.slots.insert(k, Slot::Failed(why));
                    }
                }
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

    /// One range GET, checked.
    fn load(&self, bucket: &Bucket, (id, block): BlockId) -> Result<Bytes, String> {
        let o = self.objects.read().unwrap_or_else(|p| p.into_inner())[id as usize].clone();
        let start = block * BLOCK;
        let end = (start + BLOCK).min(o.len);
        if start >= end {
            return Err(format!("{}: no block {block} in {} bytes", o.key, o.len));
        }
        let data = bucket
            .get_range(&o.key, start..end)
            .map_err(|e| e.to_string())?;
        if data.len() as u64 != end - start {
            return Err(format!(
                "{}: a range GET of bytes {start}..{end} returned {} bytes",
                o.key,
                data.len()
            ));
        }
        if let Check::Sums { sums, first, size } = &o.check {
            let c = first + block;
            let want = journal::sums::chunk_range(c, *size);
            let h = journal::wire::chunk_hash(&data);
            if want.end - want.start != data.len() as u64 || h != sums.get(c) {
                return Err(bucket::manifest::Damaged {
                    key: o.key.clone(),
                    why: format!(
                        "bytes {start}..{end} (disk bytes {}..{}) do not match the base's checksum",
                        want.start, want.end
                    ),
                }
                .to_string());
            }
        }
        Ok(data)
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
