//! One client connection: the handshake's I/O (with STARTTLS, the TLS handshake on the same
//! socket, and option haggling going on inside TLS), then the transmission phase over the
//! plain or the TLS stream.
//!
//! In transmission a reader loop parses requests and hands each to a task: WRITEs without FUA
//! to one task per connection that carries them out concurrently ([`run_writes`]), the others
//! to a task of their own. They hand their replies to a writer task, which sends whatever is
//! ready in one vectored write. So replies leave in completion order, many requests are in
//! flight, and a payload is never copied on its way out. A byte budget bounds the memory of requests in flight.
//! Payloads longer than [`PIECE_BYTES`] stream through in pieces of that size: a WRITE is read
//! and applied piece by piece, a READ read and sent piece by piece.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, warn};

use crate::backend::{BlockBackend, Extent, ZeroError, ZeroMode};
use crate::buffer::Buffer;
use crate::handshake::{self, Agreement, Negotiation, TlsOffer};
use crate::proto::*;
use crate::reply::{self, StatusExtent};
use crate::request::{self, Command, Limits, RequestHeader};
use crate::server::Export;
use crate::tls::Tls;
use negotiate::{greet, note_plaintext_refusal, options, unless_stopped, Haggled};
use replies::{write_replies, Piece, Reply};

/// Payloads longer than this stream in pieces of this size (each a backend call of its own).
const PIECE_BYTES: usize = 4 << 20;
/// Bytes of request and reply payloads one connection may hold at once (independent of
/// MAX_PAYLOAD_BYTES: a long request holds a few pieces at a time, not its length).
const IN_FLIGHT_BUDGET_BYTES: usize = (32 << 20) + (1 << 20);
/// Budget a long READ holds: one piece on its way out, the next being read.
const LONG_READ_BYTES: usize = 2 * PIECE_BYTES;
/// Every request also costs this much of the budget, which bounds the request count.
const REQUEST_COST_BYTES: usize = 4096;
/// Reads at least this long, without DF, are answered with holes as OFFSET_HOLE chunks.
const HOLE_SCAN_MIN_BYTES: u32 = 64 * 1024;
/// At most this many extents per BLOCK_STATUS reply or per split read.
const MAX_EXTENTS: usize = 1024;
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// A stream that splits into independently owned halves (a socket: no lock between reader and
/// writer; a TLS stream shares one session between them).
pub trait SplitStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn split(self) -> (Self::Read, Self::Write);
}

impl SplitStream for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl SplitStream for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl<S: SplitStream> SplitStream for tokio_rustls::server::TlsStream<S> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// Serves one connection until the client disconnects, breaks the protocol, or `shutdown`
/// turns true (then requests already read are finished and answered, and the socket closes).
/// With `tls`, the client may (or, required, must) start TLS before anything is served.
pub async fn serve<S: SplitStream, B: BlockBackend>(
    mut stream: S,
    exports: Arc<[Export<B>]>,
    tls: Option<Arc<Tls>>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let infos: Vec<handshake::ExportInfo> = exports.iter().map(|e| e.info.clone()).collect();
    let offer = tls.as_ref().map_or(TlsOffer::None, |t| t.offer());
    let Some(mut negotiation) = unless_stopped(&mut shutdown, greet(&mut stream, offer)).await?
    else {
        return Ok(());
    };
    let haggled = options(&mut stream, &mut negotiation, &infos);
    let agreement = match unless_stopped(&mut shutdown, haggled).await? {
        None | Some(Haggled::Closed) => {
            note_plaintext_refusal(&negotiation);
            return Ok(());
        }
        Some(Haggled::Agreed(agreement)) => agreement,
        Some(Haggled::StartTls) => {
            // The negotiation acknowledges STARTTLS only where TLS is offered.
            let tls = tls.ok_or_else(|| io::Error::other("STARTTLS acknowledged without TLS"))?;
            let accepted = match unless_stopped(&mut shutdown, tls.accept(stream)).await {
                Ok(Some(stream)) => stream,
                Ok(None) => return Ok(()),
                Err(e) => {
                    // The client is refused, the server goes on: its operator must hear why.
                    warn!("TLS handshake failed: {}", tls::describe(&e));
                    return Ok(());
                }
            };
            negotiation.tls_started();
            return serve_tls(accepted, exports, &infos, negotiation, shutdown).await;
        }
    };
    transmission(stream, &exports, agreement, shutdown).await
}

/// The rest of a connection once TLS runs: option haggling inside TLS, then transmission.
async fn serve_tls<S: SplitStream, B: BlockBackend>(
    mut stream: tokio_rustls::server::TlsStream<S>,
    exports: Arc<[Export<B>]>,
    infos: &[handshake::ExportInfo],
    mut negotiation: Negotiation,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let haggled = options(&mut stream, &mut negotiation, infos);
    match unless_stopped(&mut shutdown, haggled).await? {
        None | Some(Haggled::Closed) => Ok(()),
        Some(Haggled::Agreed(agreement)) => {
            transmission(stream, &exports, agreement, shutdown).await
        }
        Some(Haggled::StartTls) => Err(io::Error::other("STARTTLS acknowledged inside TLS")),
    }
}

/// Splits the negotiated stream and runs the transmission phase on the agreed export.
async fn transmission<S: SplitStream, B: BlockBackend>(
    stream: S,
    exports: &[Export<B>],
    agreement: Agreement,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let (read, write) = stream.split();
    let reader = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    let export = &exports[agreement.export_index];
    debug!(export = %export.info.name, structured = agreement.structured_replies, "transmission");
    let limits = Limits {
        size_bytes: export.info.size_bytes,
        flags: agreement.flags,
        structured_replies: agreement.structured_replies,
        base_allocation: agreement.base_allocation,
    };
    transmit(reader, write, export.backend.clone(), limits, shutdown).await
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// A WRITE's payload: read whole before the task starts, or (a long one) piece by piece while
/// it runs, each piece holding its bytes of the budget until it is applied.
enum Payload {
    Whole(Buffer),
    Pieces(mpsc::UnboundedReceiver<(Buffer, OwnedSemaphorePermit)>),
}

async fn transmit<R, W, B>(
    mut reader: BufReader<R>,
    write: W,
    backend: Arc<B>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    B: BlockBackend,
{
    let (replies, queue) = mpsc::unbounded_channel::<Reply>();
    let executing = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_replies(write, queue, executing.clone()));
    let (writes, pending) = mpsc::unbounded_channel::<Job>();
    let writing = tokio::spawn(run_writes(pending));
    let budget = Arc::new(Semaphore::new(IN_FLIGHT_BUDGET_BYTES));
    let structured = limits.structured_replies;
    let result = loop {
        let mut bytes = [0u8; REQUEST_HEADER_LEN];
        let read = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break Ok(()),
            _ = replies.closed() => break Ok(()),
            read = reader.read_exact(&mut bytes) => read,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let header = match RequestHeader::parse(&bytes) {
            Ok(h) => h,
            Err(e) => {
                warn!("closing connection: {e}");
                break Ok(());
            }
        };
        let command = match request::validate(&header, &limits) {
            Ok(command) => command,
            Err(e) => {
                debug!(cookie = header.cookie, "refused request: {e}");
                if let Err(e) = discard(&mut reader, u64::from(header.payload_len())).await {
                    break Err(e);
                }
                // An error reply holds memory until it is on the wire, like any other: a
                // client that sends garbage and reads nothing stops being read from.
                let Ok(permit) = budget
                    .clone()
                    .acquire_many_owned(REQUEST_COST_BYTES as u32)
                    .await
                else {
                    break Ok(());
                };
                let mut reply = Reply::error(header.cookie, structured, e.errno(), &e.to_string());
                reply.budget = Some(permit);
                let _ = replies.send(reply);
                continue;
            }
        };
        if command == Command::Disconnect {
            break Ok(());
        }
        let cost = REQUEST_COST_BYTES + buffer_len(&command);
        let permit = match budget.clone().acquire_many_owned(cost as u32).await {
            Ok(permit) => permit,
            Err(_) => break Ok(()),
        };
        let (payload, pieces) = match command {
            Command::Write { length, .. } if length as usize > PIECE_BYTES => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Payload::Pieces(rx), Some((tx, length)))
            }
            Command::Write { length, .. } => {
                let mut data = Buffer::take(length as usize);
                if let Err(e) = reader.read_exact(&mut data).await {
                    break Err(e);
                }
                (Payload::Whole(data), None)
            }
            _ => (Payload::Whole(Buffer::default()), None),
        };
        let backend = backend.clone();
        let replies = replies.clone();
        let executing = executing.clone();
        executing.fetch_add(1, Ordering::AcqRel);
        let inline = matches!(command, Command::Write { fua: false, .. }) && pieces.is_none();
        let task = async move {
            let mut reply = execute(&backend, command, header.cookie, payload, structured).await;
            reply.budget = Some(permit);
            // Before the send: the writer that takes this reply counts only the others.
            executing.fetch_sub(1, Ordering::AcqRel);
            let _ = replies.send(reply);
        };
        if inline {
            // Only gone if a write panicked: the rest still get a task each.
            if let Err(lost) = writes.send(Box::pin(task)) {
                tokio::spawn(lost.0);
            }
        } else {
            tokio::spawn(task);
        }
        if let Some((tx, length)) = pieces {
            // After the spawn: each piece is applied while the next one arrives.
            if let Err(e) = read_pieces(&mut reader, &budget, length, tx).await {
                break Err(e);
            }
        }
    };
    // Requests already read finish and are answered before the socket closes.
    drop(writes);
    let _ = writing.await;
    drop(replies);
    let written = writer.await.map_err(io::Error::other)?;
    result.and(written)
}

/// A request carried out by [`run_writes`].
type Job = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Carries out a connection's WRITEs (without FUA) concurrently within one task. Such a write
/// only copies into the page cache (and, in the proxy, hands its buffer to the change log): a
/// task of its own per write made the runtime wake an idle worker for most of them, and two
/// workers, the client and the proxy's shipper woke each other instead of working (4k random
/// writes at QD32 on one connection, with replication: 1.4x-1.7x the IOPS this way, measured
/// in BENCHMARKS.md). Requests that may wait on the device (reads, flushes, FUA) keep a task
/// each, so one that blocks its thread does not hold up the others.
async fn run_writes(mut pending: mpsc::UnboundedReceiver<Job>) {
    use futures::StreamExt;
    let mut running = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            job = pending.recv() => match job {
                Some(job) => running.push(job),
                None => break,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
    while running.next().await.is_some() {}
}

/// Bytes of budget a command holds from its start until its reply is on the wire.
fn buffer_len(command: &Command) -> usize {
    match *command {
        Command::Read { length, .. } if length as usize > PIECE_BYTES => LONG_READ_BYTES,
        // Each piece holds its own share, from when it is read until it is applied.
        Command::Write { length, .. } if length as usize > PIECE_BYTES => 0,
        Command::Read { length, .. } | Command::Write { length, .. } => length as usize,
        _ => 0,
    }
}

/// Reads a long WRITE's payload piece by piece for the task applying it; each piece waits for
/// its bytes of the budget first, so a connection never holds more than the budget.
async fn read_pieces<R: AsyncRead + Unpin>(
    reader: &mut R,
    budget: &Arc<Semaphore>,
    length: u32,
    pieces: mpsc::UnboundedSender<(Buffer, OwnedSemaphorePermit)>,
) -> io::Result<()> {
    let mut left = length as usize;
    while left > 0 {
        let len = left.min(PIECE_BYTES);
        let permit = budget
            .clone()
            .acquire_many_owned(len as u32)
            .await
            .map_err(io::Error::other)?;
        let mut data = Buffer::take(len);
        reader.read_exact(&mut data).await?;
        // The task only goes away by panicking; the payload is still read to its end.
        let _ = pieces.send((data, permit));
        left -= len;
    }
    Ok(())
}

/// Carries out one validated command and builds its reply.
async fn execute<B: BlockBackend>(
    backend: &Arc<B>,
    command: Command,
    cookie: u64,
    payload: Payload,
    structured: bool,
) -> Reply {
    let done = |result: io::Result<()>, what: &str| match result {
        Ok(()) => Reply::header(reply::simple(cookie, None)),
        Err(e) => io_failure(cookie, structured, what, &e),
    };
    if command.length() == Some(0) {
        // The spec leaves zero-length requests to the server (it should not disconnect): they
        // succeed and change nothing; no backend sees them.
        return match (command, structured) {
            (Command::Read { .. }, true) => Reply::header(reply::done(cookie)),
            _ => Reply::header(reply::simple(cookie, None)),
        };
    }
    match command {
        Command::Read { offset, length, df } => {
            read(
                backend,
                cookie,
                offset,
                length,
                structured && !df,
                structured,
            )
            .await
        }
        Command::Write {
            offset,
            length,
            fua,
        } => match payload {
            Payload::Whole(data) => done(backend.write_owned(offset, data, fua).await, "write"),
            Payload::Pieces(pieces) => {
                match write_pieces(&**backend, offset, length, fua, pieces).await {
                    Some(result) => done(result, "write"),
                    // The connection broke inside the payload: no one reads this reply, but
                    // the write must not look done.
                    None => Reply::error(cookie, structured, Errno::Io, "the payload ended early"),
                }
            }
        },
        Command::Flush => done(backend.flush().await, "flush"),
        Command::Trim {
            offset,
            length,
            fua,
        } => done(backend.trim(offset, u64::from(length), fua).await, "trim"),
        Command::Cache { offset, length } => {
            done(backend.cache(offset, u64::from(length)).await, "cache")
        }
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast,
        } => {
            let mode = ZeroMode {
                no_hole,
                fast_only: fast,
            };
            match backend
                .write_zeroes(offset, u64::from(length), mode, fua)
                .await
            {
                Err(ZeroError::NotFast) => Reply::error(
                    cookie,
                    structured,
                    Errno::NotSup,
                    "zeroing would not be fast",
                ),
                Err(ZeroError::Io(e)) => io_failure(cookie, structured, "write zeroes", &e),
                Ok(()) => Reply::header(reply::simple(cookie, None)),
            }
        }
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => {
            let mut extents = Vec::new();
            let max = if req_one { 1 } else { MAX_EXTENTS };
            match backend
                .extents(offset, u64::from(length), max, &mut extents)
                .await
            {
                Ok(()) => Reply::bytes(reply::block_status(
                    cookie,
                    META_BASE_ALLOCATION_ID,
                    &status_extents(&extents, length),
                )),
                Err(e) => io_failure(cookie, structured, "block status", &e),
            }
        }
        Command::Disconnect => unreachable!("handled by the reader"),
    }
}

fn io_failure(cookie: u64, structured: bool, what: &str, e: &io::Error) -> Reply {
    error!(cookie, "{what} failed: {e}");
    Reply::error(
        cookie,
        structured,
        Errno::from_io(e),
        &format!("{what} failed: {e}"),
    )
}

/// Backend extents as `base:allocation` extents, cut to the requested length.
fn status_extents(extents: &[Extent], length: u32) -> Vec<StatusExtent> {
    let mut left = u64::from(length);
    let mut out = Vec::with_capacity(extents.len());
    for e in extents {
        if left == 0 {
            break;
        }
        let len = e.length.min(left);
        left -= len;
        let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        match out.last_mut() {
            Some(StatusExtent { length, flags: f }) if *f == flags => *length += len as u32,
            _ => out.push(StatusExtent {
                length: len as u32,
                flags,
            }),
        }
    }
    out
}

/// Applies a long WRITE's pieces in order as they arrive, each with the command's FUA (so all
/// of it is durable before the reply). After a failed piece the rest is still taken from the
/// reader but not applied, and the command fails (NBD allows a failed write to be partly done).
/// `None` when the payload ended early (the connection broke).
async fn write_pieces<B: BlockBackend>(
    backend: &B,
    offset: u64,
    length: u32,
    fua: bool,
    mut pieces: mpsc::UnboundedReceiver<(Buffer, OwnedSemaphorePermit)>,
) -> Option<io::Result<()>> {
    let mut at = offset;
    let mut result = Ok(());
    while let Some((data, _budget)) = pieces.recv().await {
        let len = data.len() as u64;
        if result.is_ok() {
            result = backend.write_owned(at, data, fua).await;
        }
        at += len;
    }
    (at == offset + u64::from(length)).then_some(result)
}

/// A READ: one data chunk (or a simple reply), or, when `split` allows, data and hole chunks.
/// A read longer than a piece is sent in parts of at most [`PIECE_BYTES`] of data, each read
/// (by a task of its own) while the part before it is on the wire.
async fn read<B: BlockBackend>(
    backend: &Arc<B>,
    cookie: u64,
    offset: u64,
    length: u32,
    split: bool,
    structured: bool,
) -> Reply {
    let plan = match ReadPlan::new(&**backend, cookie, offset, length, split, structured).await {
        Ok(plan) => plan,
        Err(e) => return io_failure(cookie, structured, "read", &e),
    };
    let mut first = match plan.part(&**backend, 0).await {
        Ok(part) => part,
        Err(e) => return io_failure(cookie, structured, "read", &e),
    };
    if plan.parts() > 1 {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(read_rest(backend.clone(), plan, tx));
        first.more = Some(rx);
    }
    first
}

/// Reads and hands over parts 1.. of a long READ. A slot is reserved before a part is read,
/// so at most two parts exist at once: one being written, one being read.
async fn read_rest<B: BlockBackend>(
    backend: Arc<B>,
    plan: ReadPlan,
    parts: mpsc::Sender<io::Result<Reply>>,
) {
    for index in 1..plan.parts() {
        let Ok(slot) = parts.reserve().await else {
            return; // The writer is gone with the connection.
        };
        match plan.part(&*backend, index).await {
            Ok(part) => slot.send(Ok(part)),
            Err(e) if plan.structured => {
                slot.send(Ok(io_failure(plan.cookie, true, "read", &e)));
                return;
            }
            Err(e) => {
                error!(
                    cookie = plan.cookie,
                    "read failed: {e}; its simple reply had begun, so the connection closes"
                );
                slot.send(Err(e));
                return;
            }
        }
    }
}

/// What a READ's reply is made of: runs of data (and, when holes are sent as OFFSET_HOLE
/// chunks, of zeroes), cut into parts of at most [`PIECE_BYTES`] bytes of the read.
struct ReadPlan {
    cookie: u64,
    offset: u64,
    length: usize,
    structured: bool,
    /// (start within the read, length, reads as zeroes), in order, covering the read; empty
    /// when there are no holes (one run of data, without an allocation per read).
    runs: Vec<(usize, usize, bool)>,
    /// Some run is a hole: chunks then end with a NONE chunk rather than DONE on the data.
    holes: bool,
}

impl ReadPlan {
    async fn new<B: BlockBackend>(
        backend: &B,
        cookie: u64,
        offset: u64,
        length: u32,
        split: bool,
        structured: bool,
    ) -> io::Result<ReadPlan> {
        let length = length as usize;
        let mut extents = Vec::new();
        if split && length >= HOLE_SCAN_MIN_BYTES as usize {
            backend
                .extents(offset, length as u64, MAX_EXTENTS, &mut extents)
                .await?;
        }
        let holes = extents.iter().any(|e| e.zero);
        let mut runs = Vec::new();
        if holes {
            let mut at = 0;
            for e in &extents {
                let len = (e.length as usize).min(length - at);
                if len == 0 {
                    break;
                }
                runs.push((at, len, e.zero));
                at += len;
            }
            // Whatever the extents left out (at most MAX_EXTENTS were asked for) is data.
            if at < length {
                runs.push((at, length - at, false));
            }
        }
        Ok(ReadPlan {
            cookie,
            offset,
            length,
            structured,
            runs,
            holes,
        })
    }

    fn parts(&self) -> usize {
        self.length.div_ceil(PIECE_BYTES)
    }

    /// Part `index`: its data read into one buffer, with the headers that announce it.
    async fn part<B: BlockBackend>(&self, backend: &B, index: usize) -> io::Result<Reply> {
        let cookie = self.cookie;
        let start = index * PIECE_BYTES;
        let end = (start + PIECE_BYTES).min(self.length);
        let mut data = Buffer::take(end - start);
        let mut pieces = Vec::with_capacity(2);
        if !self.structured && index == 0 {
            pieces.push(Piece::Header(reply::simple(cookie, None)));
        }
        let whole = [(0, self.length, false)];
        let runs = if self.holes {
            &self.runs[..]
        } else {
            &whole[..]
        };
        for &(run, len, zero) in runs {
            let (from, to) = (run.max(start), (run + len).min(end));
            if from >= to {
                continue;
            }
            let at = self.offset + from as u64;
            let len = (to - from) as u32;
            if zero {
                pieces.push(Piece::Header(reply::offset_hole(cookie, false, at, len)));
                continue;
            }
            let range = from - start..to - start;
            backend.read(at, &mut data[range.clone()]).await?;
            if self.structured {
                let last = to == self.length && !self.holes;
                pieces.push(Piece::Header(reply::offset_data(cookie, last, at, len)));
            }
            pieces.push(Piece::Data(range));
        }
        if self.structured && self.holes && end == self.length {
            pieces.push(Piece::Header(reply::done(cookie)));
        }
        Ok(Reply {
            pieces,
            data,
            budget: None,
            more: None,
        })
    }
}

mod negotiate;
mod replies;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
