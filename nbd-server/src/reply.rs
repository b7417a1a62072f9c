//! Transmission replies encoded to bytes: simple replies, and structured reply chunks once the
//! client negotiated them. Payload data is never copied here; callers send it beside the header.

use crate::proto::*;

/// A reply header small enough to live inline (the largest is OFFSET_HOLE: 20 + 12 bytes).
#[derive(Clone, Copy)]
pub struct Header {
    bytes: [u8; 32],
    len: u8,
}

impl Header {
    fn new() -> Header {
        Header {
            bytes: [0; 32],
            len: 0,
        }
    }
    fn put(&mut self, data: &[u8]) {
        let at = self.len as usize;
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self.len += data.len() as u8;
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Header({:02x?})", self.as_bytes())
    }
}

/// A simple reply: magic, error, cookie. For a successful READ the data follows.
pub fn simple(cookie: u64, error: Option<Errno>) -> Header {
    let mut h = Header::new();
    h.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h.put(&error.map_or(0, |e| e as u32).to_be_bytes());
    h.put(&cookie.to_be_bytes());
    h
}

fn chunk(cookie: u64, done: bool, kind: u16, length: u32) -> Header {
    let mut h = Header::new();
    h.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h.put(&(if done { REPLY_FLAG_DONE } else { 0 }).to_be_bytes());
    h.put(&kind.to_be_bytes());
    h.put(&cookie.to_be_bytes());
    h.put(&length.to_be_bytes());
    h
}

/// `NBD_REPLY_TYPE_NONE` with the DONE flag: ends a structured reply.
pub fn done(cookie: u64) -> Header {
    chunk(cookie, true, REPLY_TYPE_NONE, 0)
}

/// Header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk; `data_len` bytes of data follow it.
pub fn offset_data(cookie: u64, done: bool, offset: u64, data_len: u32) -> Header {
    let mut h = chunk(cookie, done, REPLY_TYPE_OFFSET_DATA, data_len + 8);
    h.put(&offset.to_be_bytes());
    h
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` bytes at `offset` read as zeroes.
pub fn offset_hole(cookie: u64, done: bool, offset: u64, hole_len: u32) -> Header {
    let mut h = chunk(cookie, done, REPLY_TYPE_OFFSET_HOLE, 12);
    h.put(&offset.to_be_bytes());
    h.put(&hole_len.to_be_bytes());
    h
}

/// A complete `NBD_REPLY_TYPE_ERROR` chunk with DONE, carrying a message for people.
pub fn error_chunk(cookie: u64, errno: Errno, message: &str) -> Vec<u8> {
    // Keep the message short enough that the chunk stays small; cut on a char boundary.
    let mut end = message.len().min(1024);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message[..end];
    let mut out = Vec::with_capacity(STRUCTURED_HEADER_LEN + 6 + message.len());
    out.extend_from_slice(
        chunk(cookie, true, REPLY_TYPE_ERROR, 6 + message.len() as u32).as_bytes(),
    );
    out.extend_from_slice(&(errno as u32).to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// One extent of a `base:allocation` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u32,
    pub flags: u32,
}

/// A complete `NBD_REPLY_TYPE_BLOCK_STATUS` chunk with DONE.
pub fn block_status(cookie: u64, context_id: u32, extents: &[StatusExtent]) -> Vec<u8> {
    let length = 4 + 8 * extents.len() as u32;
    let mut out = Vec::with_capacity(STRUCTURED_HEADER_LEN + length as usize);
    out.extend_from_slice(chunk(cookie, true, REPLY_TYPE_BLOCK_STATUS, length).as_bytes());
    out.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        out.extend_from_slice(&e.length.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_reply_bytes() {
        let h = simple(0x0102030405060708, Some(Errno::Inval));
        assert_eq!(
            h.as_bytes(),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(simple(7, None).as_bytes()[4..8], [0, 0, 0, 0]);
    }

    #[test]
    fn offset_data_header_counts_offset_in_length() {
        let h = offset_data(9, true, 4096, 512);
        let b = h.as_bytes();
        assert_eq!(b.len(), 28);
        assert_eq!(&b[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&b[4..6], &[0, 1]); // DONE
        assert_eq!(&b[6..8], &[0, 1]); // OFFSET_DATA
        assert_eq!(&b[16..20], &(512u32 + 8).to_be_bytes());
        assert_eq!(&b[20..28], &4096u64.to_be_bytes());
    }

    #[test]
    fn hole_and_none_chunks() {
        let b = offset_hole(1, false, 8192, 65536);
        assert_eq!(b.as_bytes().len(), 32);
        assert_eq!(&b.as_bytes()[4..8], &[0, 0, 0, 2]);
        assert_eq!(&b.as_bytes()[16..20], &12u32.to_be_bytes());
        assert_eq!(&b.as_bytes()[28..32], &65536u32.to_be_bytes());
        let n = done(1);
        assert_eq!(&n.as_bytes()[4..8], &[0, 1, 0, 0]);
        assert_eq!(&n.as_bytes()[16..20], &[0, 0, 0, 0]);
    }

    #[test]
    fn error_chunk_carries_errno_and_message() {
        let b = error_chunk(3, Errno::Io, "bad");
        assert_eq!(&b[6..8], &[0x80, 0x01]);
        assert_eq!(&b[16..20], &9u32.to_be_bytes());
        assert_eq!(&b[20..24], &5u32.to_be_bytes());
        assert_eq!(&b[24..26], &3u16.to_be_bytes());
        assert_eq!(&b[26..], b"bad");
        let long = "é".repeat(1000);
        let b = error_chunk(3, Errno::Io, &long);
        assert!(std::str::from_utf8(&b[26..]).is_ok());
    }

    #[test]
    fn block_status_chunk() {
        let b = block_status(
            5,
            1,
            &[
                StatusExtent {
                    length: 4096,
                    flags: 0,
                },
                StatusExtent {
                    length: 512,
                    flags: 3,
                },
            ],
        );
        assert_eq!(&b[6..8], &[0, 5]);
        assert_eq!(&b[16..20], &20u32.to_be_bytes());
        assert_eq!(&b[20..24], &1u32.to_be_bytes());
        assert_eq!(&b[24..32], &[0, 0, 16, 0, 0, 0, 0, 0]);
        assert_eq!(&b[32..40], &[0, 0, 2, 0, 0, 0, 0, 3]);
    }
}
