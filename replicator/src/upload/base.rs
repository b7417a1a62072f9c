//! The base images in the bucket: 4 MiB chunks named by their sha256 (zero chunks are not
//! stored), a chunk table per volume, and the base's checksums. A fold changes some chunks;
//! only those are new objects.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;

use anyhow::Context;
use bucket::manifest::{self, BaseVolume, ChunkTable, ObjectRef, CHUNK_LEN};
use bucket::Bucket;
use journal::store::{Access, GroupDir, GroupMeta, SeqMark};
use journal::sums::{self, Sums};

use super::put_immutable;

/// Uploads the base at `mark`. None: it changed while it was read (a fold): try again later.
/// Every 256 KiB is checked against the base checksums before it leaves.
pub fn upload(
    bucket: &Bucket,
    dir: &GroupDir,
    meta: &GroupMeta,
    mark: SeqMark,
) -> anyhow::Result<Option<manifest::Base>> {
    let group = &meta.name;
    let mut volumes = Vec::new();
    for v in &meta.volumes {
        let sums = dir.sums("base", &v.name)?;
        // Base checksums never list stale chunks (only kept hashes of the latest state have them); if one did, its
        // hashes could not vouch for the bytes uploaded.
        if sums.seq != mark.seq || sums.size != v.size || sums.has_stale() {
            return Ok(None);
        }
        let file = dir.open_image("base", &v.name, Access::Read)?;
        let mut chunks = Vec::new();
        let mut buf = Vec::new();
        for start in (0..v.size).step_by(CHUNK_LEN as usize) {
            let end = (start + CHUNK_LEN).min(v.size);
            let first = start / journal::wire::HASH_CHUNK;
            let last = end.div_ceil(journal::wire::HASH_CHUNK);
            if (first..last).all(|c| sums.get(c) == sums::zero_hash_of(c, v.size)) {
                chunks.push(None); // zeroes, by the checksums; restore checks them too
                continue;
            }
            buf.resize((end - start) as usize, 0);
            file.read_exact_at(&mut buf, start)
                .with_context(|| format!("read the base image of {}", v.name))?;
            if !matches_sums(&buf, start, &sums) {
                return Ok(None);
            }
            let sha = bucket::sha256_hex(&buf);
            let key = manifest::base_key(group, &v.name, &sha, "chunk");
            chunks.push(Some(put_immutable(bucket, key, buf.clone())?));
        }
        let table = ChunkTable {
            size: v.size,
            chunk_len: CHUNK_LEN,
            chunks,
        }
        .encode();
        let table = put_immutable(bucket, content_key(group, &v.name, &table, "table"), table)?;
        let sums_bytes = sums.encode();
        let sums_ref = put_immutable(
            bucket,
            content_key(group, &v.name, &sums_bytes, "sums"),
            sums_bytes,
        )?;
        volumes.push(BaseVolume {
            name: v.name.clone(),
            size: v.size,
            table,
            sums: sums_ref,
        });
    }
    if dir.mark("base")? != mark || dir.fold_mark()?.is_some() {
        return Ok(None);
    }
    Ok(Some(manifest::Base {
        seq: mark.seq,
        time_ns: mark.time_ns,
        volumes,
    }))
}

fn content_key(group: &str, volume: &str, bytes: &[u8], ext: &str) -> String {
    manifest::base_key(group, volume, &bucket::sha256_hex(bytes), ext)
}

/// Whether `buf` (the image from `start`) has the hashes `sums` lists.
fn matches_sums(buf: &[u8], start: u64, sums: &Sums) -> bool {
    buf.chunks(journal::wire::HASH_CHUNK as usize)
        .enumerate()
        .all(|(i, part)| {
            let c = start / journal::wire::HASH_CHUNK + i as u64;
            journal::wire::chunk_hash(part) == sums.get(c)
        })
}

/// The objects of `old` that `new` does not name (to delete once `new` is committed).
pub fn garbage(bucket: &Bucket, old: &manifest::Base, new: &manifest::Base) -> Vec<String> {
    let keep: HashSet<&str> = new
        .volumes
        .iter()
        .flat_map(|v| [v.table.key.as_str(), v.sums.key.as_str()])
        .collect();
    let mut keep_chunks = HashSet::new();
    for v in &new.volumes {
        if let Ok(t) = table(bucket, &v.table) {
            keep_chunks.extend(t.chunks.into_iter().flatten().map(|c| c.key));
        } else {
            return Vec::new(); // unsure what is still named: delete nothing
        }
    }
    let mut out = Vec::new();
    for v in &old.volumes {
        for r in [&v.table, &v.sums] {
            if !keep.contains(r.key.as_str()) {
                out.push(r.key.clone());
            }
        }
        if let Ok(t) = table(bucket, &v.table) {
            out.extend(
                t.chunks
                    .into_iter()
                    .flatten()
                    .map(|c| c.key)
                    .filter(|k| !keep_chunks.contains(k)),
            );
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A chunk table, read from the bucket and checked.
pub fn table(bucket: &Bucket, r: &ObjectRef) -> anyhow::Result<ChunkTable> {
    let (bytes, _) = bucket
        .get(&r.key)?
        .with_context(|| format!("{} is missing from the bucket", r.key))?;
    r.check(&bytes)?;
    Ok(ChunkTable::decode(&bytes, &r.key)?)
}
