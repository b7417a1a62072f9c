//! A change in the change log: a record's header fields and its payload, which for a guest
//! write (and a sync's chunk) is the pooled buffer the data was read into, never copied.
//!
//! The guest's reply path only numbers a record ([`crate::capture::Capture`] gives it a seq
//! and a time under the range lock). The shipper seals it before it first sends it: sums the
//! payload, compresses it when the [`CompressGate`] says an attempt is worth it, and writes
//! the header. The bytes that leave are those of [`journal::record::Encoded::seal`] (the
//! header, then the stored payload), sent as two slices of one `writev`.

use journal::record::{self, CompressGate, Header, Kind, HEADER_LEN};
use nbd_server::Buffer;

/// One change, numbered or not yet, sealed or not yet.
#[derive(Debug)]
pub struct Record {
    /// Its place in the stream (0 until numbered).
    pub seq: u64,
    /// Capture time, ns since the Unix epoch (0 until numbered).
    pub time_ns: u64,
    kind: Kind,
    disk: u16,
    offset: u64,
    length: u64,
    payload: Payload,
    /// The sealed header, once the shipper has sealed the record.
    head: Option<[u8; HEADER_LEN]>,
}

#[derive(Debug)]
enum Payload {
    /// Data as it came: the buffer the NBD connection read a WRITE into, or a sync's chunk.
    /// Dropped (back to the buffer pool) when the record leaves the log.
    Raw(Buffer),
    /// Text (bookmark names, sync reasons), or data lz4 compressed to this.
    Bytes(Vec<u8>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Raw(b) => b,
            Payload::Bytes(v) => v,
        }
    }
}

impl Record {
    /// A data record (`Write` or `SyncData`) holding `data`: not copied, not summed yet.
    pub fn data(kind: Kind, disk: u16, offset: u64, data: Buffer) -> Record {
        debug_assert!(kind.carries_data() && !data.is_empty());
        let length = data.len() as u64;
        Record::new(kind, disk, offset, length, Payload::Raw(data))
    }

    /// A record without data: zero, trim (with a range) or flush, bookmark, sync markers (with a
    /// text payload such as a bookmark's name).
    pub fn control(kind: Kind, disk: u16, offset: u64, length: u64, text: &str) -> Record {
        debug_assert!(!kind.carries_data());
        let text = Payload::Bytes(text.as_bytes().to_vec());
        Record::new(kind, disk, offset, length, text)
    }

    /// Not numbered (seq and time 0) and not sealed.
    fn new(kind: Kind, disk: u16, offset: u64, length: u64, payload: Payload) -> Record {
        Record {
            seq: 0,
            time_ns: 0,
            kind,
            disk,
            offset,
            length,
            payload,
            head: None,
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// (disk, offset, length) of the change.
    pub fn range(&self) -> (u16, u64, u64) {
        (self.disk, self.offset, self.length)
    }

    /// Bytes of memory the record holds: what it counts against the change log's budget (a
    /// pooled buffer counts whole, a power of two at least as long as the data).
    pub fn mem_bytes(&self) -> u64 {
        let payload = match &self.payload {
            Payload::Raw(b) => b.capacity(),
            Payload::Bytes(v) => v.capacity(),
        };
        (HEADER_LEN + payload) as u64
    }

    /// Sums the payload (compressed when `gate` says to try and lz4 makes it smaller, using
    /// `scratch`) and writes the header; nothing happens to a record already sealed. Returns
    /// the bytes of memory compression gave back (the log's budget counts them no more).
    pub fn seal(&mut self, gate: &CompressGate, scratch: &mut Vec<u8>) -> u64 {
        if self.head.is_some() {
            return 0;
        }
        let before = self.mem_bytes();
        let header = if self.kind.carries_data() {
            let data = self.payload.bytes();
            let attempt = gate.attempt();
            let stored = record::store(data, attempt, scratch);
            if attempt {
                gate.attempted(data.len(), stored.compressed);
            }
            let header = Header::data(self.kind, self.disk, self.offset, self.length, &stored);
            if let Some(n) = stored.compressed {
                self.payload = Payload::Bytes(scratch[..n].to_vec());
            }
            (header, stored.stored_crc)
        } else {
            let text = self.payload.bytes();
            Header::control(self.kind, self.disk, self.offset, self.length, text)
        };
        let (header, stored_crc) = header;
        let header = Header {
            seq: self.seq,
            time_ns: self.time_ns,
            ..header
        };
        self.head = Some(header.seal(stored_crc));
        before.saturating_sub(self.mem_bytes())
    }

    /// The record's bytes as they travel and are stored: the sealed header, then the stored
    /// payload. `None` until [`Record::seal`].
    pub fn sealed(&self) -> Option<(&[u8; HEADER_LEN], &[u8])> {
        Some((self.head.as_ref()?, self.payload.bytes()))
    }

    /// Bytes the sealed record takes on the wire (header and stored payload).
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.bytes().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use journal::record::Encoded;

    fn sealed(r: &Record) -> Vec<u8> {
        let (head, payload) = r.sealed().expect("sealed");
        [&head[..], payload].concat()
    }

    /// What the shipper sends is what `Encoded::seal` makes, the bytes the replicator reads.
    #[test]
    fn sealed_records_are_the_journal_format() {
        let gate = CompressGate::default();
        let mut scratch = Vec::new();
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let noise = journal::testdata::pattern(1, 4096);
        for (data, kind) in [(&pattern, Kind::Write), (&noise, Kind::SyncData)] {
            let mut buf = Buffer::take(data.len());
            buf.copy_from_slice(data);
            let mut r = Record::data(kind, 1, 8192, buf);
            assert!(r.sealed().is_none());
            (r.seq, r.time_ns) = (77, 78);
            let before = r.mem_bytes();
            let freed = r.seal(&gate, &mut scratch);
            assert_eq!(r.mem_bytes(), before - freed);
            let want = Encoded::data(kind, 1, 8192, data, true).seal(77, 78);
            assert_eq!(sealed(&r), want);
            assert_eq!(r.wire_len(), want.len());
            // Sealing again changes nothing (a resend after a reconnect).
            assert_eq!(r.seal(&gate, &mut scratch), 0);
            assert_eq!(sealed(&r), want);
            let parsed = journal::record::parse(&want).unwrap().unwrap();
            assert_eq!(parsed.payload().unwrap().as_ref(), &data[..]);
        }
        let mut r = Record::control(Kind::Bookmark, 0, 0, 0, "before-upgrade");
        (r.seq, r.time_ns) = (5, 6);
        r.seal(&gate, &mut scratch);
        assert_eq!(
            sealed(&r),
            Encoded::control(Kind::Bookmark, 0, 0, 0, "before-upgrade").seal(5, 6)
        );
    }
}
