//! A group's committed objects fetched from the bucket into a local directory with a store's
//! layout (group.json, base.json, base images and checksums, sealed segments and indexes).
//! restore reads such a directory as its cache; the replicator rebuilds a staging store from
//! it when it takes a group over onto a new machine.
//!
//! Every object is checked against the length and sha256 its manifest names before a byte of
//! it is written; a missing or damaged one stops the fetch with its key, and nothing of it is
//! written. A file already there that holds the object (checked again) is not fetched again.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use journal::store::{self, GroupDir, SeqMark};
use tracing::info;

use crate::manifest::{BaseVolume, ChunkTable, Damaged, Manifest, ObjectRef};
use crate::{Bucket, Error};

/// Why a group could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Bucket(#[from] Error),
    #[error("{key} is missing from the bucket, though the manifest names it")]
    Missing { key: String },
    #[error(transparent)]
    Damaged(#[from] Damaged),
    /// An object that passed its checksum but does not fit (a chunk table of another size).
    #[error("{0}")]
    Invalid(String),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Groups in the bucket: prefixes with a manifest, sorted.
pub fn groups(bucket: &Bucket) -> Result<Vec<String>, Error> {
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
pub fn fetch(bucket: &Bucket, r: &ObjectRef) -> Result<Vec<u8>, FetchError> {
    let (bytes, _) = bucket
        .get(&r.key)?
        .ok_or_else(|| FetchError::Missing { key: r.key.clone() })?;
    r.check(&bytes)?;
    Ok(bytes.to_vec())
}

/// Makes `path` hold object `r`: fetched unless it holds it already (and checks); its bytes.
pub fn cached(bucket: &Bucket, r: &ObjectRef, path: &Path) -> Result<Vec<u8>, FetchError> {
    if let Ok(bytes) = fs::read(path) {
        if r.check(&bytes).is_ok() {
            return Ok(bytes);
        }
    }
    let bytes = fetch(bucket, r)?;
    store::write_file_atomic(path, &bytes).map_err(at(path))?;
    Ok(bytes)
}

/// Makes `dir` hold what `m` names: group.json, base.json, base images and checksums, sealed
/// segments and their indexes; removes the journal files it does not name. group.json is
/// written last.
pub fn hydrate(bucket: &Bucket, dir: &GroupDir, m: &Manifest) -> Result<(), FetchError> {
    for sub in ["base", "journal"] {
        let p = dir.path.join(sub);
        fs::create_dir_all(&p).map_err(at(&p))?;
    }
    let mut keep = Vec::new();
    for s in &m.segments {
        let seg = dir.segment_path(s.first_seq);
        cached(bucket, &s.segment, &seg.path)?;
        cached(bucket, &s.index, &seg.index_path())?;
        keep.push(seg.path.clone());
        keep.push(seg.index_path());
    }
    let journal = dir.journal_dir();
    for e in fs::read_dir(&journal).map_err(at(&journal))? {
        let p = e.map_err(at(&journal))?.path();
        if !keep.contains(&p) {
            fs::remove_file(&p).map_err(at(&p))?;
        }
    }
    for v in &m.base.volumes {
        journal::names::check("volume", &v.name).map_err(FetchError::Invalid)?;
        cached(
            bucket,
            &v.sums,
            &dir.path.join(format!("base/{}.sums", v.name)),
        )?;
        base_image(bucket, dir, v)?;
    }
    let mark = SeqMark {
        seq: m.base.seq,
        time_ns: m.base.time_ns,
    };
    let base_json = dir.path.join("base.json");
    store::write_json_atomic(&base_json, &mark).map_err(at(&base_json))?;
    let group_json = dir.path.join("group.json");
    store::write_json_atomic(&group_json, &m.group).map_err(at(&group_json))?;
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
/// directory holds that chunk table's image already.
fn base_image(bucket: &Bucket, dir: &GroupDir, v: &BaseVolume) -> Result<(), FetchError> {
    let image = dir.image("base", &v.name);
    let built = dir.path.join(format!("base/{}.table", v.name));
    if image.is_file() && fs::read(&built).is_ok_and(|b| v.table.check(&b).is_ok()) {
        return Ok(());
    }
    let table_bytes = fetch(bucket, &v.table)?;
    let table = ChunkTable::decode(&table_bytes, &v.table.key)
        .map_err(|e| FetchError::Invalid(e.to_string()))?;
    if table.size != v.size {
        return Err(FetchError::Invalid(format!(
            "{}: a table of {} bytes for a {} byte disk",
            v.table.key, table.size, v.size
        )));
    }
    let tmp = image.with_extension("img.partial");
    let f = fs::File::create(&tmp).map_err(at(&tmp))?;
    f.set_len(v.size).map_err(at(&tmp))?;
    for (i, c) in table.chunks.iter().enumerate() {
        if let Some(c) = c {
            let bytes = fetch(bucket, c)?;
            f.write_all_at(&bytes, i as u64 * table.chunk_len)
                .map_err(at(&tmp))?;
        }
    }
    f.sync_all().map_err(at(&tmp))?;
    fs::rename(&tmp, &image).map_err(at(&image))?;
    store::write_file_atomic(&built, &table_bytes).map_err(at(&built))?;
    Ok(())
}
