//! Journal segment files and their indexes, as bytes.
//!
//! A segment is a 64-byte header followed by records ([`crate::record`]) in seq order:
//!
//! ```text
//!  0 magic "CDPJSEG1"   8 version u32   12 header_len u32   16 first_seq u64   24 created_ns u64
//! 32 reserved (28 bytes, zero)          60 crc u32 = crc32c(bytes 0..60)
//! ```
//!
//! A sealed segment has an index next to it: a 32-byte header, one 48-byte entry per record
//! (where it is, what it covers, without its payload), and a crc32c of everything before it:
//!
//! ```text
//! header:  0 magic "CDPJIDX1"  8 version u32  12 count u32  16 segment_len u64  24 first_seq u64
//! entry:   0 seq u64  8 time_ns u64  16 offset u64  24 length u64  32 pos u64
//!         40 stored_len u32  44 kind u8  45 flags u8  46 disk u16
//! trailer: crc u32
//! ```
//!
//! Readers find records through indexes and never scan payloads. Nothing here does I/O.

use crate::record::{self, FormatError, Header, Kind, RecordRef, HEADER_LEN};

pub const SEGMENT_HEADER_LEN: usize = 64;
pub const SEGMENT_MAGIC: &[u8; 8] = b"CDPJSEG1";
pub const INDEX_MAGIC: &[u8; 8] = b"CDPJIDX1";
pub const VERSION: u32 = 1;
const INDEX_HEADER_LEN: usize = 32;
pub const INDEX_ENTRY_LEN: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub first_seq: u64,
    pub created_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("not a journal segment (bad magic)")]
    Magic,
    #[error("segment format version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("segment header checksum mismatch")]
    Checksum,
    #[error("file is shorter than its header")]
    Short,
    #[error("index does not match its segment: {0}")]
    Index(&'static str),
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.created_ns.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, SegmentError> {
        let b = b.get(..SEGMENT_HEADER_LEN).ok_or(SegmentError::Short)?;
        if &b[0..8] != SEGMENT_MAGIC {
            return Err(SegmentError::Magic);
        }
        if crc32c::crc32c(&b[..60]) != le32(&b[60..64]) {
            return Err(SegmentError::Checksum);
        }
        let version = le32(&b[8..12]);
        if version != VERSION {
            return Err(SegmentError::Version(version));
        }
        Ok(SegmentHeader {
            first_seq: le64(&b[16..24]),
            created_ns: le64(&b[24..32]),
        })
    }
}

/// Where a record is and what it covers: enough to plan reads without touching payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub seq: u64,
    pub time_ns: u64,
    pub offset: u64,
    pub length: u64,
    /// Position of the record's header in the segment file.
    pub pos: u64,
    pub stored_len: u32,
    pub kind: Kind,
    pub compressed: bool,
    pub disk: u16,
}

impl IndexEntry {
    pub fn from_header(h: &Header, pos: u64) -> IndexEntry {
        IndexEntry {
            seq: h.seq,
            time_ns: h.time_ns,
            offset: h.offset,
            length: h.length,
            pos,
            stored_len: h.stored_len,
            kind: h.kind,
            compressed: h.compressed,
            disk: h.disk,
        }
    }

    /// Position just past the record.
    pub fn end(&self) -> u64 {
        self.pos + HEADER_LEN as u64 + u64::from(self.stored_len)
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.time_ns.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.pos.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.push(self.kind as u8);
        out.push(u8::from(self.compressed));
        out.extend_from_slice(&self.disk.to_le_bytes());
    }
}

/// Encodes the index of a sealed segment `segment_len` bytes long.
pub fn encode_index(first_seq: u64, segment_len: u64, entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_HEADER_LEN + entries.len() * INDEX_ENTRY_LEN + 4);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&segment_len.to_le_bytes());
    out.extend_from_slice(&first_seq.to_le_bytes());
    for e in entries {
        e.encode_into(&mut out);
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes an index; `segment_len` is the segment's size on disk, which the index must name.
pub fn decode_index(b: &[u8], segment_len: u64) -> Result<Vec<IndexEntry>, SegmentError> {
    if b.len() < INDEX_HEADER_LEN + 4 {
        return Err(SegmentError::Short);
    }
    if &b[0..8] != INDEX_MAGIC {
        return Err(SegmentError::Magic);
    }
    let (body, trailer) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body) != le32(trailer) {
        return Err(SegmentError::Checksum);
    }
    let version = le32(&b[8..12]);
    if version != VERSION {
        return Err(SegmentError::Version(version));
    }
    let count = le32(&b[12..16]) as usize;
    if le64(&b[16..24]) != segment_len {
        return Err(SegmentError::Index("segment length differs"));
    }
    if body.len() != INDEX_HEADER_LEN + count * INDEX_ENTRY_LEN {
        return Err(SegmentError::Index(
            "entry count differs from the file size",
        ));
    }
    let mut entries = Vec::with_capacity(count);
    let mut prev_end = SEGMENT_HEADER_LEN as u64;
    for e in body[INDEX_HEADER_LEN..].chunks_exact(INDEX_ENTRY_LEN) {
        let kind = Kind::from_u8(e[44]).ok_or(SegmentError::Index("unknown kind"))?;
        let entry = IndexEntry {
            seq: le64(&e[0..8]),
            time_ns: le64(&e[8..16]),
            offset: le64(&e[16..24]),
            length: le64(&e[24..32]),
            pos: le64(&e[32..40]),
            stored_len: le32(&e[40..44]),
            kind,
            compressed: e[45] != 0,
            disk: u16::from_le_bytes([e[46], e[47]]),
        };
        if entry.pos != prev_end || entry.end() > segment_len {
            return Err(SegmentError::Index("entries do not tile the segment"));
        }
        prev_end = entry.end();
        entries.push(entry);
    }
    if prev_end != segment_len {
        return Err(SegmentError::Index(
            "entries do not reach the segment's end",
        ));
    }
    Ok(entries)
}

/// The outcome of reading the records of a segment's bytes in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub entries: Vec<IndexEntry>,
    /// Length of the valid prefix (header + whole, checked records).
    pub valid_len: u64,
    /// Why reading stopped before the end, and where.
    pub stop: Option<(u64, ScanStop)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanStop {
    #[error("record is cut short (torn write)")]
    Truncated,
    #[error(transparent)]
    Bad(#[from] FormatError),
    #[error("seq {found} follows seq {previous}: records are out of order")]
    Order { previous: u64, found: u64 },
}

/// Reads the records in `segment` (the whole file, header included), checking each record's
/// checksum, and `visit`s each one; stops at the first that is cut short or bad.
pub fn scan(
    segment: &[u8],
    mut visit: impl FnMut(&RecordRef<'_>, u64),
) -> Result<Scan, SegmentError> {
    let header = SegmentHeader::decode(segment)?;
    let mut pos = SEGMENT_HEADER_LEN;
    let mut entries = Vec::new();
    let mut previous = header.first_seq.wrapping_sub(1);
    let stop = loop {
        if is_padding(&segment[pos..]) {
            break None;
        }
        match record::parse(&segment[pos..]) {
            Ok(Some(r)) => {
                if r.header.seq != previous.wrapping_add(1) {
                    break Some((
                        pos as u64,
                        ScanStop::Order {
                            previous,
                            found: r.header.seq,
                        },
                    ));
                }
                previous = r.header.seq;
                visit(&r, pos as u64);
                entries.push(IndexEntry::from_header(&r.header, pos as u64));
                pos += r.header.record_len();
            }
            Ok(None) => break Some((pos as u64, ScanStop::Truncated)),
            Err(e) => break Some((pos as u64, ScanStop::Bad(e))),
        }
    };
    Ok(Scan {
        entries,
        valid_len: pos as u64,
        stop,
    })
}

/// Whether what follows the last record is the end: nothing, or zeros to the end of the file
/// (a direct write pads its last block with them, and small commits keep some written ahead,
/// see [`crate::append`]). Zeros with anything after them are not an end.
pub fn is_padding(rest: &[u8]) -> bool {
    rest.iter().all(|&b| b == 0)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Encoded;

    fn segment(first: u64, n: u64) -> Vec<u8> {
        let mut seg = SegmentHeader {
            first_seq: first,
            created_ns: 7,
        }
        .encode()
        .to_vec();
        for i in 0..n {
            let data = vec![(i % 251) as u8; 4096];
            let enc = Encoded::data(Kind::Write, 0, i * 4096, &data, i % 2 == 0);
            seg.extend_from_slice(&enc.seal(first + i, 100 + i));
        }
        seg
    }

    #[test]
    fn scan_finds_every_record_and_index_round_trips() {
        let seg = segment(10, 20);
        let mut seen = Vec::new();
        let scan = scan(&seg, |r, _| seen.push(r.header.seq)).unwrap();
        assert_eq!(seen, (10..30).collect::<Vec<_>>());
        assert_eq!(scan.valid_len, seg.len() as u64);
        assert!(scan.stop.is_none());
        let idx = encode_index(10, seg.len() as u64, &scan.entries);
        assert_eq!(decode_index(&idx, seg.len() as u64).unwrap(), scan.entries);
        assert!(decode_index(&idx, seg.len() as u64 + 1).is_err());
        let mut bad = idx.clone();
        bad[40] ^= 1;
        assert_eq!(
            decode_index(&bad, seg.len() as u64),
            Err(SegmentError::Checksum)
        );
    }

    #[test]
    fn torn_tail_and_corruption_stop_the_scan_at_their_place() {
        let seg = segment(1, 5);
        let full = scan(&seg, |_, _| {}).unwrap();
        let third = full.entries[2].pos;
        // Cut in the middle of the third record.
        let torn = &seg[..third as usize + 30];
        let s = scan(torn, |_, _| {}).unwrap();
        assert_eq!(s.entries.len(), 2);
        assert_eq!(s.valid_len, third);
        assert_eq!(s.stop, Some((third, ScanStop::Truncated)));
        // A flipped payload bit in the third record.
        let mut bad = seg.clone();
        bad[third as usize + HEADER_LEN + 3] ^= 0x10;
        let s = scan(&bad, |_, _| {}).unwrap();
        assert_eq!(s.entries.len(), 2);
        assert!(matches!(
            s.stop,
            Some((p, ScanStop::Bad(FormatError::Checksum { .. }))) if p == third
        ));
    }

    #[test]
    fn header_checks() {
        let h = SegmentHeader {
            first_seq: 5,
            created_ns: 9,
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        let mut bad = b;
        bad[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&bad), Err(SegmentError::Checksum));
        assert_eq!(SegmentHeader::decode(&b[..10]), Err(SegmentError::Short));
        assert_eq!(SegmentHeader::decode(&[0u8; 64]), Err(SegmentError::Magic));
    }
}
