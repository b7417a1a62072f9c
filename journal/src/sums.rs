//! Checksums of an image, one per [`HASH_CHUNK`] (xxh3-128, the hash delta sync compares), as
//! bytes. Base images have a sums file next to them (`base/<volume>.sums`), written with the
//! image and naming the seq the image holds, so that a flipped bit in an image is found before
//! any byte of it is served or trusted. The replicator keeps the hashes of each volume's latest
//! state in the same format (`head/<volume>.sums`), with no image behind them.
//!
//! Only chunks that do not hash like zeroes are listed, so a sparse image has a small file and
//! memory follows the data written, not the volume's size.
//!
//! Kept hashes may also name *stale* chunks: chunks written since their hash was made, hashed
//! again (from the base and the journal) only when a proxy asks for hashes (delta sync). A
//! stale chunk's listed hash means nothing; base images never have stale chunks.
//!
//! ```text
//!  0 magic "CDPSUMS1"  8 version u32  12 reserved u32 = 0  16 seq u64  24 size u64
//! 32 chunk u64        40 count u64    48 entries (count x 24 bytes: chunk u64, hash u128),
//!                                        chunks ascending
//!    version 2: stale count u64, then that many chunks (u64, ascending)
//!    trailer: crc32c of everything before it (u32)
//! ```
//!
//! Version 1 files (no stale list) are read as having no stale chunk; version 2 is written.
//!
//! Nothing here does I/O.

use crate::wire::{chunk_hash, HASH_CHUNK};

const MAGIC: &[u8; 8] = b"CDPSUMS1";
const VERSION: u32 = 2;
const HEADER_LEN: usize = 48;

/// The hashes of an image's chunks, as of `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sums {
    pub seq: u64,
    pub size: u64,
    /// Chunks whose hash is not that of zeroes.
    hashes: std::collections::BTreeMap<u64, u128>,
    /// Chunks whose listed hash is not of the image's bytes (changed since it was made).
    stale: std::collections::BTreeSet<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SumsError {
    #[error("not a checksum file (bad magic)")]
    Magic,
    #[error("checksum file version {0} is not supported")]
    Version(u32),
    #[error("the checksum file's own checksum does not match (it is damaged)")]
    Checksum,
    #[error("checksum file is malformed: {0}")]
    Malformed(&'static str),
}

/// The hash of a whole chunk of zeroes (a hole), computed once.
pub fn zero_chunk_hash() -> u128 {
    static ZERO: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| chunk_hash(&vec![0u8; HASH_CHUNK as usize]))
}

/// Chunks an image of `size` bytes has.
pub fn chunks(size: u64) -> u64 {
    size.div_ceil(HASH_CHUNK)
}

/// The chunks `offset..offset+length` touches.
pub fn chunks_of(offset: u64, length: u64) -> std::ops::Range<u64> {
    if length == 0 {
        return offset / HASH_CHUNK..offset / HASH_CHUNK;
    }
    offset / HASH_CHUNK..(offset + length - 1) / HASH_CHUNK + 1
}

/// Bytes chunk `c` of an image of `size` bytes covers.
pub fn chunk_range(c: u64, size: u64) -> std::ops::Range<u64> {
    let start = c * HASH_CHUNK;
    start..(start + HASH_CHUNK).min(size)
}

/// A set of chunks of one image (those a change touched since its sums were last made).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkSet {
    bits: Vec<u64>,
}

impl ChunkSet {
    pub fn new(size: u64) -> ChunkSet {
        ChunkSet {
            bits: vec![0; chunks(size).div_ceil(64) as usize],
        }
    }

    /// Every chunk of an image of `size` bytes.
    pub fn all(size: u64) -> ChunkSet {
        let mut s = ChunkSet::new(size);
        for c in 0..chunks(size) {
            s.insert(c);
        }
        s
    }

    pub fn insert(&mut self, c: u64) {
        if let Some(w) = self.bits.get_mut((c / 64) as usize) {
            *w |= 1 << (c % 64);
        }
    }

    /// Marks the chunks `offset..offset+length` touches.
    pub fn mark(&mut self, offset: u64, length: u64) {
        for c in chunks_of(offset, length) {
            self.insert(c);
        }
    }

    /// Takes `c` out of the set; whether it was in.
    pub fn remove(&mut self, c: u64) -> bool {
        let Some(w) = self.bits.get_mut((c / 64) as usize) else {
            return false;
        };
        let was = *w & (1 << (c % 64)) != 0;
        *w &= !(1 << (c % 64));
        was
    }

    pub fn contains(&self, c: u64) -> bool {
        self.bits
            .get((c / 64) as usize)
            .is_some_and(|w| w & (1 << (c % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    /// The chunks in the set, in order, leaving it empty.
    pub fn take(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.bits.iter_mut().enumerate() {
            let mut word = std::mem::take(w);
            while word != 0 {
                let b = word.trailing_zeros();
                out.push(i as u64 * 64 + u64::from(b));
                word &= word - 1;
            }
        }
        out
    }
}

/// The hash of chunk `c` of an image of `size` bytes when it holds only zeroes.
pub fn zero_hash_of(c: u64, size: u64) -> u128 {
    let r = chunk_range(c, size);
    if r.end - r.start == HASH_CHUNK {
        zero_chunk_hash()
    } else {
        chunk_hash(&vec![0u8; (r.end - r.start) as usize])
    }
}

impl Sums {
    /// The sums of an image of `size` bytes that holds only zeroes.
    pub fn zeroes(size: u64, seq: u64) -> Sums {
        Sums {
            seq,
            size,
            hashes: Default::default(),
            stale: Default::default(),
        }
    }

    /// Records that chunk `c`'s hash is to be made again before it is trusted.
    pub fn set_stale(&mut self, c: u64) {
        if c < self.chunks() {
            self.stale.insert(c);
        }
    }

    /// The chunks whose hash is to be made again, as a set over the image.
    pub fn stale(&self) -> ChunkSet {
        let mut set = ChunkSet::new(self.size);
        for &c in &self.stale {
            set.insert(c);
        }
        set
    }

    pub fn has_stale(&self) -> bool {
        !self.stale.is_empty()
    }

    /// Chunk `c`'s hash.
    pub fn get(&self, c: u64) -> u128 {
        self.hashes
            .get(&c)
            .copied()
            .unwrap_or_else(|| zero_hash_of(c, self.size))
    }

    /// Sets chunk `c`'s hash, made from the image's bytes (so the chunk is no longer stale).
    pub fn set(&mut self, c: u64, hash: u128) {
        self.stale.remove(&c);
        if hash == zero_hash_of(c, self.size) {
            self.hashes.remove(&c);
        } else {
            self.hashes.insert(c, hash);
        }
    }

    /// Chunks of the image.
    pub fn chunks(&self) -> u64 {
        chunks(self.size)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.hashes.len() * 24 + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&HASH_CHUNK.to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        for (c, h) in &self.hashes {
            out.extend_from_slice(&c.to_le_bytes());
            out.extend_from_slice(&h.to_le_bytes());
        }
        out.extend_from_slice(&(self.stale.len() as u64).to_le_bytes());
        for c in &self.stale {
            out.extend_from_slice(&c.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Sums, SumsError> {
        if b.len() < HEADER_LEN + 4 {
            return Err(SumsError::Malformed("shorter than its header"));
        }
        if &b[0..8] != MAGIC {
            return Err(SumsError::Magic);
        }
        let (body, trailer) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(trailer.try_into().unwrap_or_default()) {
            return Err(SumsError::Checksum);
        }
        let le64 = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default());
        if version != 1 && version != VERSION {
            return Err(SumsError::Version(version));
        }
        let (seq, size, chunk) = (le64(&body[16..]), le64(&body[24..]), le64(&body[32..]));
        if chunk != HASH_CHUNK {
            return Err(SumsError::Malformed("chunk size differs"));
        }
        let mut rest = &body[40..];
        // `count` entries of `width` bytes, taken off the front of `rest`.
        let mut list = |width: usize| -> Result<&[u8], SumsError> {
            let count = rest.get(..8).map(le64);
            let len = count.and_then(|n| usize::try_from(n).ok()?.checked_mul(width));
            match len.filter(|&len| len <= rest.len() - 8) {
                Some(len) => {
                    let (list, after) = rest[8..].split_at(len);
                    rest = after;
                    Ok(list)
                }
                None => Err(SumsError::Malformed("length differs from the entry count")),
            }
        };
        let entries = list(24)?;
        let stale_list = if version == 1 { &[][..] } else { list(8)? };
        if !rest.is_empty() {
            return Err(SumsError::Malformed("length differs from the entry count"));
        }
        let chunks_of_list = |list: &[u8], width: usize| {
            let cs: Vec<u64> = list.chunks_exact(width).map(le64).collect();
            let ok = cs.iter().all(|&c| c < chunks(size)) && cs.windows(2).all(|w| w[0] < w[1]);
            ok.then_some(cs).ok_or(SumsError::Malformed(
                "chunks out of order or past the image",
            ))
        };
        let hashes = chunks_of_list(entries, 24)?
            .into_iter()
            .zip(entries.chunks_exact(24))
            .map(|(c, e)| {
                (
                    c,
                    u128::from_le_bytes(e[8..].try_into().unwrap_or_default()),
                )
            })
            .collect();
        let stale = chunks_of_list(stale_list, 8)?.into_iter().collect();
        Ok(Sums {
            seq,
            size,
            hashes,
            stale,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_bit_is_caught() {
        let mut s = Sums::zeroes(3 * HASH_CHUNK + 100, 7);
        s.set(1, 42);
        s.set(2, zero_chunk_hash());
        assert_eq!(s.hashes.len(), 1, "zero chunks are not listed");
        let b = s.encode();
        assert_eq!(Sums::decode(&b), Ok(s.clone()));
        for bit in (0..b.len() * 8).step_by(7) {
            let mut bad = b.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Sums::decode(&bad).is_err(), "bit {bit}");
        }
        assert_eq!(s.get(3), chunk_hash(&[0u8; 100]));
        assert!(!s.has_stale());
        assert_eq!(s.get(1), 42);
        assert_eq!(chunks_of(HASH_CHUNK - 1, 2), 0..2);
        assert_eq!(chunks_of(HASH_CHUNK, HASH_CHUNK), 1..2);
        assert_eq!(
            chunk_range(3, 3 * HASH_CHUNK + 100),
            3 * HASH_CHUNK..3 * HASH_CHUNK + 100
        );
    }

    #[test]
    fn stale_chunks_round_trip_until_hashed_again() {
        let mut s = Sums::zeroes(4 * HASH_CHUNK, 9);
        s.set(0, 5);
        s.set_stale(0);
        s.set_stale(3);
        s.set_stale(4); // past the image: ignored
        let b = s.encode();
        let back = Sums::decode(&b).unwrap();
        assert_eq!(back, s);
        assert!(back.stale().contains(0) && back.stale().contains(3));
        assert!(!back.stale().contains(1));
        for bit in (0..b.len() * 8).step_by(5) {
            let mut bad = b.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Sums::decode(&bad).is_err(), "bit {bit}");
        }
        let mut again = back;
        again.set(0, 6);
        again.set(3, zero_chunk_hash());
        assert!(!again.has_stale(), "a chunk hashed again is not stale");
    }

    #[test]
    fn version_1_files_are_read_as_having_no_stale_chunk() {
        let mut s = Sums::zeroes(2 * HASH_CHUNK, 3);
        s.set(1, 77);
        // Version 1: the same header and entries, no stale list.
        let mut v1 = s.encode();
        v1.truncate(v1.len() - 4 - 8);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(Sums::decode(&v1), Ok(s));
        let mut v3 = v1.clone();
        v3[8..12].copy_from_slice(&3u32.to_le_bytes());
        let n = v3.len() - 4;
        let crc = crc32c::crc32c(&v3[..n]);
        v3[n..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Sums::decode(&v3), Err(SumsError::Version(3)));
    }
}
