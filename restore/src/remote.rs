//! `--store s3://BUCKET/PREFIX`: restore from the bucket. Each group's committed manifest is
//! read, and the objects it names are fetched into a local cache that has the layout of a
//! store directory (so every command reads it as it reads a replicator's store). Every object
//! is checked against the length and sha256 its manifest gives before a byte of it is written
//! to the cache; a damaged one stops the command with its key, nothing is served from it.
//! Objects already in the cache (checked again) are not fetched again.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bucket::manifest::{self, ChunkTable, Manifest, ObjectRef};
use bucket::{Bucket, Location};
use journal::store::{self, GroupDir, SeqMark};
use tracing::info;

/// Where restore keeps what it fetched from buckets.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CacheArgs {
    /// With an s3:// --store: the directory objects fetched from the bucket are kept in
    /// [default: $XDG_CACHE_HOME/cdp-restore, else ~/.cache/cdp-restore].
    #[arg(long, value_name = "DIR", help_heading = "S3")]
    pub cache: Option<PathBuf>,
    #[command(flatten)]
    pub s3: bucket::Settings,
}

/// For an s3:// store, the local cache store with `group` (or every group) fetched; for a
/// directory, the directory itself.
pub fn local_store(store: &Path, group: Option<&str>, args: &CacheArgs) -> anyhow::Result<PathBuf> {
    let Some(location) = store.to_str().and_then(Location::parse) else {
        return Ok(store.to_owned());
    };
    let location = location?;
    let bucket = Bucket::open(location.clone(), &args.s3)?;
    bucket.check()?;
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
    let cache = root.join(&id[..16]);
    fs::create_dir_all(&cache).with_context(|| format!("create cache {}", cache.display()))?;
    let _lock = lock(&cache)?;
    let groups = match group {
        Some(g) => vec![g.to_owned()],
        None => groups(&bucket)?,
    };
    for g in groups {
        journal::names::check("group", &g).map_err(anyhow::Error::msg)?;
        let key = manifest::manifest_key(&g);
        let Some((bytes, _)) = bucket.get(&key)? else {
            if group.is_some() {
                bail!("{location} has no group {g:?} (no {key})");
            }
            continue;
        };
        let m = Manifest::decode(&bytes, &key)?;
        hydrate(&bucket, &GroupDir::new(&cache, &g), &m)
            .with_context(|| format!("fetch group {g} from {location}"))?;
    }
    Ok(cache)
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

/// One restore at a time fills a cache directory (others wait); the lock ends when the
/// returned file is closed.
fn lock(cache: &Path) -> anyhow::Result<fs::File> {
    let f = fs::File::create(cache.join(".lock"))?;
    // SAFETY: flock on a descriptor `f` owns, open for the call.
    let r = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    if r != 0 {
        return Err(io::Error::last_os_error()).context("lock the cache");
    }
    Ok(f)
}

/// Groups in the bucket: prefixes with a manifest.
fn groups(bucket: &Bucket) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = bucket
        .list("")?
        .into_iter()
        .filter_map(|(k, _)| k.strip_suffix("/manifest.json").map(str::to_owned))
        .filter(|g| !g.contains('/'))
        .collect();
    out.sort();
    Ok(out)
}

/// An object, fetched and checked.
fn fetch(bucket: &Bucket, r: &ObjectRef) -> anyhow::Result<Vec<u8>> {
    let (bytes, _) = bucket.get(&r.key)?.with_context(|| {
        format!(
            "{} is missing from the bucket, though the manifest names it",
            r.key
        )
    })?;
    r.check(&bytes)?;
    Ok(bytes.to_vec())
}

/// A cached file that holds object `r`, fetched unless it is there already (and checks).
fn cached(bucket: &Bucket, r: &ObjectRef, path: &Path) -> anyhow::Result<()> {
    if let Ok(bytes) = fs::read(path) {
        if r.check(&bytes).is_ok() {
            return Ok(());
        }
    }
    let bytes = fetch(bucket, r)?;
    store::write_file_atomic(path, &bytes).with_context(|| format!("write {}", path.display()))
}

/// Makes `dir` hold what `m` names: group.json, base images and checksums, sealed segments
/// and their indexes; removes segments it does not name.
fn hydrate(bucket: &Bucket, dir: &GroupDir, m: &Manifest) -> anyhow::Result<()> {
    for sub in ["base", "journal"] {
        fs::create_dir_all(dir.path.join(sub))?;
    }
    let mut keep = Vec::new();
    for s in &m.segments {
        let seg = dir.segment_path(s.first_seq);
        cached(bucket, &s.segment, &seg.path)?;
        cached(bucket, &s.index, &seg.index_path())?;
        keep.push(seg.path.clone());
        keep.push(seg.index_path());
    }
    for e in fs::read_dir(dir.journal_dir())? {
        let p = e?.path();
        if !keep.contains(&p) {
            fs::remove_file(&p)?;
        }
    }
    for v in &m.base.volumes {
        journal::names::check("volume", &v.name).map_err(anyhow::Error::msg)?;
        cached(
            bucket,
            &v.sums,
            &dir.path.join(format!("base/{}.sums", v.name)),
        )?;
        base_image(bucket, dir, v)?;
    }
    store::write_json_atomic(
        &dir.path.join("base.json"),
        &SeqMark {
            seq: m.base.seq,
            time_ns: m.base.time_ns,
        },
    )?;
    store::write_json_atomic(&dir.path.join("group.json"), &m.group)?;
    info!(
        "fetched group {} from the bucket: base seq {}, {} segments up to seq {}",
        m.group.name,
        m.base.seq,
        m.segments.len(),
        m.uploaded_seq()
    );
    Ok(())
}

/// The base image of one volume, built from its chunks (zero chunks stay holes), unless the
/// cache holds that chunk table's image already.
fn base_image(bucket: &Bucket, dir: &GroupDir, v: &manifest::BaseVolume) -> anyhow::Result<()> {
    let image = dir.image("base", &v.name);
    let built = dir.path.join(format!("base/{}.table", v.name));
    if image.is_file() && fs::read(&built).is_ok_and(|b| v.table.check(&b).is_ok()) {
        return Ok(());
    }
    let table_bytes = fetch(bucket, &v.table)?;
    let table = ChunkTable::decode(&table_bytes, &v.table.key)?;
    if table.size != v.size {
        bail!(
            "{}: a table of {} bytes for a {} byte disk",
            v.table.key,
            table.size,
            v.size
        );
    }
    let tmp = image.with_extension("img.partial");
    let f = fs::File::create(&tmp)?;
    f.set_len(v.size)?;
    for (i, c) in table.chunks.iter().enumerate() {
        if let Some(c) = c {
            let bytes = fetch(bucket, c)?;
            f.write_all_at(&bytes, i as u64 * table.chunk_len)?;
        }
    }
    f.sync_all()?;
    fs::rename(&tmp, &image)?;
    store::write_file_atomic(&built, &table_bytes)?;
    Ok(())
}
