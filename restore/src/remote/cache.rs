//! Range GETs for restore: a pool of fetch threads (each with its own client) and a bounded
//! cache of checked blocks of the bucket's objects, with read-ahead on sequential access.
//!
//! A block is [`BLOCK`] bytes of one object. Blocks of base chunks are checked against the
//! base's checksums (one xxh3-128 per 256 KiB, from a sums object whose sha256 the manifest
//! names) before they enter the cache; blocks of segments are checked by their reader, record
//! by record (record crc, seq and length against the index, whose sha256 the manifest names).
//! So no byte reaches a client unchecked. The cache holds at most its budget of ready blocks
//! (least recently used go first); blocks being fetched are waited for, never fetched twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::sync::{mpsc, Arc, Condvar, Mutex, RwLock};

use bucket::{Bucket, Location, Settings};
use bytes::Bytes;
use journal::sums::Sums;
use tracing::error;

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
}

type BlockId = (u32, u64);

#[derive(Debug)]
enum Slot {
    Pending,
    Ready { data: Bytes, tick: u64 },
    Failed(String),
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<BlockId, Slot>,
    /// Ready blocks by last use.
    lru: BTreeMap<u64, BlockId>,
    tick: u64,
    bytes: usize,
    /// Per reader stream (an object, or a base image): the last block read and the window.
    streams: HashMap<u64, (u64, u64)>,
}

/// The cache of checked blocks.
#[derive(Debug)]
pub struct Blocks {
    pool: Arc<Pool>,
    objects: RwLock<Vec<Object>>,
    state: Mutex<State>,
    done: Condvar,
    budget: usize,
}

impl Blocks {
    pub fn new(pool: Arc<Pool>, budget: usize) -> Arc<Blocks> {
        Arc::new(Blocks {
            pool,
            objects: RwLock::new(Vec::new()),
            state: Mutex::new(State::default()),
            done: Condvar::new(),
            budget: budget.max(4 * BLOCK as usize),
        })
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Makes an object readable through the cache; returns its id.
    pub fn add(&self, key: String, len: u64, check: Check) -> u32 {
        let mut o = self.objects.write().unwrap_or_else(|p| p.into_inner());
        o.push(Object { key, len, check });
        (o.len() - 1) as u32
    }

    /// Block `block` of object `id`, fetched (and checked) unless cached.
    pub fn get(self: &Arc<Self>, id: u32, block: u64) -> io::Result<Bytes> {
        let k = (id, block);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match st.slots.get(&k) {
                Some(Slot::Ready { data, tick }) => {
                    let (data, old) = (data.clone(), *tick);
                    st.tick += 1;
                    let t = st.tick;
                    st.lru.remove(&old);
                    st.lru.insert(t, k);
                    if let Some(Slot::Ready { tick, .. }) = st.slots.get_mut(&k) {
                        *tick = t;
                    }
                    return Ok(data);
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
                    self.fetch(k, false);
                }
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
                self.fetch(k, true);
            }
        }
    }

    fn fetch(self: &Arc<Self>, k: BlockId, ahead: bool) {
        let me = self.clone();
        self.pool.submit(
            Box::new(move |bucket| {
                let r = me.load(bucket, k);
                let mut st = me.state.lock().unwrap_or_else(|p| p.into_inner());
                match r {
                    Ok(data) => {
                        st.tick += 1;
                        let t = st.tick;
                        st.bytes += data.len();
                        st.lru.insert(t, k);
                        st.slots.insert(k, Slot::Ready { data, tick: t });
                        while st.bytes > me.budget {
                            let Some((_, old)) = st.lru.pop_first() else {
                                break;
                            };
                            if let Some(Slot::Ready { data, .. }) = st.slots.remove(&old) {
                                st.bytes -= data.len();
                            }
                        }
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

impl journal::read::Blob for RemoteObject {
    fn read_up_to(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let end = (pos + buf.len() as u64).min(self.len);
        let mut at = pos;
        while at < end {
            let b = at / BLOCK;
            let data = self.blocks.get(self.id, b)?;
            let last = self.len.div_ceil(BLOCK);
            self.blocks.ahead(u64::from(self.id), b, |i| {
                (b + i < last).then_some((self.id, b + i))
            });
            let from = (at - b * BLOCK) as usize;
            let n = ((end - at) as usize).min(data.len() - from);
            buf[(at - pos) as usize..][..n].copy_from_slice(&data[from..from + n]);
            at += n as u64;
        }
        Ok(end.saturating_sub(pos) as usize)
    }
}
