//! The transmission loop over an in-memory pipe, against a backend that records its calls:
//! long payloads go through in pieces, in order, within the budget, with the spec's errors.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Mutex;

use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio::task::JoinHandle;

use super::*;
use crate::backend::Capabilities;
use tokio::io::AsyncWriteExt;

const MIB: usize = 1 << 20;
const SIZE: usize = 80 * MIB;
const EIO: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read(u64, usize),
    Write(u64, usize, bool),
}

/// A disk in memory. A call that touches `fail_at` fails with EIO; writes (only those at
/// `gated` when set) wait at `gate` while it has no permits; `hole` reads as zeroes and is
/// reported as one.
struct Mem {
    data: Mutex<Vec<u8>>,
    calls: Mutex<Vec<Call>>,
    fail_at: Option<u64>,
    gate: Semaphore,
    gated: Option<u64>,
    hole: Option<std::ops::Range<u64>>,
}

impl Mem {
    fn new() -> Mem {
        Mem {
            data: Mutex::new(pattern(SIZE, 1)),
            calls: Mutex::default(),
            fail_at: None,
            gate: Semaphore::new(Semaphore::MAX_PERMITS),
            gated: None,
            hole: None,
        }
    }
    /// Every call touching `at` fails.
    fn failing_at(at: usize) -> Arc<Mem> {
        Arc::new(Mem {
            fail_at: Some(at as u64),
            ..Mem::new()
        })
    }
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset as usize..offset as usize + len].to_vec()
    }
    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        match self.fail_at {
            Some(at) if (offset..offset + len as u64).contains(&at) => {
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            _ => Ok(()),
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 12) as u8 ^ seed)
        .collect()
}

impl BlockBackend for Mem {
    fn size_bytes(&self) -> u64 {
        SIZE as u64
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            cache: false,
            multi_conn: false,
            rotational: false,
        }
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Read(offset, buf.len()));
        self.check(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes(offset, buf.len()));
        Ok(())
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let _pass = match self.gated {
            Some(at) if at != offset => None,
            _ => Some(self.gate.acquire().await.unwrap()),
        };
        self.calls
            .lock()
            .unwrap()
            .push(Call::Write(offset, data.len(), fua));
        self.check(offset, data.len())?;
        let at = offset as usize;
        self.data.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: ZeroMode, _: bool) -> Result<(), ZeroError> {
        unreachable!("not offered")
    }
    async fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        unreachable!("not offered")
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn cache(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    async fn extents(
        &self,
        offset: u64,
        length: u64,
        _max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let end = offset + length;
        let hole = self.hole.clone().unwrap_or(end..end);
        let mut at = offset;
        for (to, zero) in [(hole.start, false), (hole.end, true), (end, false)] {
            let to = to.clamp(at, end);
            if to > at {
                out.push(Extent {
                    length: to - at,
                    hole: zero,
                    zero,
                });
                at = to;
            }
        }
        Ok(())
    }
}

/// A connection in transmission: the client's halves, the loop's task, and its stop switch.
struct Client {
    read: ReadHalf<DuplexStream>,
    write: WriteHalf<DuplexStream>,
    server: JoinHandle<io::Result<()>>,
    _stop: watch::Sender<bool>,
}

const PIPE_BYTES: usize = MIB;

fn connect(backend: &Arc<Mem>, structured: bool) -> Client {
    let (client, server) = tokio::io::duplex(PIPE_BYTES);
    let (server_read, server_write) = tokio::io::split(server);
    let (read, write) = tokio::io::split(client);
    let limits = Limits {
        size_bytes: SIZE as u64,
        flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA,
        structured_replies: structured,
        base_allocation: false,
    };
    let (stop, stopped) = watch::channel(false);
    let reader = BufReader::with_capacity(READ_BUFFER_BYTES, server_read);
    let server = tokio::spawn(transmit(
        reader,
        server_write,
        backend.clone(),
        limits,
        stopped,
    ));
    Client {
        read,
        write,
        server,
        _stop: stop,
    }
}

impl Client {
    async fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: usize) {
        let header = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length: length as u32,
        };
        self.write.write_all(&header.encode()).await.unwrap();
    }

    /// A simple reply's error and cookie.
    async fn simple(&mut self) -> (u32, u64) {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        self.read.read_exact(&mut b).await.unwrap();
        assert_eq!(&b[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            be32(&b[4..8]),
            u64::from_be_bytes(b[8..16].try_into().unwrap()),
        )
    }

    /// One structured chunk: (flags, type, cookie, payload).
    async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; STRUCTURED_HEADER_LEN];
        self.read.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let mut payload = vec![0u8; be32(&h[16..20]) as usize];
        self.read.read_exact(&mut payload).await.unwrap();
        let be16 = |at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        (be16(4), be16(6), cookie, payload)
    }

    /// A small read that must succeed with the backend's bytes: the stream is still in step.
    async fn still_serves(&mut self, backend: &Mem, structured: bool) {
        self.request(CMD_READ, 0, 99, 4096, 512).await;
        let mut data = vec![0u8; 512];
        if structured {
            let (flags, kind, cookie, payload) = self.chunk().await;
            assert_eq!(
                (flags, kind, cookie),
                (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 99)
            );
            data.copy_from_slice(&payload[8..]);
        } else {
            assert_eq!(self.simple().await, (0, 99));
            self.read.read_exact(&mut data).await.unwrap();
        }
        assert!(data == backend.bytes(4096, 512));
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// The writes the backend saw cover `offset..offset+len` in order, in pieces of at most
/// PIECE_BYTES, each with `fua`.
fn assert_pieces(calls: &[Call], offset: u64, len: usize, fua: bool) {
    let mut at = offset;
    for call in calls {
        let Call::Write(o, n, f) = *call else {
            panic!("unexpected {call:?}");
        };
        assert_eq!((o, f), (at, fua), "{calls:?}");
        assert!(n <= PIECE_BYTES, "a piece of {n} bytes");
        at += n as u64;
    }
    assert_eq!(at, offset + len as u64, "{calls:?}");
}

#[tokio::test]
async fn a_long_write_is_applied_in_pieces_in_order_each_with_fua() {
    let backend = Arc::new(Mem::new());
    let mut c = connect(&backend, false);
    let (offset, len) = (4097, 2 * PIECE_BYTES + 12345);
    let data = pattern(len, 7);
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, offset, len).await;
    c.write.write_all(&data).await.unwrap();
    assert_eq!(c.simple().await, (0, 1));
    let calls = backend.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_pieces(&calls, offset, len, true);
    assert!(backend.bytes(offset, len) == data);
    c.still_serves(&backend, false).await;
}

#[tokio::test]
async fn the_maximum_payload_is_written_and_read_back() {
    let backend = Arc::new(Mem::new());
    let mut c = connect(&backend, false);
    let len = MAX_PAYLOAD_BYTES as usize;
    let data = pattern(len, 3);
    c.request(CMD_WRITE, 0, 1, 0, len).await;
    c.write.write_all(&data).await.unwrap();
    assert_eq!(c.simple().await, (0, 1));
    assert_pieces(&backend.calls(), 0, len, false);
    c.request(CMD_READ, 0, 2, 0, len).await;
    assert_eq!(c.simple().await, (0, 2));
    let mut back = vec![0u8; len];
    c.read.read_exact(&mut back).await.unwrap();
    assert!(back == data);
    // One byte more is refused (and its payload skipped), and the connection goes on.
    c.request(CMD_READ, 0, 3, 0, len + 1).await;
    assert_eq!(c.simple().await, (22, 3));
    c.still_serves(&backend, false).await;
}

#[tokio::test]
async fn a_failed_piece_fails_the_write_and_later_pieces_are_not_applied() {
    let backend = Mem::failing_at(PIECE_BYTES + 10);
    let before = backend.bytes(0, SIZE);
    let mut c = connect(&backend, false);
    let len = 3 * PIECE_BYTES;
    c.request(CMD_WRITE, 0, 1, 0, len).await;
    c.write.write_all(&pattern(len, 9)).await.unwrap();
    assert_eq!(c.simple().await, (EIO, 1));
    assert_eq!(
        backend.calls(),
        [
            Call::Write(0, PIECE_BYTES, false),
            Call::Write(PIECE_BYTES as u64, PIECE_BYTES, false)
        ]
    );
    assert!(
        backend.bytes(2 * PIECE_BYTES as u64, SIZE - 2 * PIECE_BYTES) == before[2 * PIECE_BYTES..],
        "nothing after the failed piece was written"
    );
    c.still_serves(&backend, false).await;
}

#[tokio::test]
async fn a_long_simple_read_is_its_header_then_the_data_read_in_pieces() {
    let backend = Arc::new(Mem::new());
    let mut c = connect(&backend, false);
    let (offset, len) = (512, 2 * PIECE_BYTES + 100);
    c.request(CMD_READ, 0, 5, offset, len).await;
    assert_eq!(c.simple().await, (0, 5));
    let mut data = vec![0u8; len];
    c.read.read_exact(&mut data).await.unwrap();
    assert!(data == backend.bytes(offset, len));
    let pieces = [PIECE_BYTES, PIECE_BYTES, 100];
    let mut at = offset;
    let expected: Vec<Call> = pieces
        .iter()
        .map(|&n| {
            at += n as u64;
            Call::Read(at - n as u64, n)
        })
        .collect();
    assert_eq!(backend.calls(), expected);
    c.still_serves(&backend, false).await;
}

/// Reads structured chunks of `cookie` until DONE; returns the reassembled bytes (holes as
/// zeroes), the chunk types in order, and the error chunk's errno if one came.
async fn structured_read(
    c: &mut Client,
    cookie: u64,
    offset: u64,
    len: usize,
) -> (Vec<u8>, Vec<u16>, Option<u32>) {
    let mut out = vec![0xeeu8; len];
    let mut kinds = Vec::new();
    loop {
        let (flags, kind, got, payload) = c.chunk().await;
        assert_eq!(got, cookie);
        kinds.push(kind);
        let at = |p: &[u8]| (u64::from_be_bytes(p[..8].try_into().unwrap()) - offset) as usize;
        match kind {
            REPLY_TYPE_OFFSET_DATA => {
                let from = at(&payload);
                out[from..from + payload.len() - 8].copy_from_slice(&payload[8..]);
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let from = at(&payload);
                out[from..from + be32(&payload[8..]) as usize].fill(0);
            }
            REPLY_TYPE_ERROR => {
                assert_ne!(flags & REPLY_FLAG_DONE, 0, "an error ends this reply");
                return (out, kinds, Some(be32(&payload)));
            }
            REPLY_TYPE_NONE => {}
            other => panic!("chunk type {other}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            return (out, kinds, None);
        }
    }
}

#[tokio::test]
async fn a_long_structured_read_is_several_data_chunks_the_last_done() {
    let backend = Arc::new(Mem::new());
    let mut c = connect(&backend, true);
    let (offset, len) = (8192, 3 * PIECE_BYTES);
    c.request(CMD_READ, 0, 6, offset, len).await;
    let (data, kinds, error) = structured_read(&mut c, 6, offset, len).await;
    assert_eq!(error, None);
    assert_eq!(kinds, [REPLY_TYPE_OFFSET_DATA; 3]);
    assert!(data == backend.bytes(offset, len));
    c.still_serves(&backend, true).await;
}

#[tokio::test]
async fn a_long_structured_read_sends_its_hole_once_and_ends_with_none() {
    let hole = (3 * MIB as u64)..(7 * MIB as u64);
    let backend = Arc::new(Mem {
        hole: Some(hole.clone()),
        ..Mem::new()
    });
    backend.data.lock().unwrap()[hole.start as usize..hole.end as usize].fill(0);
    let mut c = connect(&backend, true);
    let len = 10 * MIB;
    c.request(CMD_READ, 0, 7, 0, len).await;
    let (data, kinds, error) = structured_read(&mut c, 7, 0, len).await;
    assert_eq!(error, None);
    assert!(data == backend.bytes(0, len));
    use crate::proto::{REPLY_TYPE_NONE as N, REPLY_TYPE_OFFSET_DATA as D};
    // Part 0: data 0..3M, hole 3M..4M; part 1: hole 4M..7M, data 7M..8M; part 2: data, NONE.
    assert_eq!(
        kinds,
        [D, REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_OFFSET_HOLE, D, D, N]
    );
    assert!(
        backend
            .calls()
            .iter()
            .all(|c| matches!(*c, Call::Read(o, n) if o + n as u64 <= hole.start || o >= hole.end)),
        "the hole was never read: {:?}",
        backend.calls()
    );
}

#[tokio::test]
async fn a_structured_read_failing_midway_ends_with_an_error_chunk() {
    let backend = Mem::failing_at(PIECE_BYTES + 1);
    let mut c = connect(&backend, true);
    let len = 3 * PIECE_BYTES;
    c.request(CMD_READ, 0, 8, 0, len).await;
    let (data, kinds, error) = structured_read(&mut c, 8, 0, len).await;
    assert_eq!(kinds, [REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_ERROR]);
    assert_eq!(error, Some(EIO));
    assert!(data[..PIECE_BYTES] == backend.bytes(0, PIECE_BYTES));
    c.still_serves(&backend, true).await;
}

#[tokio::test]
async fn a_simple_read_failing_after_its_header_closes_the_connection() {
    let backend = Mem::failing_at(PIECE_BYTES + 1);
    let mut c = connect(&backend, false);
    let len = 3 * PIECE_BYTES;
    c.request(CMD_READ, 0, 9, 0, len).await;
    assert_eq!(c.simple().await, (0, 9));
    let mut got = Vec::new();
    c.read.read_to_end(&mut got).await.unwrap();
    assert!(
        got == backend.bytes(0, PIECE_BYTES),
        "the first piece, then the hard disconnect ({} bytes came)",
        got.len()
    );
    assert!(c.server.await.unwrap().is_err());
    // A failure before the header went out is an ordinary error reply.
    let mut c = connect(&backend, false);
    c.request(CMD_READ, 0, 10, PIECE_BYTES as u64, len).await;
    assert_eq!(c.simple().await, (EIO, 10));
    c.still_serves(&backend, false).await;
}

/// Waits until every task is blocked (time is paused, so the sleep ends only then).
async fn settle() {
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
}

#[tokio::test(start_paused = true)]
async fn a_long_write_is_read_from_the_socket_only_as_the_budget_allows() {
    let backend = Arc::new(Mem {
        gate: Semaphore::new(0),
        ..Mem::new()
    });
    let Client {
        mut read,
        mut write,
        _stop,
        ..
    } = connect(&backend, false);
    let len = MAX_PAYLOAD_BYTES as usize;
    let data = pattern(len, 5);
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sender = {
        let (sent, data) = (sent.clone(), data.clone());
        tokio::spawn(async move {
            let header = RequestHeader {
                flags: 0,
                kind: CMD_WRITE,
                cookie: 1,
                offset: 0,
                length: len as u32,
            };
            write.write_all(&header.encode()).await.unwrap();
            for piece in data.chunks(64 * 1024) {
                write.write_all(piece).await.unwrap();
                sent.fetch_add(piece.len(), std::sync::atomic::Ordering::SeqCst);
            }
            write
        })
    };
    // The backend holds the first piece: the server reads what its budget allows, then waits.
    settle().await;
    let held = sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        held > PIECE_BYTES && held <= IN_FLIGHT_BUDGET_BYTES + READ_BUFFER_BYTES + PIPE_BYTES,
        "{held} bytes of a {len}-byte write taken while the backend was stuck"
    );
    assert!(backend.calls().is_empty());
    backend.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    let _write = sender.await.unwrap();
    let mut reply = [0u8; SIMPLE_REPLY_LEN];
    read.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[4..8], &[0; 4]);
    assert_pieces(&backend.calls(), 0, len, false);
    assert!(backend.bytes(0, len) == data);
}

#[tokio::test(start_paused = true)]
async fn a_long_read_holds_two_pieces_while_the_client_reads_nothing() {
    let backend = Arc::new(Mem::new());
    let mut c = connect(&backend, false);
    let len = MAX_PAYLOAD_BYTES as usize;
    c.request(CMD_READ, 0, 1, 0, len).await;
    settle().await;
    // One piece is on its way (stuck in the pipe), the next one read; no more.
    assert_eq!(backend.calls().len(), 2, "{:?}", backend.calls());
    assert_eq!(c.simple().await, (0, 1));
    let mut data = vec![0u8; len];
    c.read.read_exact(&mut data).await.unwrap();
    assert!(data == backend.bytes(0, len));
    assert_eq!(backend.calls().len(), len / PIECE_BYTES);
}

#[tokio::test]
async fn a_long_write_cut_short_is_not_acknowledged() {
    let backend = Arc::new(Mem::new());
    let mut c = connect(&backend, false);
    c.request(CMD_WRITE, 0, 1, 0, 3 * PIECE_BYTES).await;
    c.write
        .write_all(&pattern(PIECE_BYTES + 5, 2))
        .await
        .unwrap();
    c.write.shutdown().await.unwrap();
    assert_eq!(c.simple().await, (EIO, 1));
    let mut rest = Vec::new();
    c.read.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert!(
        c.server.await.unwrap().is_err(),
        "the payload was truncated"
    );
    assert_eq!(backend.calls(), [Call::Write(0, PIECE_BYTES, false)]);
}

/// WRITEs without FUA share one task per connection ([`run_writes`]): one that waits must not
/// hold up the next write, nor any other request.
#[tokio::test(start_paused = true)]
async fn a_write_that_waits_holds_up_no_other_request_of_its_connection() {
    let backend = Arc::new(Mem {
        gate: Semaphore::new(0),
        gated: Some(0),
        ..Mem::new()
    });
    let mut c = connect(&backend, false);
    for (cookie, offset, flags) in [(1, 0, 0), (2, 8192, 0), (3, 16384, CMD_FLAG_FUA)] {
        c.request(CMD_WRITE, flags, cookie, offset, 4096).await;
        c.write
            .write_all(&pattern(4096, cookie as u8))
            .await
            .unwrap();
    }
    // The clock is paused: the timeout fires as soon as nothing can run any more.
    let both = async { vec![c.simple().await, c.simple().await] };
    let mut answered = tokio::time::timeout(std::time::Duration::from_secs(60), both)
        .await
        .expect("the writes after the waiting one were held up");
    answered.sort_unstable();
    assert_eq!(answered, [(0, 2), (0, 3)]);
    c.still_serves(&backend, false).await;
    backend.gate.add_permits(1);
    assert_eq!(c.simple().await, (0, 1));
    for (cookie, offset) in [(1, 0), (2, 8192), (3, 16384)] {
        assert!(backend.bytes(offset, 4096) == pattern(4096, cookie as u8));
    }
}
