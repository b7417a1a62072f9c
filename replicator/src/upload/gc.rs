//! Garbage in the bucket: objects under a group's prefix that its committed manifest does not
//! name (left by an upload a crash interrupted, by a writer that was fenced, or by a fold whose
//! deletes failed). Collected when a writer takes the group over, after its commit: from then
//! on no older writer can commit, so nothing it may still write can become named.

use std::collections::HashSet;

use bucket::manifest::{self, Manifest};
use bucket::Bucket;
use tracing::{info, warn};

/// Deletes every object under the group's prefix that `m` does not name. Nothing is deleted
/// when what `m` names cannot be read completely.
pub fn collect(bucket: &Bucket, m: &Manifest) -> anyhow::Result<usize> {
    let group = &m.group.name;
    let mut named: HashSet<String> = HashSet::from([manifest::manifest_key(group)]);
    for s in &m.segments {
        named.insert(s.segment.key.clone());
        named.insert(s.index.key.clone());
    }
    for v in &m.base.volumes {
        named.insert(v.table.key.clone());
        named.insert(v.sums.key.clone());
        let table = super::base::table(bucket, &v.table)?;
        named.extend(table.chunks.into_iter().flatten().map(|c| c.key));
    }
    let mut deleted = 0;
    for (key, _) in bucket.list(&format!("{group}/"))? {
        if named.contains(&key) {
            continue;
        }
        match bucket.delete(&key) {
            Ok(()) => deleted += 1,
            Err(e) => warn!("uploader: delete {key} (no manifest names it): {e}"),
        }
    }
    if deleted > 0 {
        info!(group = %group, "deleted {deleted} objects of the bucket that no manifest names");
    }
    Ok(deleted)
}
