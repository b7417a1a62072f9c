//! The hashes a replicator sends equal the hashes of a model disk that took the same changes,
//! whatever happened between: segments sealed, hashes sent and kept, restarts after a clean
//! end or a crash, retention folding history into the base.

use std::time::Duration;

use journal::record::{self, Encoded, Kind};
use journal::store::{GroupDir, GroupMeta, SeqMark, FORMAT};
use journal::sums;
use journal::wire::{chunk_hash, Volume};
use journal::writer::JournalWriter;
use proptest::prelude::*;

use super::Hashes;
use crate::retention::{self, Retention, RetentionState};

/// Two volumes: whole chunks, and a size that ends inside a chunk.
const SIZES: [u64; 2] = [1 << 20, 300 * 1024 + 512];
/// Small segments, so that they seal (and can be folded) every few records.
const SEGMENT_LIMIT: u64 = 64 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write {
        disk: u16,
        offset: u64,
        len: u64,
        seed: u8,
        /// Zeros and a repeated pattern: lz4 stores it compressed.
        compressible: bool,
    },
    Zero {
        disk: u16,
        offset: u64,
        len: u64,
    },
    Trim {
        disk: u16,
        offset: u64,
        len: u64,
    },
    /// A proxy asks for hashes: they must equal the model's.
    Ask,
    /// The session ends (hashes kept), the replicator restarts.
    Restart,
    /// The replicator is killed (nothing kept) and restarts.
    Crash,
    /// Retention folds every sealed segment into the base.
    Fold,
}

fn range(disk: u16) -> impl Strategy<Value = (u64, u64)> {
    let size = SIZES[usize::from(disk)];
    (0..size).prop_flat_map(move |offset| (Just(offset), 1..=(size - offset).min(400 * 1024)))
}

fn op() -> impl Strategy<Value = Op> {
    let disk = 0..2u16;
    prop_oneof![
        6 => (disk.clone().prop_flat_map(|d| (Just(d), range(d))), any::<u8>(), any::<bool>())
            .prop_map(|((disk, (offset, len)), seed, compressible)| Op::Write { disk, offset, len, seed, compressible }),
        1 => disk.clone().prop_flat_map(|d| (Just(d), range(d))).prop_map(|(disk, (offset, len))| Op::Zero { disk, offset, len }),
        1 => disk.prop_flat_map(|d| (Just(d), range(d))).prop_map(|(disk, (offset, len))| Op::Trim { disk, offset, len }),
        1 => Just(Op::Ask),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
        1 => Just(Op::Fold),
    ]
}

struct Rig {
    _tmp: tempfile::TempDir,
    dir: GroupDir,
    meta: GroupMeta,
    journal: JournalWriter,
    hashes: Hashes,
    model: Vec<Vec<u8>>,
}

impl Rig {
    fn new() -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let dir = GroupDir::new(tmp.path(), "g");
        let meta = GroupMeta {
            format: FORMAT,
            name: "g".into(),
            volumes: SIZES
                .iter()
                .enumerate()
                .map(|(i, &size)| Volume {
                    name: format!("v{i}"),
                    size,
                })
                .collect(),
            created_ns: 1,
        };
        dir.create(&meta).unwrap();
        let (journal, hashes) = Rig::open(&dir, &meta);
        Rig {
            _tmp: tmp,
            dir,
            meta,
            journal,
            hashes,
            model: SIZES.iter().map(|&s| vec![0u8; s as usize]).collect(),
        }
    }

    fn open(dir: &GroupDir, meta: &GroupMeta) -> (JournalWriter, Hashes) {
        let base = dir.mark("base").unwrap();
        let (journal, _) = JournalWriter::open(dir, base.seq, SEGMENT_LIMIT).unwrap();
        let hashes = Hashes::open(dir, meta, base, &journal);
        (journal, hashes)
    }

    fn append(&mut self, enc: Encoded) {
        let bytes = enc.seal(self.journal.last_seq() + 1, journal::now_ns());
        let r = record::parse(&bytes).unwrap().unwrap();
        self.journal.append(&[r]).unwrap();
        let h = r.header;
        self.hashes.note(h.disk, h.kind, h.offset, h.length);
    }

    fn durable(&mut self) -> SeqMark {
        self.journal.sync().unwrap();
        SeqMark {
            seq: self.journal.last_seq(),
            time_ns: self.journal.last_time_ns(),
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write {
                disk,
                offset,
                len,
                seed,
                compressible,
            } => {
                let data: Vec<u8> = (0..len)
                    .map(|i| match compressible {
                        true if i % 1024 < 512 => 0,
                        true => seed,
                        false => seed ^ (i.wrapping_mul(2654435761) >> 7) as u8,
                    })
                    .collect();
                let d = usize::from(disk);
                self.model[d][offset as usize..(offset + len) as usize].copy_from_slice(&data);
                self.append(Encoded::data(Kind::Write, disk, offset, &data, true));
            }
            Op::Zero { disk, offset, len } | Op::Trim { disk, offset, len } => {
                let kind = if matches!(op, Op::Zero { .. }) {
                    Kind::Zero
                } else {
                    Kind::Trim
                };
                self.model[usize::from(disk)][offset as usize..(offset + len) as usize].fill(0);
                self.append(Encoded::control(kind, disk, offset, len, ""));
            }
            Op::Ask => self.ask(),
            Op::Restart => {
                let mark = self.durable();
                self.hashes.keep(&self.dir, &self.meta, mark).unwrap();
                self.reopen();
            }
            Op::Crash => {
                self.durable();
                self.reopen();
            }
            Op::Fold => {
                self.durable();
                let policy = Retention {
                    max_age: Some(Duration::ZERO),
                    max_size: None,
                    interval: Duration::from_secs(1),
                };
                retention::pass(
                    &self.dir,
                    &self.meta,
                    &policy,
                    &mut RetentionState::default(),
                )
                .unwrap();
            }
        }
    }

    fn reopen(&mut self) {
        let (journal, hashes) = Rig::open(&self.dir, &self.meta);
        self.journal = journal;
        self.hashes = hashes;
    }

    /// What a proxy is sent equals the model's chunk hashes.
    fn ask(&mut self) {
        let mark = self.durable();
        let mut got: Vec<Vec<u128>> = vec![Vec::new(); SIZES.len()];
        let (dir, meta, journal) = (&self.dir, &self.meta, &self.journal);
        self.hashes
            .send(dir, meta, journal, mark, |disk, first, part| {
                let list = &mut got[usize::from(disk)];
                assert_eq!(first, list.len() as u64, "hashes come in order");
                list.extend_from_slice(part);
                Ok(())
            })
            .unwrap();
        let want: Vec<Vec<u128>> = self
            .model
            .iter()
            .map(|disk| {
                let size = disk.len() as u64;
                (0..sums::chunks(size))
                    .map(|c| {
                        let r = sums::chunk_range(c, size);
                        chunk_hash(&disk[r.start as usize..r.end as usize])
                    })
                    .collect()
            })
            .collect();
        for (d, (g, w)) in got.iter().zip(&want).enumerate() {
            for (c, (a, b)) in g.iter().zip(w).enumerate() {
                assert_eq!(a, b, "disk {d} chunk {c} at seq {}", mark.seq);
            }
            assert_eq!(g.len(), w.len(), "disk {d}: one hash per chunk");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn hashes_sent_equal_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut rig = Rig::new();
        for op in &ops {
            rig.apply(op);
        }
        rig.ask();
        // And once more after a restart that kept nothing new.
        rig.apply(&Op::Crash);
        rig.ask();
    }
}

/// A chunk one of whose records does not read back is sent as a hash no chunk has, so the
/// proxy sends it again; the other chunks are hashed as usual.
#[test]
fn a_chunk_whose_record_is_damaged_is_sent_again() {
    let mut rig = Rig::new();
    let data = vec![7u8; 4096];
    rig.append(Encoded::data(Kind::Write, 0, 0, &data, false));
    rig.append(Encoded::data(Kind::Write, 0, 512 * 1024, &data, false));
    rig.durable();
    // Flip a payload byte of the first record (just after the segment and record headers).
    let path = rig.journal.current_segment().path.clone();
    let mut bytes = std::fs::read(&path).unwrap();
    let at = journal::segment::SEGMENT_HEADER_LEN + record::HEADER_LEN + 10;
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let mark = rig.durable();
    let mut got = Vec::new();
    let (dir, meta, journal) = (&rig.dir, &rig.meta, &rig.journal);
    rig.hashes
        .send(dir, meta, journal, mark, |disk, _, part| {
            if disk == 0 {
                got.extend_from_slice(part);
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(got[0], super::UNKNOWN_HASH);
    let mut second = vec![0u8; 256 * 1024];
    second[..4096].copy_from_slice(&data);
    assert_eq!(got[2], chunk_hash(&second));
    assert_eq!(got[1], sums::zero_chunk_hash());
}
