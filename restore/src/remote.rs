//! `--store s3://BUCKET/PREFIX`: restore straight from the bucket. A group's committed
//! manifest is read, then what a point needs to be opened (the segment indexes, the base's
//! chunk tables and checksums: small objects, each checked against the sha256 the manifest
//! names, kept in `--cache DIR` when given); segment and base bytes are read on demand by range
//! GETs through a bounded cache with read-ahead ([`cache`]), each block checked before a byte
//! of it is served. Nothing is downloaded before the export answers.

mod cache;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use bucket::manifest::{self, ChunkTable, Manifest, ObjectRef};
use bucket::Location;
use journal::pit::{Bookmark, History, Sealed, Segment};
use journal::read::SegmentFile;
use journal::store::SeqMark;
use journal::sums::Sums;
use tracing::info;

use cache::{Blocks, Check, Pool, RemoteObject, BLOCK};

/// Where restore reads a bucket's objects from and keeps them.
#[derive(clap::Args, Debug, Clone)]
pub struct CacheArgs {
    /// With an s3:// --store: the directory for what is fetched from the bucket: the small
    /// objects a point needs to open (segment indexes, chunk tables, checksums; kept, and
    /// checked again at every use) and the block cache file (removed at exit)
    /// [default: $XDG_CACHE_HOME/cdp-restore, else ~/.cache/cdp-restore].
    #[arg(long, value_name = "DIR", help_heading = "S3")]
    pub cache: Option<PathBuf>,
    /// With an s3:// --store: disk space the block cache may fill with segment and base blocks
    /// read from the bucket (least recently used go first), e.g. 2G, 64G.
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = journal::units::parse_size, help_heading = "S3")]
    pub cache_size: u64,
    /// With an s3:// --store: range GETs in flight at once.
    #[arg(long, value_name = "N", default_value_t = 8, help_heading = "S3")]
    pub fetchers: usize,
    /// With an s3:// --store: fetch only what is read (and read ahead), not everything the
    /// point may read in the background. Saves requests and transfer when only a few files
    /// are wanted; a VM running from the export stays as slow as the bucket.
    #[arg(long, help_heading = "S3")]
    pub no_hydrate: bool,
    #[command(flatten)]
    pub s3: bucket::Settings,
}

/// What a command reads: a store directory, or a store in a bucket.
#[derive(Debug, Clone)]
pub enum Store {
    Dir(PathBuf),
    Bucket(Arc<Remote>),
}

impl Store {
    /// `store` as the user gave it: an s3:// URL (then the bucket is checked once) or a
    /// directory.
    pub fn open(store: &Path, args: &CacheArgs) -> anyhow::Result<Store> {
        let Some(location) = store.to_str().and_then(Location::parse) else {
            return Ok(Store::Dir(store.to_owned()));
        };
        Ok(Store::Bucket(Arc::new(Remote::open(location?, args)?)))
    }
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Dir(d) => write!(f, "{}", d.display()),
            Store::Bucket(r) => write!(f, "{}", r.location),
        }
    }
}

/// A store in a bucket.
#[derive(Debug)]
pub struct Remote {
    pub location: Location,
    blocks: Arc<Blocks>,
    /// Where small objects are kept (a directory per bucket and prefix).
    small: PathBuf,
    hydrate: bool,
    fetchers: usize,
}

/// One disk's base image in the bucket: its chunk objects, read through the cache in blocks
/// checked against the base's checksums.
#[derive(Debug)]
pub struct RemoteBase {
    blocks: Arc<Blocks>,
    size: u64,
    chunk_len: u64,
    /// The object of each chunk (None: zeroes).
    chunks: Vec<Option<u32>>,
    /// The read-ahead stream of this image.
    stream: u64,
}

impl Remote {
    fn open(location: Location, args: &CacheArgs) -> anyhow::Result<Remote> {
        let pool = Pool::start(&location, &args.s3, args.fetchers)?;
        pool.call(|b| b.check())?;
        let root = match &args.cache {
            Some(c) => c.clone(),
            None => default_cache()?,
        };
        let id = bucket::sha256_hex(
            format!(
                "{}\n{location}",
                args.s3.s3_endpoint.as_deref().unwrap_or("")
            )
            .as_bytes(),
        );
        let dir = root.join(&id[..16]);
        fs::create_dir_all(&dir).with_context(|| format!("create cache {}", dir.display()))?;
        Ok(Remote {
            location,
            blocks: Blocks::new(pool, &dir, args.cache_size)?,
            small: dir,
            hydrate: !args.no_hydrate,
            fetchers: args.fetchers,
        })
    }

    /// Starts fetching every block of what is open in the background (unless --no-hydrate).
    pub fn start_hydrate(&self, what: String) {
        if self.hydrate {
            self.blocks.hydrate(
                self.blocks.all(),
                self.fetchers.saturating_sub(2).max(1),
                what,
            );
        }
    }

    fn pool(&self) -> &Arc<Pool> {
        self.blocks.pool()
    }

    /// Groups in the bucket: prefixes with a manifest.
    pub fn groups(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.pool().call(bucket::fetch::groups)?)
    }

    /// The committed manifest of `group`.
    pub fn manifest(&self, group: &str) -> anyhow::Result<Manifest> {
        journal::names::check("group", group).map_err(anyhow::Error::msg)?;
        let key = manifest::manifest_key(group);
        let k = key.clone();
        let Some((bytes, _)) = self.pool().call(move |b| b.get(&k))? else {
            let known = self.groups().unwrap_or_default();
            bail!(
                "{} has no group {group:?} (no {key}); groups: {}",
                self.location,
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            );
        };
        Ok(Manifest::decode(&bytes, &key)?)
    }

    /// A small object, checked: from the cache directory when it holds it, else fetched (and
    /// kept there).
    fn small(&self, r: &ObjectRef) -> anyhow::Result<Vec<u8>> {
        self.small_async(r)
            .recv()
            .expect("fetch threads never stop")
    }

    /// [`Remote::small`] on a fetcher; the result arrives on the channel.
    fn small_async(&self, r: &ObjectRef) -> std::sync::mpsc::Receiver<anyhow::Result<Vec<u8>>> {
        let path = self.small.join(&r.key);
        let r = r.clone();
        self.pool().spawn(move |b| {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            Ok(bucket::fetch::cached(b, &r, &path)?)
        })
    }

    /// Removes the small objects of `group` kept in the cache that `m` does not name (those
    /// of folded segments and older bases), so the cache does not grow with past history.
    fn prune(&self, group: &str, m: &Manifest) {
        let keep: std::collections::HashSet<PathBuf> = m
            .segments
            .iter()
            .map(|s| &s.index)
            .chain(m.base.volumes.iter().flat_map(|v| [&v.table, &v.sums]))
            .map(|r| self.small.join(&r.key))
            .collect();
        let mut dirs = vec![self.small.join(group)];
        while let Some(d) = dirs.pop() {
            let Ok(entries) = fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if !keep.contains(&p) && is_object(&p) {
                    let _ = fs::remove_file(&p);
                }
            }
        }
    }

    /// The history of `group` as its manifest names it (indexes fetched in parallel), and the
    /// manifest.
    pub fn history(&self, group: &str) -> anyhow::Result<(History, Manifest)> {
        let started = std::time::Instant::now();
        let m = self.manifest(group)?;
        let pending: Vec<_> = m
            .segments
            .iter()
            .map(|s| self.small_async(&s.index))
            .collect();
        let mut sealed = Vec::with_capacity(m.segments.len());
        for (s, rx) in m.segments.iter().zip(pending) {
            let index = rx.recv().expect("fetch threads never stop")?;
            let entries = journal::segment::decode_index(&index, s.segment.len)
                .map_err(|e| anyhow::anyhow!("{}: {e}", s.index.key))?;
            let path = PathBuf::from(format!("{}/{}", self.location, s.segment.key));
            let id = self
                .blocks
                .add(s.segment.key.clone(), s.segment.len, Check::Reader);
            let blob = Arc::new(RemoteObject {
                blocks: self.blocks.clone(),
                id,
                len: s.segment.len,
            });
            sealed.push(Sealed {
                segment: Segment {
                    file: SegmentFile::from_blob(path.clone(), blob),
                    path,
                    first_seq: s.first_seq,
                    entries,
                },
                bookmarks: s.bookmarks.as_ref().map(|b| {
                    b.iter()
                        .map(|b| Bookmark {
                            name: b.name.clone(),
                            seq: b.seq,
                            time_ns: b.time_ns,
                        })
                        .collect()
                }),
            });
        }
        let base = SeqMark {
            seq: m.base.seq,
            time_ns: m.base.time_ns,
        };
        let h = History::sealed(m.group.clone(), base, sealed)
            .with_context(|| format!("read the journal of {group} in {}", self.location))?;
        self.prune(group, &m);
        info!(
            "group {group} in {}: base seq {}, {} segments up to seq {}, indexes read in {} ms",
            self.location,
            m.base.seq,
            m.segments.len(),
            h.last_seq,
            started.elapsed().as_millis()
        );
        Ok((h, m))
    }

    /// The base image of volume `v`, read on demand.
    pub fn base(&self, v: &manifest::BaseVolume, stream: u64) -> anyhow::Result<RemoteBase> {
        let table = self.small_async(&v.table);
        let sums = self.small(&v.sums)?;
        let sums =
            Arc::new(Sums::decode(&sums).map_err(|e| anyhow::anyhow!("{}: {e}", v.sums.key))?);
        let table_bytes = table.recv().expect("fetch threads never stop")?;
        let table = ChunkTable::decode(&table_bytes, &v.table.key)?;
        if table.size != v.size || sums.chunks() != journal::sums::chunks(v.size) {
            bail!(
                "{}: a table of {} bytes (checksums of {} chunks) for a {} byte disk",
                v.table.key,
                table.size,
                sums.chunks(),
                v.size
            );
        }
        if table.chunk_len % BLOCK != 0 {
            bail!(
                "{}: chunks of {} bytes are not whole checksum chunks",
                v.table.key,
                table.chunk_len
            );
        }
        let per = table.chunk_len / BLOCK;
        let mut ids: std::collections::HashMap<&str, u32> = Default::default();
        let chunks = table
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.as_ref().map(|c| {
                    *ids.entry(c.key.as_str()).or_insert_with(|| {
                        self.blocks.add(
                            c.key.clone(),
                            c.len,
                            Check::Sums {
                                sums: sums.clone(),
                                first: i as u64 * per,
                                size: v.size,
                            },
                        )
                    })
                })
            })
            .collect();
        Ok(RemoteBase {
            blocks: self.blocks.clone(),
            size: v.size,
            chunk_len: table.chunk_len,
            chunks,
            stream: (1 << 40) + stream,
        })
    }
}

/// A kept object (not another restore's file being written).
fn is_object(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e == "idx" || e == "table" || e == "sums")
}

fn default_cache() -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("cdp-restore"));
    }
    match std::env::var_os("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".cache/cdp-restore")),
        None => bail!("no HOME: give --cache DIR for what is fetched from the bucket"),
    }
}

impl RemoteBase {
    /// The object and block that hold checksum chunk `c` of the image (None: zeroes).
    fn block_of(&self, c: u64) -> Option<(u32, u64)> {
        let per = self.chunk_len / BLOCK;
        let id = (*self.chunks.get((c / per) as usize)?)?;
        Some((id, c % per))
    }

    /// Reads `out.len()` bytes at `at` (checked blocks, or zeroes where the base has none).
    pub fn read(&self, at: u64, out: &mut [u8]) -> std::io::Result<()> {
        let end = at + out.len() as u64;
        let mut pos = at;
        let last = journal::sums::chunks(self.size);
        while pos < end {
            let c = pos / BLOCK;
            let n = ((c + 1) * BLOCK).min(end) - pos;
            let dst = &mut out[(pos - at) as usize..][..n as usize];
            match self.block_of(c) {
                None => dst.fill(0),
                Some(k) => self.blocks.read(k, pos - c * BLOCK, dst)?,
            }
            self.blocks.ahead(self.stream, c, |i| {
                (c + i < last).then(|| self.block_of(c + i)).flatten()
            });
            pos += n;
        }
        Ok(())
    }

    /// Bytes `at..at + len` will be read soon: start fetching their blocks.
    pub fn prefetch(&self, at: u64, len: u64) {
        let end = (at + len).min(self.size);
        self.blocks
            .want((at / BLOCK..end.div_ceil(BLOCK)).filter_map(|c| self.block_of(c)));
    }

    /// Whether byte `pos` lies in a chunk the bucket holds (else the base is zeroes there),
    /// and where that run of chunks ends.
    pub fn data_at(&self, pos: u64) -> (bool, u64) {
        let i = pos / self.chunk_len;
        let data = self.chunks.get(i as usize).is_some_and(Option::is_some);
        let mut j = i + 1;
        while (j as usize) < self.chunks.len() && self.chunks[j as usize].is_some() == data {
            j += 1;
        }
        (data, (j * self.chunk_len).min(self.size))
    }
}
