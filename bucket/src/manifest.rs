//! A group's manifest in the bucket and the keys of the objects it names. No I/O.
//!
//! Every object but the manifest is immutable and is named in the manifest with its length and
//! sha256, which a reader checks before it trusts a byte. The manifest is replaced by a
//! conditional PUT (If-Match the ETag it replaces, If-None-Match for the first), and is the
//! commit point: an object no committed manifest names is garbage. ETags are MD5s of the
//! content, so each manifest carries a generation (one more than the one it replaces) and the
//! writer's id and epoch, and no two manifests are the same bytes.

use std::io;

use journal::store::{decode_checked_json, encode_checked_json, GroupMeta};
use serde::{Deserialize, Serialize};

pub const FORMAT: u32 = 1;
/// Base images are stored in chunks of this size (a multiple of the 256 KiB checksum chunk),
/// so a fold rewrites only the chunks it touched.
pub const CHUNK_LEN: u64 = 4 << 20;

pub fn manifest_key(group: &str) -> String {
    format!("{group}/manifest.json")
}

/// A sealed segment (`ext` "seg") or its index ("idx"), written by the writer of `epoch`.
pub fn journal_key(group: &str, epoch: u64, first: u64, last: u64, ext: &str) -> String {
    format!("{group}/journal/{epoch:010}-{first:020}-{last:020}.{ext}")
}

/// A base object ("chunk", "table" or "sums"), named by its content.
pub fn base_key(group: &str, volume: &str, sha256: &str, ext: &str) -> String {
    format!("{group}/base/{volume}/{sha256}.{ext}")
}

/// An object a manifest names: where, how long, and its sha256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub key: String,
    pub len: u64,
    pub sha256: String,
}

/// An object whose bytes are not those its manifest names.
#[derive(Debug, thiserror::Error)]
#[error(
    "object {key} in the bucket is damaged: {why}; nothing was served from it (upload it \
     again from the replicator's staging store, or restore an earlier point)"
)]
pub struct Damaged {
    pub key: String,
    pub why: String,
}

impl ObjectRef {
    pub fn of(key: String, bytes: &[u8]) -> ObjectRef {
        ObjectRef {
            key,
            len: bytes.len() as u64,
            sha256: crate::sha256_hex(bytes),
        }
    }

    /// Checks `bytes` are this object's.
    pub fn check(&self, bytes: &[u8]) -> Result<(), Damaged> {
        let why = if bytes.len() as u64 != self.len {
            format!("{} bytes, the manifest says {}", bytes.len(), self.len)
        } else {
            let sum = crate::sha256_hex(bytes);
            if sum == self.sha256 {
                return Ok(());
            }
            format!("its sha256 is {sum}, the manifest says {}", self.sha256)
        };
        Err(Damaged {
            key: self.key.clone(),
            why,
        })
    }
}

/// Who wrote a manifest: one replicator (its id), in its epoch. A writer that takes a group
/// over raises the epoch; a writer whose conditional PUT fails finds another's id and stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    pub id: String,
    pub epoch: u64,
}

/// One volume of the base: its chunk table and checksums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseVolume {
    pub name: String,
    pub size: u64,
    /// A [`ChunkTable`] (JSON).
    pub table: ObjectRef,
    /// The base image's chunk checksums (`journal::sums` format).
    pub sums: ObjectRef,
}

/// The base: every record up to `seq` applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    pub seq: u64,
    pub time_ns: u64,
    pub volumes: Vec<BaseVolume>,
}

/// A sealed segment: records `first_seq..=last_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_time_ns: u64,
    pub segment: ObjectRef,
    pub index: ObjectRef,
    /// The bookmarks among its records, so a reader lists them without reading the segment.
    /// None in manifests written before they were recorded: then a reader reads them from
    /// the segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bookmarks: Option<Vec<Bookmark>>,
}

/// A bookmark record: its name, seq and time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bookmark {
    pub name: String,
    pub seq: u64,
    pub time_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub group: GroupMeta,
    /// One more than the manifest this one replaced (1 for the first).
    pub generation: u64,
    pub writer: Writer,
    pub base: Base,
    /// Contiguous: the first starts right after the base, each after the one before.
    pub segments: Vec<Segment>,
    pub updated_ns: u64,
}

impl Manifest {
    /// The last seq the bucket holds.
    pub fn uploaded_seq(&self) -> u64 {
        self.segments.last().map_or(self.base.seq, |s| s.last_seq)
    }

    /// Time of the last record the bucket holds.
    pub fn uploaded_time_ns(&self) -> u64 {
        self.segments
            .last()
            .map_or(self.base.time_ns, |s| s.last_time_ns)
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_checked_json(self).expect("a manifest is a JSON object")
    }

    /// Decodes and checks a manifest: its checksum, format, names and that its history has no
    /// hole. `key` names it in errors.
    pub fn decode(bytes: &[u8], key: &str) -> io::Result<Manifest> {
        let m: Manifest = decode_checked_json(bytes, key)?;
        m.check()
            .map_err(|why| io::Error::new(io::ErrorKind::InvalidData, format!("{key}: {why}")))?;
        Ok(m)
    }

    fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "manifest format {} is not supported (this build reads {FORMAT})",
                self.format
            ));
        }
        journal::names::check("group", &self.group.name)?;
        journal::names::check_volumes(self.group.volumes.iter().map(|v| v.name.as_str()))?;
        let names: Vec<&str> = self.base.volumes.iter().map(|v| v.name.as_str()).collect();
        let want: Vec<&str> = self.group.volumes.iter().map(|v| v.name.as_str()).collect();
        if names != want {
            return Err(format!(
                "the base has volumes {names:?}, the group {want:?}"
            ));
        }
        let mut next = self.base.seq + 1;
        for s in &self.segments {
            if s.first_seq != next || s.last_seq < s.first_seq {
                return Err(format!(
                    "segment {}..={} does not follow seq {}: records are missing",
                    s.first_seq,
                    s.last_seq,
                    next - 1
                ));
            }
            next = s.last_seq + 1;
        }
        Ok(())
    }
}

/// Which chunk object holds each `chunk_len` range of a base image (None: zeroes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkTable {
    pub size: u64,
    pub chunk_len: u64,
    pub chunks: Vec<Option<ObjectRef>>,
}

impl ChunkTable {
    pub fn encode(&self) -> Vec<u8> {
        encode_checked_json(self).expect("a chunk table is a JSON object")
    }

    pub fn decode(bytes: &[u8], key: &str) -> io::Result<ChunkTable> {
        let t: ChunkTable = decode_checked_json(bytes, key)?;
        let chunks = t.size.div_ceil(t.chunk_len.max(1));
        let lens_ok = t.chunks.iter().enumerate().all(|(i, c)| {
            c.as_ref().is_none_or(|c| {
                c.len
                    == t.chunk_len
                        .min(t.size - (i as u64 * t.chunk_len).min(t.size))
            })
        });
        if t.chunk_len == 0 || t.chunks.len() as u64 != chunks || !lens_ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{key}: the chunk table does not fit a {} byte image",
                    t.size
                ),
            ));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::wire::Volume;

    fn manifest() -> Manifest {
        let r = |k: &str| ObjectRef::of(k.into(), k.as_bytes());
        Manifest {
            format: FORMAT,
            group: GroupMeta {
                format: journal::store::FORMAT,
                name: "g".into(),
                volumes: vec![Volume {
                    name: "d".into(),
                    size: 1 << 20,
                }],
                created_ns: 1,
            },
            generation: 3,
            writer: Writer {
                id: "w".into(),
                epoch: 1,
            },
            base: Base {
                seq: 10,
                time_ns: 5,
                volumes: vec![BaseVolume {
                    name: "d".into(),
                    size: 1 << 20,
                    table: r("t"),
                    sums: r("s"),
                }],
            },
            segments: vec![Segment {
                first_seq: 11,
                last_seq: 20,
                last_time_ns: 9,
                segment: r("a"),
                index: r("b"),
                bookmarks: None,
            }],
            updated_ns: 0,
        }
    }

    #[test]
    fn manifest_round_trips_and_is_checked() {
        let m = manifest();
        let b = m.encode();
        assert_eq!(Manifest::decode(&b, "k").unwrap(), m);
        assert_eq!(m.uploaded_seq(), 20);
        let mut damaged = b.clone();
        let at = damaged.iter().position(|&c| c == b'2').unwrap();
        damaged[at] = b'3';
        assert!(Manifest::decode(&damaged, "k").is_err());
        let mut gap = m.clone();
        gap.segments[0].first_seq = 12;
        assert!(Manifest::decode(&gap.encode(), "k").is_err());
    }

    #[test]
    fn objects_are_checked() {
        let r = ObjectRef::of("k".into(), b"hello");
        assert!(r.check(b"hello").is_ok());
        assert!(r.check(b"hellp").is_err());
        assert!(r.check(b"hell").is_err());
    }

    #[test]
    fn chunk_tables_fit_their_image() {
        let t = ChunkTable {
            size: CHUNK_LEN + 5,
            chunk_len: CHUNK_LEN,
            chunks: vec![None, Some(ObjectRef::of("c".into(), &[1; 5]))],
        };
        assert_eq!(ChunkTable::decode(&t.encode(), "k").unwrap(), t);
        let mut bad = t.clone();
        bad.chunks.pop();
        assert!(ChunkTable::decode(&bad.encode(), "k").is_err());
    }
}
