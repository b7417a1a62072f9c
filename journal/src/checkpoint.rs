//! The durable position of a group's journal, as bytes: where the last fsynced commit ends.
//!
//! The replicator writes it after every journal fsync and syncs it before it acknowledges, so
//! at start-up it knows which bytes were acknowledged: a bad record before this position is
//! corruption of acknowledged data (reported, never cut); only what lies beyond it (a commit
//! cut short by a crash) may be cut as a torn tail.
//!
//! The file (`journal/durable`) holds two 64-byte slots, at bytes 0 and [`SLOT_STRIDE`], written
//! in turn, so a write torn by a crash leaves the other slot intact. A reader takes the valid
//! slot with the higher counter.
//!
//! ```text
//!  0 magic "CDPDUR01"  8 version u32  12 reserved u32 = 0  16 counter u64
//! 24 segment (first seq of the segment being written) u64   32 len (bytes durable in it) u64
//! 40 last_seq u64     48 last_time_ns u64                  56 reserved u32 = 0  60 crc u32
//! ```
//!
//! Nothing here does I/O.

pub const SLOT_LEN: usize = 64;
/// Slots sit in separate file-system blocks, so a torn block never damages both.
pub const SLOT_STRIDE: usize = 4096;
pub const FILE_LEN: usize = SLOT_STRIDE + SLOT_LEN;
const MAGIC: &[u8; 8] = b"CDPDUR01";
const VERSION: u32 = 1;

/// What is durable: every record up to `last_seq`, ending at byte `len` of segment `segment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Increases with every write; picks the newer slot.
    pub counter: u64,
    /// First seq of the segment the position is in (its file name).
    pub segment: u64,
    /// Bytes of that segment that are durable (header included).
    pub len: u64,
    pub last_seq: u64,
    pub last_time_ns: u64,
}

impl Checkpoint {
    pub fn encode(&self) -> [u8; SLOT_LEN] {
        let mut b = [0u8; SLOT_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.counter.to_le_bytes());
        b[24..32].copy_from_slice(&self.segment.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b[40..48].copy_from_slice(&self.last_seq.to_le_bytes());
        b[48..56].copy_from_slice(&self.last_time_ns.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// One slot; None when it is not a valid checkpoint (never written, torn, foreign).
    pub fn decode_slot(b: &[u8]) -> Option<Checkpoint> {
        let b = b.get(..SLOT_LEN)?;
        let le64 = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let le32 = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        if &b[0..8] != MAGIC || le32(60) != crc32c::crc32c(&b[..60]) || le32(8) != VERSION {
            return None;
        }
        Some(Checkpoint {
            counter: le64(16),
            segment: le64(24),
            len: le64(32),
            last_seq: le64(40),
            last_time_ns: le64(48),
        })
    }

    /// The newest valid slot of a checkpoint file's bytes.
    pub fn decode_file(b: &[u8]) -> Option<Checkpoint> {
        let first = Checkpoint::decode_slot(b);
        let second = b.get(SLOT_STRIDE..).and_then(Checkpoint::decode_slot);
        match (first, second) {
            (Some(a), Some(b)) => Some(if b.counter > a.counter { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// Slots of a checkpoint file's bytes that were written but do not read back (a slot of
    /// zeroes was never written).
    pub fn damaged_slots(b: &[u8]) -> Vec<usize> {
        [0, SLOT_STRIDE]
            .iter()
            .enumerate()
            .filter(|(_, &at)| {
                let slot = b.get(at..at + SLOT_LEN);
                slot.is_none_or(|s| {
                    s.iter().any(|&x| x != 0) && Checkpoint::decode_slot(s).is_none()
                })
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Byte offset of the slot this checkpoint is written to (slots alternate).
    pub fn slot_offset(&self) -> u64 {
        (self.counter % 2) * SLOT_STRIDE as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_valid_slot_wins_and_a_torn_slot_falls_back() {
        let mut file = vec![0u8; FILE_LEN];
        assert_eq!(Checkpoint::decode_file(&file), None);
        let mut put = |c: Checkpoint| {
            let at = c.slot_offset() as usize;
            file[at..at + SLOT_LEN].copy_from_slice(&c.encode());
        };
        let c = |counter, last_seq| Checkpoint {
            counter,
            segment: 1,
            len: 64 + last_seq * 100,
            last_seq,
            last_time_ns: 7,
        };
        put(c(1, 10));
        put(c(2, 20));
        let mut bytes = file.clone();
        assert_eq!(Checkpoint::decode_file(&bytes), Some(c(2, 20)));
        // The newer slot torn: the older one is still there.
        bytes[c(2, 20).slot_offset() as usize + 33] ^= 0x40;
        assert_eq!(Checkpoint::decode_file(&bytes), Some(c(1, 10)));
        // Every single flipped bit of a slot is caught.
        let slot = c(3, 30).encode();
        for bit in 0..SLOT_LEN * 8 {
            let mut b = slot;
            b[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(Checkpoint::decode_slot(&b), None, "bit {bit}");
        }
    }
}
