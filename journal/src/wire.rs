//! The stream between nbd-proxy and the replicator, as bytes.
//!
//! Every message is a frame: a 16-byte header and a body.
//!
//! ```text
//! 0 magic "CDPW"  4 type u8  5 reserved [u8; 3] = 0  8 body_len u32  12 crc u32 = crc32c(body)
//! ```
//!
//! A Batch frame's crc field is 0 (protocol 3; anything else is refused): its body is sealed records, each
//! with its own checksum over its header and payload, checked one by one before any of a batch
//! is stored. Summing the body as well was a second pass over every byte on each side.
//!
//! The conversation:
//!
//! ```text
//! proxy                                   replicator
//! Hello {protocol, group, volumes,  ───▶
//!        want_hashes, stream,
//!        link_timeout_ms}
//!                                   ◀───  Welcome {protocol, known, durable_seq, stream,
//!                                                  link_timeout_ms, store_disks}
//!                                   ◀───  Hashes {disk, first_chunk, xxh3-128 per chunk} ...
//!                                   ◀───  HashesDone            (only if want_hashes)
//! Batch {sealed records, seq order} ───▶
//!                                   ◀───  Ack {durable_seq}     (after fsync)
//! Keepalive                         ◀──▶  Keepalive             (when otherwise idle)
//!                                   ◀───  Refused {seq, reason} (a record it will not store)
//! ...                                     Error {text} either way, then close
//! ```
//!
//! Each side sends a Keepalive when it has sent nothing for a quarter of the shorter of the two
//! link timeouts, and takes a peer silent for its own timeout to be gone (no FIN needed).
//!
//! Hello and Welcome bodies are JSON so they can grow fields; the hot frames are binary.
//! Records inside a batch carry their own checksums ([`crate::record`]).

use serde::{Deserialize, Serialize};

pub const FRAME_HEADER_LEN: usize = 16;
pub const MAGIC: u32 = u32::from_le_bytes(*b"CDPW");
pub const PROTOCOL: u32 = 3;
/// Largest frame body accepted.
pub const MAX_BODY: u32 = 64 * 1024 * 1024;
/// Body bytes a frame reader reserves before they arrive (nbd-proxy's batches are 4 MiB).
const BATCH_RESERVE: usize = 4 << 20;
/// Largest frame body accepted before the peer's Hello/Welcome was accepted.
pub const MAX_HANDSHAKE_BODY: u32 = 64 * 1024;
/// Bytes of disk each hash in a `Hashes` frame covers.
pub const HASH_CHUNK: u64 = 256 * 1024;
/// Hashes per `Hashes` frame (a frame covers 1 GiB of disk).
pub const HASHES_PER_FRAME: usize = 4 * 1024;
/// Largest volume a group may declare (64 TiB).
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    Welcome = 2,
    Hashes = 3,
    HashesDone = 4,
    Batch = 5,
    Ack = 6,
    Error = 7,
    Keepalive = 8,
    Refused = 9,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<FrameType> {
        Some(match v {
            1 => FrameType::Hello,
            2 => FrameType::Welcome,
            3 => FrameType::Hashes,
            4 => FrameType::HashesDone,
            5 => FrameType::Batch,
            6 => FrameType::Ack,
            7 => FrameType::Error,
            8 => FrameType::Keepalive,
            9 => FrameType::Refused,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic {0:#010x} (is the peer a CDP proxy or replicator?)")]
    Magic(u32),
    #[error("unknown frame type {0}")]
    Type(u8),
    #[error("frame body of {0} bytes is larger than the limit")]
    TooLarge(u32),
    #[error("a {0:?} frame is not allowed before the handshake completes")]
    NotYet(FrameType),
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("malformed {what} frame: {detail}")]
    Malformed { what: &'static str, detail: String },
    /// The peer sent an `Error` frame where `expected` should have come.
    #[error("refused by the peer (instead of the {expected}): {message}")]
    Refused {
        expected: &'static str,
        message: String,
    },
    #[error("expected a {expected} frame, got {got:?}")]
    Unexpected {
        expected: &'static str,
        got: FrameType,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: FrameType,
    pub body: &'a [u8],
}

/// Parses the frame header at the start of `buf`: the type and body length, checked.
pub fn parse_header(buf: &[u8; FRAME_HEADER_LEN]) -> Result<(FrameType, u32, u32), WireError> {
    let le32 = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    if le32(0) != MAGIC {
        return Err(WireError::Magic(le32(0)));
    }
    let kind = FrameType::from_u8(buf[4]).ok_or(WireError::Type(buf[4]))?;
    if buf[5..8] != [0, 0, 0] {
        return Err(WireError::Malformed {
            what: "frame",
            detail: "reserved header bytes are not zero".into(),
        });
    }
    let len = le32(8);
    if len > MAX_BODY {
        return Err(WireError::TooLarge(len));
    }
    Ok((kind, len, le32(12)))
}

/// Whether frames of this type carry a crc of their body (a batch's records carry their own).
fn summed(kind: FrameType) -> bool {
    kind != FrameType::Batch
}

/// Checks a body against the crc from its header (a batch's crc field must be 0).
pub fn check_body(kind: FrameType, crc: u32, body: &[u8]) -> Result<(), WireError> {
    if !summed(kind) {
        if crc != 0 {
            return Err(WireError::Malformed {
                what: "frame",
                detail: "a batch frame's crc field is not zero (protocol 3 sends 0)".into(),
            });
        }
        return Ok(());
    }
    if crc32c::crc32c(body) != crc {
        return Err(WireError::Checksum);
    }
    Ok(())
}

/// Reads one frame from a blocking stream, checked: the only I/O in this module, shared by
/// both ends. The body may be at most `limit` bytes ([`MAX_BODY`], or [`MAX_HANDSHAKE_BODY`]
/// before the handshake), and memory grows only as its bytes arrive, so a header that claims
/// a large body costs nothing until the body is really sent.
pub fn read_frame(r: &mut impl std::io::Read, limit: u32) -> std::io::Result<(FrameType, Vec<u8>)> {
    let mut body = Vec::new();
    let (kind, len) = read_frame_into(r, limit, &mut body)?;
    body.truncate(len);
    Ok((kind, body))
}

/// [`read_frame`] into `body`, a buffer kept between frames: the frame's body is
/// `body[..len]` (`len` returned). `body` grows to the largest body read, and only as its bytes
/// arrive; reused, it costs neither an allocation nor zeroing per frame (a fresh 4 MiB body
/// per batch was 12% of the replicator's CPU under ingest-bench: zero-fill and page faults).
pub fn read_frame_into(
    r: &mut impl std::io::Read,
    limit: u32,
    body: &mut Vec<u8>,
) -> std::io::Result<(FrameType, usize)> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut head)?;
    let invalid = |e: WireError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let (kind, len, crc) = parse_header(&head).map_err(invalid)?;
    if len > limit {
        return Err(invalid(WireError::TooLarge(len)));
    }
    let len = len as usize;
    let mut filled = 0;
    while filled < len {
        // At most a batch's size ahead of the bytes that came.
        let upto = len.min(filled + BATCH_RESERVE);
        if body.len() < upto {
            body.resize(upto, 0);
        }
        r.read_exact(&mut body[filled..upto])?;
        filled = upto;
    }
    check_body(kind, crc, &body[..len]).map_err(invalid)?;
    Ok((kind, len))
}

/// Parses a whole frame at the start of `buf`; `Ok(None)` if `buf` holds only part of one.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, WireError> {
    let Some(head) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let (kind, len, crc) = parse_header(head)?;
    let end = FRAME_HEADER_LEN + len as usize;
    let Some(body) = buf.get(FRAME_HEADER_LEN..end) else {
        return Ok(None);
    };
    check_body(kind, crc, body)?;
    Ok(Some((Frame { kind, body }, end)))
}

/// A frame header for `body`.
pub fn header(kind: FrameType, body: &[u8]) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = kind as u8;
    h[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
    if summed(kind) {
        h[12..16].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    }
    h
}

/// A whole frame (header + body) in one buffer.
pub fn frame(kind: FrameType, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&header(kind, body));
    out.extend_from_slice(body);
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub group: String,
    pub volumes: Vec<Volume>,
    /// Send hashes of the latest image (the proxy does not know what the replicator holds).
    pub want_hashes: bool,
    /// Who numbers this stream: the same id across the proxy's restarts while its activity
    /// log is trusted, a new one otherwise. Records of another stream are not its records.
    pub stream: String,
    /// The proxy takes a replicator silent this long to be gone.
    pub link_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    /// The replicator already had this group (else it was just created, empty).
    pub known: bool,
    /// Highest seq the replicator holds durably; the proxy sends what follows.
    pub durable_seq: u64,
    /// The stream whose records the journal ends with (None for a new group). When it is not
    /// the proxy's own, the seqs after `durable_seq` are not the proxy's: it must compare.
    pub stream: Option<String>,
    /// The replicator takes a proxy silent this long to be gone.
    pub link_timeout_ms: u64,
    /// The disks the store lives on ([`crate::disks`]; None: unknown, or an older replicator).
    /// The proxy writes its images back in slices only when they share one.
    #[serde(default)]
    pub store_disks: Option<Vec<String>>,
}

/// The replicator will not store the record at `seq` (nor anything after it in the stream):
/// the session ends, and the proxy must not send that record again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub seq: u64,
    pub reason: String,
}

impl Refused {
    pub fn encode(&self) -> Vec<u8> {
        json(FrameType::Refused, self)
    }
    pub fn decode(frame: &Frame<'_>) -> Result<Refused, WireError> {
        from_json(frame, FrameType::Refused, "refused")
    }
}

/// How often to send a keepalive on an otherwise idle link, given both sides' timeouts.
pub fn keepalive_interval_ms(own_timeout_ms: u64, peer_timeout_ms: u64) -> u64 {
    (own_timeout_ms.min(peer_timeout_ms) / 4).clamp(50, 5_000)
}

pub fn keepalive() -> Vec<u8> {
    frame(FrameType::Keepalive, &[])
}

fn json<T: Serialize>(kind: FrameType, v: &T) -> Vec<u8> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    frame(kind, &body)
}

fn from_json<'a, T: Deserialize<'a>>(
    frame: &Frame<'a>,
    kind: FrameType,
    what: &'static str,
) -> Result<T, WireError> {
    if frame.kind != kind {
        return Err(unexpected(frame, what));
    }
    serde_json::from_slice(frame.body).map_err(|e| WireError::Malformed {
        what,
        detail: e.to_string(),
    })
}

/// The error for a frame that is not the one the conversation expects. An `Error` frame from
/// the peer is reported with its text.
pub fn unexpected(frame: &Frame<'_>, expected: &'static str) -> WireError {
    if frame.kind == FrameType::Error {
        return WireError::Refused {
            expected,
            message: String::from_utf8_lossy(frame.body).into_owned(),
        };
    }
    WireError::Unexpected {
        expected,
        got: frame.kind,
    }
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        json(FrameType::Hello, self)
    }
    pub fn decode(frame: &Frame<'_>) -> Result<Hello, WireError> {
        let h: Hello = from_json(frame, FrameType::Hello, "hello")?;
        let malformed = |detail: String| WireError::Malformed {
            what: "hello",
            detail,
        };
        crate::names::check("group", &h.group).map_err(malformed)?;
        crate::names::check_volumes(h.volumes.iter().map(|v| v.name.as_str()))
            .map_err(malformed)?;
        if let Some(v) = h.volumes.iter().find(|v| v.size > MAX_VOLUME_BYTES) {
            return Err(malformed(format!(
                "volume {} declares {} bytes; at most {MAX_VOLUME_BYTES} are allowed",
                v.name, v.size
            )));
        }
        if h.stream.is_empty() || h.stream.len() > 64 {
            return Err(malformed("the stream id needs 1 to 64 bytes".into()));
        }
        Ok(h)
    }
}

impl Welcome {
    pub fn encode(&self) -> Vec<u8> {
        json(FrameType::Welcome, self)
    }
    pub fn decode(frame: &Frame<'_>) -> Result<Welcome, WireError> {
        from_json(frame, FrameType::Welcome, "welcome")
    }
}

pub fn ack(durable_seq: u64) -> Vec<u8> {
    frame(FrameType::Ack, &durable_seq.to_le_bytes())
}

pub fn decode_ack(frame: &Frame<'_>) -> Result<u64, WireError> {
    if frame.kind != FrameType::Ack {
        return Err(unexpected(frame, "ack"));
    }
    let b: [u8; 8] = frame.body.try_into().map_err(|_| WireError::Malformed {
        what: "ack",
        detail: format!("body is {} bytes, not 8", frame.body.len()),
    })?;
    Ok(u64::from_le_bytes(b))
}

pub fn error(text: &str) -> Vec<u8> {
    frame(FrameType::Error, text.as_bytes())
}

/// Hashes of chunks `first_chunk..` of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashes {
    pub disk: u16,
    pub first_chunk: u64,
    pub hashes: Vec<u128>,
}

impl Hashes {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(10 + 16 * self.hashes.len());
        body.extend_from_slice(&self.disk.to_le_bytes());
        body.extend_from_slice(&self.first_chunk.to_le_bytes());
        for h in &self.hashes {
            body.extend_from_slice(&h.to_le_bytes());
        }
        frame(FrameType::Hashes, &body)
    }

    pub fn decode(frame: &Frame<'_>) -> Result<Hashes, WireError> {
        if frame.kind != FrameType::Hashes {
            return Err(unexpected(frame, "hashes"));
        }
        let b = frame.body;
        if b.len() < 10 || !(b.len() - 10).is_multiple_of(16) {
            return Err(WireError::Malformed {
                what: "hashes",
                detail: format!("body of {} bytes", b.len()),
            });
        }
        let mut first = [0u8; 8];
        first.copy_from_slice(&b[2..10]);
        let hashes = b[10..]
            .chunks_exact(16)
            .map(|c| {
                let mut a = [0u8; 16];
                a.copy_from_slice(c);
                u128::from_le_bytes(a)
            })
            .collect();
        Ok(Hashes {
            disk: u16::from_le_bytes([b[0], b[1]]),
            first_chunk: u64::from_le_bytes(first),
            hashes,
        })
    }
}

/// The hash both sides compute over a chunk's bytes (the last chunk of a disk may be short).
pub fn chunk_hash(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// Splits a batch body into its records, checking each one.
pub fn batch_records(
    body: &[u8],
) -> impl Iterator<Item = Result<crate::record::RecordRef<'_>, WireError>> {
    let mut rest = body;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match crate::record::parse(rest) {
            Ok(Some(r)) => {
                rest = &rest[r.header.record_len()..];
                Some(Ok(r))
            }
            Ok(None) => {
                rest = &[];
                Some(Err(WireError::Malformed {
                    what: "batch",
                    detail: "a record is cut short".into(),
                }))
            }
            Err(e) => {
                rest = &[];
                Some(Err(WireError::Malformed {
                    what: "batch",
                    detail: e.to_string(),
                }))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Encoded, Kind};

    #[test]
    fn hello_welcome_ack_round_trip() {
        let hello = Hello {
            protocol: PROTOCOL,
            group: "web".into(),
            volumes: vec![Volume {
                name: "root".into(),
                size: 1 << 30,
            }],
            want_hashes: true,
            stream: "0123abcd".into(),
            link_timeout_ms: 5000,
        };
        let bytes = hello.encode();
        let (f, used) = parse(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(Hello::decode(&f).unwrap(), hello);
        assert!(parse(&bytes[..bytes.len() - 1]).unwrap().is_none());
        let a = ack(42);
        let (f, _) = parse(&a).unwrap().unwrap();
        assert_eq!(decode_ack(&f), Ok(42));
        assert!(matches!(
            Welcome::decode(&f),
            Err(WireError::Unexpected { .. })
        ));
    }

    #[test]
    fn a_welcome_names_the_stores_disks_and_an_older_one_does_not() {
        let welcome = Welcome {
            protocol: PROTOCOL,
            known: true,
            durable_seq: 7,
            stream: Some("s".into()),
            link_timeout_ms: 5000,
            store_disks: Some(vec!["m/254:0".into()]),
        };
        let bytes = welcome.encode();
        let (f, _) = parse(&bytes).unwrap().unwrap();
        assert_eq!(Welcome::decode(&f).unwrap(), welcome);
        // What a replicator from before the field sends.
        let old = json(
            FrameType::Welcome,
            &serde_json::json!({"protocol": PROTOCOL, "known": false, "durable_seq": 0,
                                "stream": null, "link_timeout_ms": 5000}),
        );
        let (f, _) = parse(&old).unwrap().unwrap();
        assert_eq!(Welcome::decode(&f).unwrap().store_disks, None);
    }

    #[test]
    fn hostile_hellos_are_refused() {
        let ok = Hello {
            protocol: PROTOCOL,
            group: "g".into(),
            volumes: vec![Volume {
                name: "root".into(),
                size: 1 << 20,
            }],
            want_hashes: false,
            stream: "s".into(),
            link_timeout_ms: 5000,
        };
        let decode = |h: &Hello| {
            let bytes = h.encode();
            let (f, _) = parse(&bytes).unwrap().unwrap();
            Hello::decode(&f)
        };
        assert!(decode(&ok).is_ok());
        let mut bad = ok.clone();
        bad.volumes[0].name = "../../../outside/precious".into();
        assert!(decode(&bad).is_err());
        let mut bad = ok.clone();
        bad.volumes.push(bad.volumes[0].clone());
        assert!(decode(&bad).unwrap_err().to_string().contains("twice"));
        let mut bad = ok.clone();
        bad.volumes[0].name = String::new();
        assert!(decode(&bad).is_err());
        let mut bad = ok.clone();
        bad.volumes[0].size = u64::MAX;
        assert!(decode(&bad).is_err());
        let mut bad = ok.clone();
        bad.group = "a/b".into();
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn a_frame_is_read_only_as_far_as_its_limit() {
        let big = frame(FrameType::Batch, &vec![7u8; 100_000]);
        let err = read_frame(&mut &big[..], MAX_HANDSHAKE_BODY).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        let (kind, body) = read_frame(&mut &big[..], MAX_BODY).unwrap();
        assert_eq!((kind, body.len()), (FrameType::Batch, 100_000));
        // A header that claims a large body, with none sent: an EOF, nothing allocated for it.
        let mut head = big[..FRAME_HEADER_LEN].to_vec();
        head[8..12].copy_from_slice(&(MAX_BODY).to_le_bytes());
        let err = read_frame(&mut &head[..], MAX_BODY).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn corruption_and_foreign_bytes_are_refused() {
        let mut a = ack(1);
        a[17] ^= 1;
        assert_eq!(parse(&a), Err(WireError::Checksum));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Err(WireError::Magic(_))
        ));
        let mut big = ack(1);
        big[8..12].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        assert_eq!(parse(&big), Err(WireError::TooLarge(MAX_BODY + 1)));
        let e = error("no such group");
        let (f, _) = parse(&e).unwrap().unwrap();
        let err = Welcome::decode(&f).unwrap_err().to_string();
        assert!(err.contains("no such group"), "{err}");
    }

    #[test]
    fn hashes_and_batches_round_trip() {
        let h = Hashes {
            disk: 3,
            first_chunk: 77,
            hashes: vec![1, u128::MAX, chunk_hash(b"abc")],
        };
        let bytes = h.encode();
        let (f, _) = parse(&bytes).unwrap().unwrap();
        assert_eq!(Hashes::decode(&f).unwrap(), h);

        let mut body = Vec::new();
        for seq in 1..=3u64 {
            body.extend(
                Encoded::data(Kind::Write, 0, seq * 512, &[seq as u8; 512], true).seal(seq, 0),
            );
        }
        let seqs: Vec<u64> = batch_records(&body)
            .map(|r| r.unwrap().header.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        let cut = &body[..body.len() - 5];
        let results: Vec<_> = batch_records(cut).collect();
        assert_eq!(results.len(), 3);
        assert!(results[2].is_err());
    }

    /// A batch frame has no crc of its own: every flipped bit of its body is caught by the
    /// checksum of the record it falls in (raw and compressed payloads alike).
    #[test]
    fn every_flipped_bit_of_a_batch_is_caught_by_its_records() {
        let mut body = Vec::new();
        body.extend(Encoded::data(Kind::Write, 0, 0, &[9u8; 300], true).seal(1, 5));
        body.extend(
            Encoded::data(
                Kind::Write,
                0,
                512,
                &(0..200u32)
                    .map(|i| (i * 7919 % 251) as u8)
                    .collect::<Vec<_>>(),
                false,
            )
            .seal(2, 6),
        );
        let f = frame(FrameType::Batch, &body);
        assert_eq!(f[12..16], [0; 4], "batch frames are not summed");
        let (frame, _) = parse(&f).unwrap().unwrap();
        assert_eq!(batch_records(frame.body).filter(Result::is_err).count(), 0);
        let mut summed = f.clone();
        summed[12] = 1;
        assert!(matches!(parse(&summed), Err(WireError::Malformed { .. })));
        for bit in 0..body.len() * 8 {
            let mut bad = body.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let caught = batch_records(&bad).any(|r| r.is_err());
            assert!(caught, "bit {bit} of the batch went unnoticed");
        }
    }
}
