//! A deliberately naive NBD client that writes raw bytes, written from the spec and not from
//! the server's code, so tests can send malformed input and compare replies byte for byte.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// A structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub struct RawClient {
    pub stream: UnixStream,
}

impl RawClient {
    /// Connects and reads the server's greeting.
    pub fn connect(socket: &Path) -> RawClient {
        let stream = UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut c = RawClient { stream };
        let greeting = c.read(18);
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT", "greeting");
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    pub fn read(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.stream
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("read {n} bytes: {e}"));
        buf
    }

    /// True when the server closed the connection (nothing more to read).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
            || matches!(self.stream.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one option reply: (option, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read(20);
        assert_eq!(
            &h[..8],
            &0x0003_e889_0455_65a9u64.to_be_bytes(),
            "option reply magic"
        );
        let len = be32(&h[16..20]) as usize;
        (be32(&h[8..12]), be32(&h[12..16]), self.read(len))
    }

    /// Negotiates up to transmission with NBD_OPT_GO; returns (size, transmission flags).
    pub fn go(&mut self, export: &str, structured: bool, base_allocation: bool) -> (u64, u16) {
        self.send(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.option_reply().1, REP_ACK);
        }
        if base_allocation {
            let q = b"base:allocation";
            let mut d = name_data(export);
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
            self.option(OPT_SET_META_CONTEXT, &d);
            assert_eq!(self.option_reply().1, REP_META_CONTEXT);
            assert_eq!(self.option_reply().1, REP_ACK);
        }
        self.option(OPT_GO, &go_data(export));
        let mut export_info = None;
        loop {
            let (_, kind, data) = self.option_reply();
            match kind {
                REP_INFO if be16(&data[..2]) == 0 => {
                    export_info = Some((
                        u64::from_be_bytes(data[2..10].try_into().expect("8")),
                        be16(&data[10..12]),
                    ))
                }
                REP_INFO => {}
                REP_ACK => return export_info.expect("NBD_INFO_EXPORT before ACK"),
                other => panic!(
                    "GO failed with reply type {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        self.send(&request_bytes(kind, flags, cookie, offset, length));
        self.send(payload);
    }

    /// Reads a simple reply: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.read(16);
        assert_eq!(
            &h[..4],
            &[0x67, 0x44, 0x66, 0x98],
            "simple reply magic in {h:02x?}"
        );
        (
            be32(&h[4..8]),
            u64::from_be_bytes(h[8..16].try_into().expect("8")),
        )
    }

    pub fn chunk(&mut self) -> Chunk {
        let h = self.read(20);
        assert_eq!(
            &h[..4],
            &[0x66, 0x8e, 0x33, 0xef],
            "structured reply magic in {h:02x?}"
        );
        let len = be32(&h[16..20]) as usize;
        Chunk {
            flags: be16(&h[4..6]),
            kind: be16(&h[6..8]),
            cookie: u64::from_be_bytes(h[8..16].try_into().expect("8")),
            payload: self.read(len),
        }
    }
}

pub fn request_bytes(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut b = vec![0x25, 0x60, 0x95, 0x13];
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b
}

/// NBD_OPT_GO (or INFO) data asking for no particular information.
pub fn go_data(name: &str) -> Vec<u8> {
    let mut d = name_data(name);
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

pub fn name_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}
