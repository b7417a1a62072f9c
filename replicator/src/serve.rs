//! `replicator serve`: one thread per proxy connection, at most `--max-connections` of them.
//!
//! A connection first has `--handshake-timeout` to send a Hello of at most
//! [`wire::MAX_HANDSHAKE_BODY`] bytes. A Hello is checked (protocol, names, volumes against the
//! stored group) before it is accepted; only an accepted session replaces the group's previous
//! one, and a group's records come from one session at a time (the group's lock). Then a reader
//! thread hands batches to the writer loop, which appends them, commits (fsync, then the
//! durable checkpoint) whenever no more input is waiting (group commit), and acknowledges the
//! durable seq. Either side silent for `--link-timeout` is gone; every write has that deadline.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use journal::store::{self, GroupDir};
use journal::wire::{self, FrameType, Hello, Welcome};
use serde::Serialize;
use tracing::{debug, error, info, warn};

use crate::group::{Group, IngestError};
use crate::metrics::{GroupRates, GroupStats};
use crate::retention::{self, Retention};

#[derive(Debug, Clone)]
pub struct Options {
    pub store: PathBuf,
    pub segment_size: u64,
    /// Seal a segment once its first record is this old.
    pub seal_after: Option<Duration>,
    pub retention: Retention,
    /// A proxy silent this long (no batch, no keepalive) is gone.
    pub link_timeout: Duration,
    /// Time a new connection has to send its Hello.
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// Mutual TLS on every connection (None: plain TCP, --insecure).
    pub tls: Option<Arc<tls::rustls::ServerConfig>>,
    /// `--allow GROUP=NAME`: certificates named NAME may feed GROUP too.
    pub allow: Vec<(String, String)>,
}

/// The connection that currently feeds a group.
#[derive(Debug)]
struct Session {
    id: u64,
    stream: Link,
}

/// A group known to this server: its store (when open) and its current session.
#[derive(Debug, Default)]
struct Slot {
    group: Mutex<Option<Group>>,
    session: Mutex<Option<Session>>,
    retention_started: Mutex<bool>,
    /// Counters for status rates and `--metrics` (read without the group's lock).
    stats: GroupStats,
}

type Slots = Arc<Mutex<HashMap<String, Arc<Slot>>>>;

/// Batches queued between a session's reader and its writer (each at most [`wire::MAX_BODY`]).
const QUEUED_BATCHES: usize = 2;

pub fn serve(
    listener: TcpListener,
    opts: Options,
    metrics: Option<TcpListener>,
) -> anyhow::Result<()> {
    let slots: Slots = Arc::default();
    // Every stored group is reported from the start, at its durable checkpoint.
    for dir in store::list_groups(&opts.store).unwrap_or_default() {
        if let Ok(meta) = dir.meta() {
            let slot = Slot {
                stats: GroupStats::at_start(&dir),
                ..Slot::default()
            };
            slots
                .lock()
                .map_err(poison)?
                .insert(meta.name, Arc::new(slot));
        }
    }
    let opts = Arc::new(opts);
    let open = Arc::new(AtomicUsize::new(0));
    start_sampler(slots.clone())?;
    if let Some(l) = metrics {
        info!("serving metrics at http://{}/metrics", l.local_addr()?);
        let (slots, opts, open) = (slots.clone(), opts.clone(), open.clone());
        journal::metrics::serve_http(l, Arc::new(move || scrape(&slots, &opts, &open)))?;
    }
    let next_session = Arc::new(AtomicU64::new(1));
    let mut last_refusal_warning: Option<Instant> = None;
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        if open.load(Ordering::Acquire) >= opts.max_connections {
            if last_refusal_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                warn!(
                    %peer,
                    "refusing connections: {} are open (--max-connections)", opts.max_connections
                );
                last_refusal_warning = Some(Instant::now());
            }
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = stream.write_all(&wire::error(
                "too many connections to this replicator; retry later",
            ));
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let (slots, opts, open, ids) = (
            slots.clone(),
            opts.clone(),
            open.clone(),
            next_session.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("conn {peer}"))
            .spawn(move || {
                // The slot is given back before the socket closes (a refusal only writes
                // its reason), so a peer that reconnects as soon as it sees the close
                // finds it free.
                let last_handle = stream.try_clone().ok();
                let result = handle(stream, &peer, &slots, &opts, &ids);
                open.fetch_sub(1, Ordering::AcqRel);
                if let Some(s) = last_handle {
                    let _ = s.shutdown(Shutdown::Both);
                }
                match result {
                    Err(e) if is_disconnect(&e) => debug!(%peer, "connection closed: {e:#}"),
                    Err(e) => warn!(%peer, "connection ended: {e:#}"),
                    Ok(()) => {}
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

/// A proxy's connection: TLS, or plain TCP with --insecure.
type Link = tls::Stream;

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;

/// Reads from a socket until a deadline: each read waits at most for what is left of it.
struct Deadline<'a> {
    stream: &'a Link,
    until: Instant,
}

impl std::io::Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer did not complete its Hello within --handshake-timeout",
            ));
        }
        self.stream.socket().set_read_timeout(Some(left))?;
        std::io::Read::read(&mut self.stream, buf)
    }
}

/// Tells the peer why it is refused (best effort, within the write deadline) and fails; the
/// connection's thread closes the socket once its slot is free.
fn refuse<T>(mut stream: &Link, msg: String) -> anyhow::Result<T> {
    let _ = stream.write_all(&wire::error(&msg));
    bail!(msg)
}

/// Opens the link: a TLS handshake (or none with --insecure) within `until`. A peer that
/// speaks the other way is told so in plaintext.
fn open_link(sock: TcpStream, opts: &Options, until: Instant) -> anyhow::Result<Link> {
    let left = until.saturating_duration_since(Instant::now());
    sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut first = [0u8; 1];
    match sock.peek(&mut first) {
        Ok(0) => bail!("closed before a word"),
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            bail!("the peer sent nothing within --handshake-timeout")
        }
        Err(e) => return Err(anyhow::Error::new(e).context("read the first byte")),
    }
    let plain = Link::plain(sock);
    match &opts.tls {
        Some(config) => {
            if first[0] != TLS_HANDSHAKE {
                return refuse(
                    &plain,
                    "this replicator requires TLS: give nbd-proxy --tls-cert, --tls-key and \
                     --tls-ca (or run both with --insecure)"
                        .into(),
                );
            }
            Link::accept_until(plain.into_socket(), config.clone(), until)
                .map_err(|e| anyhow::anyhow!("TLS handshake failed: {}", tls::describe(&e)))
        }
        None if first[0] == TLS_HANDSHAKE => refuse(
            &plain,
            "this replicator runs without TLS (--insecure): run nbd-proxy with --insecure too, \
             or give the replicator --tls-cert, --tls-key and --tls-ca"
                .into(),
        ),
        None => Ok(plain),
    }
}

/// How a link is secured, for logs.
fn link_description(link: &Link) -> String {
    match link.describe_session() {
        Some(session) => {
            let names = link
                .peer_certificate()
                .map(|c| tls::cert_names(&c))
                .unwrap_or_default();
            format!(
                "{session}, certificate {}",
                names.first().map_or("?", |n| n.as_str())
            )
        }
        None => "plain TCP, --insecure".into(),
    }
}

/// Whether the link's certificate may feed `group`: its name is the group's, or --allow lets
/// it. Plain links (--insecure) may feed any group.
fn authorize(link: &Link, group: &str, opts: &Options) -> Result<(), String> {
    if !link.is_tls() {
        return Ok(());
    }
    let names = link
        .peer_certificate()
        .map(|c| tls::cert_names(&c))
        .unwrap_or_default();
    let allowed = names.iter().any(|n| {
        n == group
            || opts
                .allow
                .iter()
                .any(|(g, allowed)| g == group && allowed == n)
    });
    if allowed {
        return Ok(());
    }
    Err(format!(
        "this proxy's certificate (names: {}) does not allow group {group:?}: issue the proxy a \
         certificate for the group (`replicator tls issue --group {group}`), or start the \
         replicator with --allow {group}=NAME",
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    ))
}

fn handle(
    sock: TcpStream,
    peer: &str,
    slots: &Slots,
    opts: &Options,
    ids: &AtomicU64,
) -> anyhow::Result<()> {
    sock.set_nodelay(true)?;
    sock.set_write_timeout(Some(opts.link_timeout))?;
    // The TLS handshake and the whole Hello within the handshake timeout, however slowly
    // their bytes trickle in.
    let until = Instant::now() + opts.handshake_timeout;
    let mut stream = open_link(sock, opts, until)?;
    let mut hello_read = Deadline {
        stream: &stream,
        until,
    };
    let (kind, body) = match wire::read_frame(&mut hello_read, wire::MAX_HANDSHAKE_BODY) {
        Ok(frame) => frame,
        // Not our protocol, or a Hello too large: say so (a silent peer just times out).
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return refuse(&stream, format!("read hello: {e}"))
        }
        Err(e) => return Err(anyhow::Error::new(e).context("read hello")),
    };
    let hello = match Hello::decode(&wire::Frame { kind, body: &body }) {
        Ok(h) => h,
        Err(e) => return refuse(&stream, e.to_string()),
    };
    drop(body);
    if hello.protocol != wire::PROTOCOL {
        let msg = format!(
            "protocol {} is not supported (this replicator speaks {})",
            hello.protocol,
            wire::PROTOCOL
        );
        return refuse(&stream, msg);
    }
    // Only the group's own proxies, before anything of the group is touched.
    if let Err(msg) = authorize(&stream, &hello.group, opts) {
        return refuse(&stream, msg);
    }
    // Checked against the stored group before it may displace anyone.
    let dir = GroupDir::new(&opts.store, &hello.group);
    if dir.exists() {
        let checked = dir
            .meta()
            .map_err(anyhow::Error::from)
            .and_then(|meta| crate::group::check_volumes(&dir, &meta, &hello.volumes));
        if let Err(e) = checked {
            return refuse(&stream, format!("{e:#}"));
        }
    }
    let slot = slots
        .lock()
        .map_err(poison)?
        .entry(hello.group.clone())
        .or_default()
        .clone();
    // Accepted: this session replaces the group's previous one (the proxy reconnected).
    let id = ids.fetch_add(1, Ordering::Relaxed);
    let previous = slot.session.lock().map_err(poison)?.replace(Session {
        id,
        stream: stream.try_clone()?,
    });
    if let Some(old) = previous {
        info!(group = %hello.group, "closing the group's previous connection");
        let _ = old.stream.socket().shutdown(Shutdown::Both);
    }
    let result = run_session(&mut stream, peer, &slot, &hello, dir, opts, id);
    let mut current = slot.session.lock().map_err(poison)?;
    if current.as_ref().is_some_and(|s| s.id == id) {
        *current = None;
    }
    result
}

/// Waits for the group (its previous session ends first), opens it, and serves the session.
fn run_session(
    stream: &mut Link,
    peer: &str,
    slot: &Arc<Slot>,
    hello: &Hello,
    dir: GroupDir,
    opts: &Options,
    id: u64,
) -> anyhow::Result<()> {
    let mut guard = slot.group.lock().map_err(poison)?;
    if slot
        .session
        .lock()
        .map_err(poison)?
        .as_ref()
        .is_none_or(|s| s.id != id)
    {
        return Ok(()); // replaced by a newer session while waiting
    }
    if guard.is_none() {
        match Group::open(dir.clone(), &hello.group, &hello.volumes, opts.segment_size) {
            Ok((mut g, known)) => {
                g.set_seal_after(opts.seal_after);
                slot.stats.damaged.store(false, Ordering::Relaxed);
                info!(
                    group = %hello.group,
                    durable_seq = g.durable_seq,
                    "{} group opened",
                    if known { "known" } else { "new" }
                );
                *guard = Some(g);
            }
            Err(e) => {
                let msg = format!("the replicator cannot take records for this group: {e:#}");
                let damaged = e.chain().any(|c| c.is::<journal::writer::Damage>());
                slot.stats.damaged.store(damaged, Ordering::Relaxed);
                slot.stats.connected.store(false, Ordering::Relaxed);
                slot.stats.store_failed.store(true, Ordering::Relaxed);
                write_refusal_status(&dir, &msg);
                return refuse(&*stream, msg);
            }
        }
    }
    let Some(group) = guard.as_mut() else {
        bail!("group not open");
    };
    if let Err(e) = crate::group::check_volumes(&group.dir, &group.meta, &hello.volumes) {
        return refuse(&*stream, format!("{e:#}"));
    }
    // From here on the journal takes this stream's records; say whose it held before.
    let owner = group.dir.stream_owner()?;
    if owner.as_deref() != Some(hello.stream.as_str()) {
        if let Err(e) = group.dir.set_stream_owner(&hello.stream) {
            return refuse(
                stream,
                format!("the replicator cannot record the stream: {e}"),
            );
        }
    }
    start_retention(slot, group, opts);
    let known = group.records_in > 0 || group.durable_seq > 0;
    info!(
        group = %hello.group, %peer, durable_seq = group.durable_seq,
        "proxy connected ({}){}",
        link_description(stream),
        if hello.want_hashes { "; sending image hashes" } else { "" }
    );
    let link_timeout_ms = opts.link_timeout.as_millis() as u64;
    stream.write_all(
        &Welcome {
            protocol: wire::PROTOCOL,
            known,
            durable_seq: group.durable_seq,
            stream: owner,
            link_timeout_ms,
            store_disks: journal::disks::disks_of(&group.dir.path),
        }
        .encode(),
    )?;
    if hello.want_hashes {
        send_hashes(stream, group)?;
    }
    write_status(group, Some(peer), &slot.stats);
    let keepalive = Duration::from_millis(wire::keepalive_interval_ms(
        link_timeout_ms,
        hello.link_timeout_ms,
    ));
    stream.socket().set_read_timeout(Some(opts.link_timeout))?;
    let (tx, rx) = bounded::<Body>(QUEUED_BATCHES);
    // Bodies go back to the reader once ingested: a few buffers serve every batch.
    let (free_tx, free_rx) = bounded::<Vec<u8>>(QUEUED_BATCHES + 2);
    let mut reader = stream.try_clone()?;
    let reader_thread = std::thread::spawn(move || -> anyhow::Result<()> {
        loop {
            let mut buf = free_rx.try_recv().unwrap_or_default();
            let read = wire::read_frame_into(&mut reader, wire::MAX_BODY, &mut buf);
            let (kind, len) = read.map_err(|e| {
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    anyhow::anyhow!("the proxy sent nothing for longer than --link-timeout")
                } else {
                    anyhow::Error::new(e)
                }
            })?;
            match kind {
                FrameType::Batch => {
                    if tx.send(Body { buf, len }).is_err() {
                        return Ok(());
                    }
                }
                FrameType::Keepalive => {}
                FrameType::Error => {
                    bail!("proxy reported: {}", String::from_utf8_lossy(&buf[..len]))
                }
                other => bail!("unexpected {other:?} frame from the proxy"),
            }
        }
    });
    let result = ingest_loop(stream, group, (&rx, &free_tx), peer, keepalive, &slot.stats);
    let _ = stream.socket().shutdown(Shutdown::Both);
    drop(rx);
    let read_end = reader_thread.join();
    // Whatever happened, what was appended becomes durable before the group is released.
    let committed = commit(group, &slot.stats);
    if let Err(e) = group.keep_hashes() {
        warn!(group = %hello.group, "keeping the chunk hashes failed: {e}; they are made again when asked");
    }
    let store_error = match (&result, &committed) {
        (Err(e), _) if e.downcast_ref::<StoreFailed>().is_some() => Some(format!("{e:#}")),
        (_, Err(e)) => Some(format!("{e:#}")),
        _ => None,
    };
    if store_error.is_some() {
        group.store_error = store_error;
    }
    write_status(group, None, &slot.stats);
    if let Some(why) = group.failed().map(str::to_owned) {
        error!(group = %hello.group, "the journal must be reopened: {why}");
        *guard = None;
    }
    committed?;
    result?;
    match read_end {
        Ok(Err(e)) if !is_disconnect(&e) => Err(e),
        _ => {
            info!(group = %hello.group, %peer, "proxy disconnected");
            Ok(())
        }
    }
}

/// A session ended because the store could not take records (it is not the proxy's fault).
#[derive(Debug, thiserror::Error)]
#[error("the replicator cannot store records: {0}")]
struct StoreFailed(String);

fn is_disconnect(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::NotConnected
            )
        })
}

fn poison<T>(_: T) -> anyhow::Error {
    anyhow::anyhow!("a connection thread panicked while holding group state")
}

fn send_hashes(stream: &mut Link, group: &mut Group) -> anyhow::Result<()> {
    group.send_hashes(|disk, first_chunk, part| {
        let frame = wire::Hashes {
            disk,
            first_chunk,
            hashes: part.to_vec(),
        };
        stream.write_all(&frame.encode())
    })?;
    stream.write_all(&wire::frame(FrameType::HashesDone, &[]))?;
    Ok(())
}

/// A batch frame's body as the reader thread read it: `buf[..len]`.
struct Body {
    buf: Vec<u8>,
    len: usize,
}

/// Ingests batches from `rx` (handing each body's buffer back through `free`), commits when
/// no more input waits, acks.
fn ingest_loop(
    stream: &mut Link,
    group: &mut Group,
    (rx, free): (&Receiver<Body>, &Sender<Vec<u8>>),
    peer: &str,
    keepalive: Duration,
    stats: &GroupStats,
) -> anyhow::Result<()> {
    let mut last_status = Instant::now();
    let mut last_sent = Instant::now();
    let mut acked = group.durable_seq;
    loop {
        // Wakes at least every second while idle: status, keepalives, sealing by age.
        let body = match rx.recv_timeout(keepalive.min(Duration::from_secs(1))) {
            Ok(body) => body,
            Err(RecvTimeoutError::Timeout) => {
                if last_sent.elapsed() >= keepalive {
                    stream.write_all(&wire::keepalive())?;
                    last_sent = Instant::now();
                }
                if last_status.elapsed() >= Duration::from_secs(1) {
                    group.seal_if_due();
                    write_status(group, Some(peer), stats);
                    last_status = Instant::now();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        ingest(stream, group, &body.buf[..body.len], stats)?;
        let _ = free.try_send(body.buf);
        // Group commit: take whatever else has arrived, then one fsync for all of it.
        loop {
            if group.should_commit() {
                break;
            }
            match rx.try_recv() {
                Ok(body) => {
                    ingest(stream, group, &body.buf[..body.len], stats)?;
                    let _ = free.try_send(body.buf);
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
        let durable = match commit(group, stats) {
            Ok(seq) => seq,
            Err(e) => {
                let msg = format!("{e:#}");
                let _ = stream.write_all(&wire::error(&format!(
                    "the replicator cannot store records: {msg}"
                )));
                return Err(StoreFailed(msg).into());
            }
        };
        if durable != acked {
            // Records are stored again: whatever kept them out is over.
            group.store_error = None;
            stream.write_all(&wire::ack(durable))?;
            last_sent = Instant::now();
            acked = durable;
            if rx.is_empty() {
                // Nothing waits: the time until the next batch serves the next commits.
                group.zero_ahead();
            }
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            write_status(group, Some(peer), stats);
            last_status = Instant::now();
        }
    }
}

/// Commits what was ingested, counting the fsync when one was made.
fn commit(group: &mut Group, stats: &GroupStats) -> anyhow::Result<u64> {
    let before = group.durable_seq;
    let durable = group.commit()?;
    stats.committed(group, durable != before);
    Ok(durable)
}

fn ingest(
    stream: &mut Link,
    group: &mut Group,
    body: &[u8],
    stats: &GroupStats,
) -> anyhow::Result<()> {
    let before = (group.records_in, group.bytes_in, group.stored_in);
    match group.ingest(body) {
        Ok(()) => {
            stats.ingested(before, group);
            Ok(())
        }
        Err(IngestError::Refused { seq, reason }) => {
            warn!(group = %group.meta.name, "refusing record seq {seq}: {reason}");
            let _ = stream.write_all(
                &wire::Refused {
                    seq,
                    reason: reason.clone(),
                }
                .encode(),
            );
            bail!("refused record seq {seq}: {reason}")
        }
        Err(IngestError::Store(e)) => {
            let msg = format!("{e:#}");
            error!(group = %group.meta.name, "{msg}");
            let _ = stream.write_all(&wire::error(&format!(
                "the replicator cannot store records: {msg}"
            )));
            Err(StoreFailed(msg).into())
        }
    }
}

/// Samples every group's counters for rates, for as long as the process runs.
fn start_sampler(slots: Slots) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("sampler".into())
        .spawn(move || loop {
            let list: Vec<Arc<Slot>> = match slots.lock() {
                Ok(s) => s.values().cloned().collect(),
                Err(_) => return,
            };
            for slot in list {
                slot.stats.sample();
            }
            std::thread::sleep(journal::metrics::SAMPLE_PERIOD);
        })?;
    Ok(())
}

/// What `GET /metrics` answers: every group this replicator knows, from atomics (never the
/// group's lock) and the store's disk usage.
fn scrape(slots: &Slots, opts: &Options, open: &AtomicUsize) -> String {
    let mut list: Vec<(String, Arc<Slot>)> = match slots.lock() {
        Ok(s) => s.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Err(_) => Vec::new(),
    };
    list.sort_by(|a, b| a.0.cmp(&b.0));
    let groups: Vec<_> = list
        .iter()
        .map(|(name, slot)| (name.clone(), GroupDir::new(&opts.store, name), &slot.stats))
        .collect();
    crate::metrics::render(
        &groups,
        crate::metrics::Server {
            connections: open.load(Ordering::Acquire) as u64,
            max_connections: opts.max_connections as u64,
            retention_secs: opts.retention.max_age.map(|d| d.as_secs()),
            max_store_size: opts.retention.max_size,
        },
    )
}

fn start_retention(slot: &Arc<Slot>, group: &Group, opts: &Options) {
    let Ok(mut started) = slot.retention_started.lock() else {
        return;
    };
    if *started || !opts.retention.enabled() {
        return;
    }
    *started = true;
    let dir = group.dir.clone();
    let meta = group.meta.clone();
    let policy = opts.retention.clone();
    std::thread::spawn(move || retention::run(dir, meta, policy));
}

/// The live part of `replicator status`, written to the group's status.json.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct LiveStatus {
    pub connected: bool,
    pub peer: Option<String>,
    pub durable_seq: u64,
    pub durable_time_ns: u64,
    pub updated_ns: u64,
    pub records_in: u64,
    pub bytes_in: u64,
    pub stored_in: u64,
    pub pid: u32,
    /// Why the group last refused to take records (a full or failing store, a damaged
    /// journal); cleared once records are stored again.
    #[serde(default)]
    pub store_error: Option<String>,
    /// Group commits (fsyncs) since the replicator started.
    #[serde(default)]
    pub fsyncs: u64,
    /// Per-second rates over the last 1 s and 10 s, as of `updated_ns`.
    #[serde(default)]
    pub rates: journal::metrics::Windows<GroupRates>,
}

fn write_status(group: &Group, peer: Option<&str>, stats: &GroupStats) {
    stats.connected.store(peer.is_some(), Ordering::Relaxed);
    stats
        .store_failed
        .store(group.store_error.is_some(), Ordering::Relaxed);
    let status = LiveStatus {
        connected: peer.is_some(),
        peer: peer.map(str::to_owned),
        durable_seq: group.durable_seq,
        durable_time_ns: group.durable_time_ns,
        updated_ns: journal::now_ns(),
        records_in: group.records_in,
        bytes_in: group.bytes_in,
        stored_in: group.stored_in,
        pid: std::process::id(),
        store_error: group.store_error.clone(),
        fsyncs: stats.fsyncs.load(Ordering::Relaxed),
        rates: stats.rates(),
    };
    put_status(&group.dir, &status);
}

/// Status of a group that could not even be opened (a damaged journal, a failing store).
fn write_refusal_status(dir: &GroupDir, why: &str) {
    let mut status: LiveStatus =
        store::read_json(&dir.path.join("status.json")).unwrap_or_default();
    status.connected = false;
    status.peer = None;
    status.updated_ns = journal::now_ns();
    status.pid = std::process::id();
    status.store_error = Some(why.to_owned());
    put_status(dir, &status);
}

fn put_status(dir: &GroupDir, status: &LiveStatus) {
    // In place: a full file system must not keep the status from saying so.
    if let Err(e) = store::write_json_in_place(&dir.path.join("status.json"), status) {
        warn!("write status of {}: {e}", dir.path.display());
    }
}
