//! Opening a point: the group's history, the point resolved to a seq, pinned against
//! retention, and one view per disk.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use journal::pit::{self, History};
use journal::store::{GroupDir, Pin};

use crate::remote::Store;
use crate::view::{Base, BaseCheck, PointView, Sources};

/// A resolved, pinned point of a group and its disks' views.
#[derive(Debug)]
pub struct Opened {
    pub seq: u64,
    pub time_ns: u64,
    /// (volume name, size, view)
    pub disks: Vec<(String, u64, PointView)>,
    /// None on a store restore cannot write to (then no replicator folds it either).
    _pin: Option<Pin>,
}

pub fn group_dir(store: &Path, group: &str) -> anyhow::Result<GroupDir> {
    let dir = GroupDir::new(store, group);
    if !dir.exists() {
        let known: Vec<String> = journal::store::list_groups(store)
            .with_context(|| format!("read store {}", store.display()))?
            .iter()
            .filter_map(|g| g.path.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        bail!(
            "store {} has no group {group:?}; groups: {}",
            store.display(),
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        );
    }
    Ok(dir)
}

/// Resolves `at` and opens every disk (or only `disk`) of the group at that point. `overlay`
/// gives each disk a writable overlay file in that directory: anonymous (gone at exit), or
/// named `GROUP-DISK-seqN.overlay` and kept when the flag is set.
pub fn open_point(
    store: &Store,
    group: &str,
    disk: Option<&str>,
    at: &str,
    overlay: Option<(&Path, bool)>,
) -> anyhow::Result<Opened> {
    let point = pit::parse_point(at, journal::now_ns()).map_err(anyhow::Error::msg)?;
    let store = match store {
        Store::Dir(d) => d,
        Store::Bucket(remote) => {
            let (history, m) = remote.history(group)?;
            let seq = history.resolve(&point)?;
            let mut bases = Vec::new();
            for (i, v) in m.base.volumes.iter().enumerate() {
                if disk.is_none_or(|d| d == v.name) {
                    bases.push((v.name.clone(), remote.base(v, i as u64)?));
                }
            }
            let opened = views(history, seq, disk, overlay, group, |v| {
                let i = bases
                    .iter()
                    .position(|(n, _)| *n == v.name)
                    .with_context(|| {
                        format!(
                            "the manifest of {group} names no base image of disk {}",
                            v.name
                        )
                    })?;
                Ok(Base::Bucket(bases.swap_remove(i).1))
            })?;
            remote.start_hydrate(format!("group {group} from {}", remote.location));
            return Ok(opened);
        }
    };
    let dir = group_dir(store, group)?;
    for _attempt in 0..10 {
        // Pin the base first so no fold runs while the history is read; then pin the point.
        let base = dir.mark("base")?;
        let early_pin = pin(&dir, base.seq)?;
        let history = match History::load(&dir) {
            Ok(h) => h,
            // A segment went away while it was read (a fold finished): read again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("read the journal of {group}")))
            }
        };
        if dir.mark("base")?.seq != base.seq {
            continue; // a fold finished meanwhile: read again
        }
        let seq = history.resolve(&point)?;
        let pin = pin(&dir, seq)?;
        drop(early_pin);
        let mut opened = views(history, seq, disk, overlay, group, |v| {
            let file = dir
                .open_image("base", &v.name, journal::store::Access::Read)
                .context("open a base image")?;
            let sums = dir
                .sums("base", &v.name)
                .context("read the base image's checksums")?;
            let check = BaseCheck::new(dir.clone(), &v.name, v.size, sums);
            Ok(Base::Local { file, check })
        })?;
        opened._pin = pin;
        return Ok(opened);
    }
    bail!("the store kept changing under retention while reading it; try again")
}

/// The views of a history's disks (or only `disk`) at `seq`, their bases from `base`.
fn views(
    history: History,
    seq: u64,
    disk: Option<&str>,
    overlay: Option<(&Path, bool)>,
    group: &str,
    mut base: impl FnMut(&journal::wire::Volume) -> anyhow::Result<Base>,
) -> anyhow::Result<Opened> {
    let sources = Sources::new(&history);
    let volumes = history.meta.volumes.clone();
    let time_ns = history.time_of(seq);
    let maps = history.into_view(seq);
    // The build's scratch memory goes back to the system rather than staying in the heap.
    // SAFETY: malloc_trim only releases free heap memory; no pointer is involved.
    unsafe { libc::malloc_trim(0) };
    let mut disks = Vec::new();
    for (v, map) in volumes.iter().zip(maps) {
        if disk.is_some_and(|d| d != v.name) {
            continue;
        }
        let overlay_file = match overlay {
            Some((o, false)) => Some(
                tempfile::Builder::new()
                    .prefix(&format!("{}-", v.name))
                    .suffix(".overlay")
                    .tempfile_in(o)
                    .with_context(|| format!("create an overlay in {}", o.display()))?
                    .into_file(),
            ),
            Some((o, true)) => {
                let path = o.join(format!("{group}-{}-seq{seq}.overlay", v.name));
                Some(
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .with_context(|| format!("create overlay {}", path.display()))?,
                )
            }
            None => None,
        };
        let base = base(v)?;
        disks.push((
            v.name.clone(),
            v.size,
            PointView::new(v.size, map, base, sources.clone(), overlay_file)?,
        ));
    }
    if let Some(d) = disk {
        if disks.is_empty() {
            let all: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
            bail!("group {group} has no disk {d:?}; disks: {}", all.join(", "));
        }
    }
    Ok(Opened {
        seq,
        time_ns,
        disks,
        _pin: None,
    })
}

/// Pins `seq` against retention. A store restore may not write to (a read-only mount, a
/// snapshot, a backup medium) is served unpinned, but only when no replicator runs on it: one
/// that folds history could rewrite base bytes under the point.
fn pin(dir: &GroupDir, seq: u64) -> anyhow::Result<Option<Pin>> {
    match dir.pin(seq) {
        Ok(p) => Ok(Some(p)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            if let Some(pid) = running_replicator(dir) {
                bail!(
                    "cannot pin the point in {} ({e}), and a replicator (pid {pid}) is serving \
                     this store: its retention could fold history under the point. Run restore \
                     with write access to the store's pins/ directory, or stop the replicator",
                    dir.path.display()
                );
            }
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::info!(
                    "the store is read-only ({e}): serving without a pin (a running replicator \
                     could fold history under this point; on a read-only store none can)"
                )
            });
            Ok(None)
        }
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("pin a point in {}", dir.path.display())))
        }
    }
}

/// The pid of a `replicator serve` that is running on this group, from its live status.
pub(crate) fn running_replicator(dir: &GroupDir) -> Option<u64> {
    let live: serde_json::Value = journal::store::read_json(&dir.path.join("status.json")).ok()?;
    let pid = live["pid"].as_u64()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// The views as `Arc`s for the server (the pin stays with `opened`).
pub fn into_arcs(opened: &mut Opened) -> Vec<(String, u64, Arc<PointView>)> {
    opened
        .disks
        .drain(..)
        .map(|(n, s, v)| (n, s, Arc::new(v)))
        .collect()
}

/// A point named for people: `seq 1234 (2026-11-22T10:15:03Z)`.
pub fn describe(opened: &Opened) -> String {
    format!("seq {} ({})", opened.seq, pit::format_time(opened.time_ns))
}
