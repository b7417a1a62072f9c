//! One change as bytes: a fixed 56-byte header and a payload, the same on the wire and in
//! journal segments.
//!
//! ```text
//!  0 magic u32 "CDPR"   4 kind u8   5 flags u8   6 disk u16
//!  8 seq u64           16 time_ns u64 (unix)    24 offset u64   32 length u64
//! 40 stored_len u32    44 data_crc u32 (crc32c of the payload before compression)
//! 48 reserved u32 = 0  52 crc u32 = crc32c(stored payload, then header bytes 0..52)
//! ```
//!
//! The record crc covers the stored payload first, so it can be computed before the seq is known
//! (outside the sequencing lock) and finished over the header afterwards. Integers are
//! little-endian. Nothing here does I/O.

use std::borrow::Cow;

pub const HEADER_LEN: usize = 56;
pub const MAGIC: u32 = u32::from_le_bytes(*b"CDPR");
/// Largest stored payload accepted (a 32 MiB NBD write, incompressible, plus lz4's overhead).
pub const MAX_STORED: u32 = 33 * 1024 * 1024;
const FLAG_LZ4: u8 = 1;

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum Kind {
    /// Data written by the guest at `offset`; the payload is the data.
    Write = 1,
    /// `offset..offset+length` reads as zeroes (WRITE_ZEROES).
    Zero = 2,
    /// `offset..offset+length` was discarded; the proxy's image reads it as zeroes, so replay does too.
    Trim = 3,
    /// A FLUSH completed: every earlier record is on the proxy's disk (a crash-consistent point).
    Flush = 4,
    /// A named recovery point; the payload is the name. Always placed after a flush.
    Bookmark = 5,
    /// Start of a seed or resync: points from here to the matching `SyncEnd` are not consistent.
    /// The payload says why ("seed", "resync", "delta").
    SyncBegin = 6,
    /// Current content of a range, read by a seed or resync; replays like `Write`.
    SyncData = 7,
    /// End of a seed or resync: from here on, points are consistent again.
    SyncEnd = 8,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Write,
            2 => Kind::Zero,
            3 => Kind::Trim,
            4 => Kind::Flush,
            5 => Kind::Bookmark,
            6 => Kind::SyncBegin,
            7 => Kind::SyncData,
            8 => Kind::SyncEnd,
            _ => return None,
        })
    }

    /// Whether the record changes a disk's bytes at `offset..offset+length`.
    pub fn changes_data(self) -> bool {
        matches!(self, Kind::Write | Kind::Zero | Kind::Trim | Kind::SyncData)
    }

    /// Whether replaying the record writes its payload (rather than zeroes).
    pub fn carries_data(self) -> bool {
        matches!(self, Kind::Write | Kind::SyncData)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Write => "write",
            Kind::Zero => "zero",
            Kind::Trim => "trim",
            Kind::Flush => "flush",
            Kind::Bookmark => "bookmark",
            Kind::SyncBegin => "sync-begin",
            Kind::SyncData => "sync-data",
            Kind::SyncEnd => "sync-end",
        }
    }
}

/// A record that does not decode. Each names what is wrong; callers add where it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("bad record magic {0:#010x}")]
    Magic(u32),
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("unknown record flags {0:#04x}")]
    Flags(u8),
    #[error("stored payload of {0} bytes is larger than the limit")]
    TooLarge(u32),
    #[error("record fields are inconsistent: {0}")]
    Inconsistent(&'static str),
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("payload checksum mismatch after decompression")]
    DataChecksum,
    #[error("payload does not decompress: {0}")]
    Decompress(String),
}

/// The decoded header of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub compressed: bool,
    pub disk: u16,
    pub seq: u64,
    pub time_ns: u64,
    pub offset: u64,
    pub length: u64,
    pub stored_len: u32,
    pub data_crc: u32,
    pub crc: u32,
}

impl Header {
    /// Bytes the whole record takes (header + stored payload).
    pub fn record_len(&self) -> usize {
        HEADER_LEN + self.stored_len as usize
    }

    /// Decodes and sanity-checks a header; the checksum needs the payload ([`verify`]).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, FormatError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(FormatError::Magic(magic));
        }
        let kind = Kind::from_u8(b[4]).ok_or(FormatError::Kind(b[4]))?;
        let flags = b[5];
        if flags & !FLAG_LZ4 != 0 {
            return Err(FormatError::Flags(flags));
        }
        let h = Header {
            kind,
            compressed: flags & FLAG_LZ4 != 0,
            disk: u16::from_le_bytes([b[6], b[7]]),
            seq: u64_at(8),
            time_ns: u64_at(16),
            offset: u64_at(24),
            length: u64_at(32),
            stored_len: u32_at(40),
            data_crc: u32_at(44),
            crc: u32_at(52),
        };
        if u32_at(48) != 0 {
            return Err(FormatError::Inconsistent("reserved field is not zero"));
        }
        if h.stored_len > MAX_STORED {
            return Err(FormatError::TooLarge(h.stored_len));
        }
        if h.kind.carries_data() {
            if h.length == 0 || h.length > u64::from(MAX_STORED) {
                return Err(FormatError::Inconsistent("data length out of range"));
            }
            if !h.compressed && u64::from(h.stored_len) != h.length {
                return Err(FormatError::Inconsistent(
                    "uncompressed payload length differs from the record length",
                ));
            }
        } else if h.compressed {
            return Err(FormatError::Inconsistent(
                "only data records are compressed",
            ));
        }
        if h.kind.changes_data() && h.offset.checked_add(h.length).is_none() {
            return Err(FormatError::Inconsistent("offset + length overflows"));
        }
        Ok(h)
    }
}

/// A record whose checksum has been verified, borrowing its bytes.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub header: Header,
    /// The stored payload (compressed when `header.compressed`).
    pub stored: &'a [u8],
    /// The whole record as it travels and is stored: header, then `stored`.
    pub bytes: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// The payload as written by the guest (decompressed and checked against `data_crc`).
    /// A stored-raw payload was checked against `data_crc` when the record was parsed (every
    /// `RecordRef` comes from [`parse`]), so it is returned as it is, without a second pass.
    pub fn payload(&self) -> Result<Cow<'a, [u8]>, FormatError> {
        let h = &self.header;
        if !h.compressed {
            return Ok(Cow::Borrowed(self.stored));
        }
        let raw = lz4_flex::block::decompress(self.stored, h.length as usize)
            .map_err(|e| FormatError::Decompress(e.to_string()))?;
        if raw.len() as u64 != h.length {
            return Err(FormatError::Decompress("wrong decompressed length".into()));
        }
        if crc32c::crc32c(&raw) != h.data_crc {
            return Err(FormatError::DataChecksum);
        }
        Ok(Cow::Owned(raw))
    }

    /// The payload read as text (bookmark names, sync reasons).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(self.stored).into_owned()
    }
}

/// Parses the record at the start of `buf`: `Ok(None)` when `buf` holds only part of it.
pub fn parse(buf: &[u8]) -> Result<Option<RecordRef<'_>>, FormatError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = Header::decode(head)?;
    let Some(bytes) = buf.get(..header.record_len()) else {
        return Ok(None);
    };
    let stored = &bytes[HEADER_LEN..];
    verify(head, stored)?;
    Ok(Some(RecordRef {
        header,
        stored,
        bytes,
    }))
}

/// Checks a record's checksum, and for a payload stored raw its `data_crc` too (the crc of
/// the same bytes, so one pass serves both).
pub fn verify(head: &[u8; HEADER_LEN], stored: &[u8]) -> Result<(), FormatError> {
    let stored_crc = u32::from_le_bytes([head[52], head[53], head[54], head[55]]);
    let payload_crc = crc32c::crc32c(stored);
    let computed = crc32c::crc32c_append(payload_crc, &head[..52]);
    if stored_crc != computed {
        return Err(FormatError::Checksum {
            stored: stored_crc,
            computed,
        });
    }
    let data_crc = u32::from_le_bytes([head[44], head[45], head[46], head[47]]);
    if head[5] & FLAG_LZ4 == 0 && data_crc != payload_crc {
        return Err(FormatError::DataChecksum);
    }
    Ok(())
}

/// A data payload as a record stores it: lz4-compressed when that is smaller, and summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Length of the compressed payload, which [`store`] left at the start of its scratch
    /// buffer; `None`: the payload is stored as it came.
    pub compressed: Option<usize>,
    /// crc32c of the data (before compression).
    pub data_crc: u32,
    /// crc32c of the stored payload (the data's when it is stored raw: one pass, not two).
    pub stored_crc: u32,
}

/// Sums a data payload and, with `compress`, tries lz4, keeping the result (in `scratch`,
/// grown to lz4's worst case and reused between calls) only when it is smaller.
pub fn store(data: &[u8], compress: bool, scratch: &mut Vec<u8>) -> Stored {
    let data_crc = crc32c::crc32c(data);
    let mut compressed = None;
    if compress {
        let bound = lz4_flex::block::get_maximum_output_size(data.len());
        if scratch.len() < bound {
            scratch.resize(bound, 0);
        }
        if let Ok(n) = lz4_flex::block::compress_into(data, &mut scratch[..bound]) {
            compressed = (n < data.len()).then_some(n);
        }
    }
    let stored_crc = match compressed {
        Some(n) => crc32c::crc32c(&scratch[..n]),
        None => data_crc,
    };
    Stored {
        compressed,
        data_crc,
        stored_crc,
    }
}

impl Header {
    /// The header of a data record whose payload is `stored` (not yet numbered: seq and time
    /// 0, crc unset).
    pub fn data(kind: Kind, disk: u16, offset: u64, length: u64, stored: &Stored) -> Header {
        Header {
            kind,
            compressed: stored.compressed.is_some(),
            disk,
            seq: 0,
            time_ns: 0,
            offset,
            length,
            stored_len: stored.compressed.unwrap_or(length as usize) as u32,
            data_crc: stored.data_crc,
            crc: 0,
        }
    }

    /// The header of a record without data (not yet numbered) whose payload is `text`, and
    /// the crc32c of `text`.
    pub fn control(kind: Kind, disk: u16, offset: u64, length: u64, text: &[u8]) -> (Header, u32) {
        let crc = crc32c::crc32c(text);
        let header = Header {
            kind,
            compressed: false,
            disk,
            seq: 0,
            time_ns: 0,
            offset,
            length,
            stored_len: text.len() as u32,
            data_crc: crc,
            crc: 0,
        };
        (header, crc)
    }

    /// The header's bytes, sealed: the record crc is computed over `stored_crc` (the crc32c of
    /// the stored payload) and bytes 0..52, so a record can be sent as this header followed by
    /// a payload kept elsewhere (the bytes [`Encoded::seal`] makes). `self.crc` is not read.
    pub fn seal(&self, stored_crc: u32) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.kind as u8;
        b[5] = if self.compressed { FLAG_LZ4 } else { 0 };
        b[6..8].copy_from_slice(&self.disk.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.time_ns.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.length.to_le_bytes());
        b[40..44].copy_from_slice(&self.stored_len.to_le_bytes());
        b[44..48].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32c::crc32c_append(stored_crc, &b[..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// A record being built: payload compressed and summed before it has a seq, so that the
/// expensive part runs outside the sequencing lock. [`Encoded::seal`] finishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Room for the header, then the stored payload.
    bytes: Vec<u8>,
    header: Header,
    payload_crc: u32,
}

impl Encoded {
    /// A data record (`Write` or `SyncData`); `compress` tries lz4 and keeps it when smaller.
    pub fn data(kind: Kind, disk: u16, offset: u64, data: &[u8], compress: bool) -> Encoded {
        debug_assert!(kind.carries_data() && !data.is_empty());
        thread_local! {
            /// lz4's worst case for the largest payload, reused: the record itself is allocated
            /// at its exact size, so the change log's byte budget is what it really holds.
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|scratch| {
            let scratch = &mut scratch.borrow_mut();
            let stored = store(data, compress, scratch);
            let payload = match stored.compressed {
                Some(n) => &scratch[..n],
                None => data,
            };
            let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
            bytes.resize(HEADER_LEN, 0);
            bytes.extend_from_slice(payload);
            Encoded {
                bytes,
                header: Header::data(kind, disk, offset, data.len() as u64, &stored),
                payload_crc: stored.stored_crc,
            }
        })
    }

    /// A record without data: zero, trim (with a range) or flush, bookmark, sync markers (with a
    /// text payload such as a bookmark's name).
    pub fn control(kind: Kind, disk: u16, offset: u64, length: u64, text: &str) -> Encoded {
        debug_assert!(!kind.carries_data());
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes.extend_from_slice(text.as_bytes());
        let (header, payload_crc) = Header::control(kind, disk, offset, length, text.as_bytes());
        Encoded {
            bytes,
            header,
            payload_crc,
        }
    }

    /// Whether the payload is stored lz4-compressed.
    pub fn is_compressed(&self) -> bool {
        self.header.compressed
    }

    /// Gives the record its place in the stream and finishes the checksum.
    pub fn seal(mut self, seq: u64, time_ns: u64) -> Vec<u8> {
        let header = Header {
            seq,
            time_ns,
            ..self.header
        };
        self.bytes[..HEADER_LEN].copy_from_slice(&header.seal(self.payload_crc));
        self.bytes
    }

    /// Bytes the sealed record will take.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Decides when a data record is worth an lz4 attempt. A guest that writes incompressible
/// data (encrypted, already compressed) would otherwise pay a failed compression on every
/// write; after each attempt that saves less than an eighth, the next attempts are skipped for
/// twice as many records as before (up to [`CompressGate::MAX_SKIP`]), and one attempt that
/// saves resets the skipping. Shared by every writer of a group: relaxed atomics, since a lost
/// update only moves one attempt.
#[derive(Debug, Default)]
pub struct CompressGate {
    /// Records still to be stored without an attempt.
    skip: std::sync::atomic::AtomicU32,
    /// How many records the last failed attempt made us skip.
    backoff: std::sync::atomic::AtomicU32,
}

impl CompressGate {
    pub const MAX_SKIP: u32 = 256;

    /// A data record, compressed if the gate says an attempt is worth it (the proxy seals
    /// records itself with [`CompressGate::attempt`]; this is the gate's behaviour in one call).
    #[cfg(test)]
    pub fn encode(&self, kind: Kind, disk: u16, offset: u64, data: &[u8]) -> Encoded {
        if !self.attempt() {
            return Encoded::data(kind, disk, offset, data, false);
        }
        let enc = Encoded::data(kind, disk, offset, data, true);
        let compressed = enc.is_compressed().then(|| enc.len() - HEADER_LEN);
        self.attempted(data.len(), compressed);
        enc
    }

    /// Whether the next data record is worth an lz4 attempt (each call counts as a record).
    /// After an attempt, [`CompressGate::attempted`] says how it went.
    pub fn attempt(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.skip
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_err()
    }

    /// An attempt on `raw_len` bytes of data compressed them to `compressed` bytes (`None`:
    /// lz4 made them no smaller).
    pub fn attempted(&self, raw_len: usize, compressed: Option<usize>) {
        use std::sync::atomic::Ordering::Relaxed;
        if compressed.is_some_and(|n| n <= raw_len - raw_len / 8) {
            self.backoff.store(0, Relaxed);
        } else {
            let next = (self.backoff.load(Relaxed).max(1) * 2).min(Self::MAX_SKIP);
            self.backoff.store(next, Relaxed);
            self.skip.store(next, Relaxed);
        }
    }
}

/// Reads the seq of a sealed record without decoding the rest.
pub fn seq_of(sealed: &[u8]) -> u64 {
    le64_at(sealed, 8)
}

/// Reads the time of a sealed record without decoding the rest.
pub fn time_of(sealed: &[u8]) -> u64 {
    le64_at(sealed, 16)
}

/// Where each part of a record sits in `sealed` (0 when `sealed` is too short to hold it).
pub fn range_of(sealed: &[u8]) -> (u16, u64, u64) {
    let disk = sealed
        .get(6..8)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
    (disk, le64_at(sealed, 24), le64_at(sealed, 32))
}

fn le64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

#[cfg(test)]
mod tests;
