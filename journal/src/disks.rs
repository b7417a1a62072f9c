//! Which disks a file lives on, as ids that can be compared across the replication link. The
//! replicator names its store's disks in its Welcome; the proxy compares them with its images'
//! and writes its images back in slices only when they share one (nbd-proxy's `writeback.rs`).
//!
//! An id is `MACHINE/MAJOR:MINOR`: the machine and a device number. MACHINE is derived from
//! `/etc/machine-id` (an HMAC-SHA256 keyed by it: machine-id(5) asks that the id itself not be
//! shown to peers), so the host's id never crosses the link. A path's ids are its file
//! system's device and, through sysfs, every device below it: a partition's whole disk, the
//! members of a device-mapper or md device (`slaves/`) and the devices holding a loop device's
//! backing file. Files on different machines never share an id; a file system without a block
//! device (tmpfs, NFS) has only its own id. A path that is a block device itself (a VM disk on
//! a raw LV or partition) stands for that device.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// How deep stacked devices are followed (a loop device on a partition of an md array...).
const MAX_DEPTH: usize = 8;

/// The ids of the disks under `path`, sorted; None when this machine has no readable machine
/// id or `path` cannot be read (then nothing can be said about sharing).
pub fn disks_of(path: &Path) -> Option<Vec<String>> {
    let machine = machine()?;
    let meta = std::fs::metadata(path).ok()?;
    // A disk given as a block device (a raw LV, a partition) is that device, not /dev's.
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    let mut found = BTreeSet::new();
    below(dev_of(dev), 0, &mut found);
    Some(
        found
            .into_iter()
            .map(|(major, minor)| format!("{machine}/{major}:{minor}"))
            .collect(),
    )
}

/// This machine, as an id fit to show a peer: the first 16 bytes of an HMAC-SHA256 of a fixed
/// label keyed by `/etc/machine-id`, in hex. None without a machine id.
fn machine() -> Option<String> {
    let id = std::fs::read_to_string("/etc/machine-id").ok()?;
    let id = id.trim();
    if id.is_empty() {
        return None;
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, id.as_bytes());
    let tag = ring::hmac::sign(&key, b"cdp: which disks a store lives on");
    Some(
        tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// Whether two sets of ids (from [`disks_of`]) name a common disk.
pub fn share_a_disk(a: &[String], b: &[String]) -> bool {
    a.iter().any(|x| b.contains(x))
}

fn dev_of(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

/// Adds `dev` and every device it is built on.
fn below(dev: (u32, u32), depth: usize, found: &mut BTreeSet<(u32, u32)>) {
    if !found.insert(dev) || depth >= MAX_DEPTH {
        return;
    }
    let sys = Path::new("/sys/dev/block").join(format!("{}:{}", dev.0, dev.1));
    // A partition: its directory sits inside the whole disk's.
    if sys.join("partition").exists() {
        if let Some(d) = sys
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().and_then(|parent| read_dev(&parent.join("dev"))))
        {
            below(d, depth + 1, found);
        }
    }
    // Device-mapper, md: the devices it is made of.
    if let Ok(entries) = std::fs::read_dir(sys.join("slaves")) {
        for e in entries.flatten() {
            if let Some(d) = read_dev(&e.path().join("dev")) {
                below(d, depth + 1, found);
            }
        }
    }
    // A loop device: the device holding its backing file.
    if let Ok(backing) = std::fs::read_to_string(sys.join("loop/backing_file")) {
        if let Ok(m) = std::fs::metadata(backing.trim()) {
            below(dev_of(m.dev()), depth + 1, found);
        }
    }
}

/// A sysfs `dev` file: "MAJOR:MINOR".
fn read_dev(path: &Path) -> Option<(u32, u32)> {
    let s = std::fs::read_to_string(path).ok()?;
    let (major, minor) = s.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_shares_its_disks_with_its_neighbours_and_not_with_memory() {
        let dir = tempfile::tempdir().unwrap();
        let a = disks_of(dir.path()).expect("a machine id and a readable path");
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let b = disks_of(&dir.path().join("f")).unwrap();
        assert!(!a.is_empty());
        assert_eq!(a, b, "one file system, one set of disks");
        assert!(share_a_disk(&a, &b));
        // /proc has no block device below it: it shares nothing with a file system on a disk.
        let proc_ids = disks_of(Path::new("/proc/self")).unwrap();
        assert_eq!(proc_ids.len(), 1, "{proc_ids:?}");
        assert!(!share_a_disk(&a, &proc_ids), "{a:?} and {proc_ids:?}");
    }

    #[test]
    fn ids_name_the_machine_without_showing_its_id() {
        let raw = std::fs::read_to_string("/etc/machine-id").unwrap();
        let machine = machine().unwrap();
        assert_eq!(machine.len(), 32);
        assert!(!machine.contains(raw.trim()) && !raw.contains(&machine));
        let ids = disks_of(Path::new("/")).unwrap();
        assert!(ids.iter().all(|id| id.starts_with(&format!("{machine}/"))));
        let elsewhere: Vec<String> = ids
            .iter()
            .map(|id| id.replacen(&machine, "another-machine", 1))
            .collect();
        assert!(
            !share_a_disk(&ids, &elsewhere),
            "same numbers, other machine"
        );
    }

    #[test]
    fn a_block_device_is_itself_and_the_disks_below_it() {
        // Any block device with a node in /dev: a partition names its whole disk too.
        let Some((node, dev)) = std::fs::read_dir("/sys/class/block")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let node = Path::new("/dev").join(e.file_name());
                let meta = std::fs::metadata(&node).ok()?;
                meta.file_type()
                    .is_block_device()
                    .then(|| (node, dev_of(meta.rdev())))
            })
            .next()
        else {
            panic!("this test needs a block device in /dev and /sys/class/block");
        };
        let ids = disks_of(&node).unwrap();
        let own = format!("/{}:{}", dev.0, dev.1);
        assert!(ids.iter().any(|id| id.ends_with(&own)), "{node:?}: {ids:?}");
        let devfs = disks_of(Path::new("/dev/null")).unwrap();
        assert!(!share_a_disk(&ids, &devfs), "not /dev's own device");
    }

    #[test]
    fn sysfs_dev_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("dev");
        std::fs::write(&f, "254:1\n").unwrap();
        assert_eq!(read_dev(&f), Some((254, 1)));
        std::fs::write(&f, "garbage").unwrap();
        assert_eq!(read_dev(&f), None);
    }

    #[test]
    fn a_missing_path_says_nothing() {
        assert_eq!(disks_of(Path::new("/no/such/path/here")), None);
    }
}
