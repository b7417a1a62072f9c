//! `--store s3://BUCKET/PREFIX`: restore from the bucket. Each group's committed manifest is
//! read, and the objects it names are fetched into a local cache that has the layout of a
//! store directory (so every command reads it as it reads a replicator's store). Every object
//! is checked against the length and sha256 its manifest gives before a byte of it is written
//! to the cache; a damaged one stops the command with its key, nothing is served from it.
//! Objects already in the cache (checked again) are not fetched again. The fetching is
//! `bucket::fetch`, which the replicator shares to take a group over onto a new machine.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bucket::manifest::{self, Manifest};
use bucket::{Bucket, Location};
use journal::store::GroupDir;

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
        None => bucket::fetch::groups(&bucket)?,
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
        bucket::fetch::hydrate(&bucket, &GroupDir::new(&cache, &g), &m)
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
