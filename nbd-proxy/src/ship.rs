//! The shipper: one thread that keeps a connection to the replicator, sends records in seq
//! order in checksummed batches, frees the log as durable acks arrive, and reconnects with
//! backoff. After a reconnect it sends only what follows the replicator's durable seq.
//!
//! Every record not yet acknowledged stays in `log` (the shipper's part of the change log),
//! whether it was sent or not, so the lag is always measured from the oldest of them. A
//! replicator silent for `--link-timeout` (no ack, no keepalive) is gone; every write to it has
//! that deadline; a record it refuses is dropped and its range resynchronized, never resent.

use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::{select, Receiver};
use journal::wire::{self, FrameType, Hello, Volume, Welcome, FRAME_HEADER_LEN};
use serde::Serialize;
use tracing::{info, warn};

use crate::capture::{Capture, Handshake};
use crate::disk::CaptureBackend;
use crate::record::Record;
use crate::resync::{self, Plan};

/// Largest batch body sent in one frame.
const BATCH_BYTES: usize = 4 << 20;
/// Async mode: how long the shipper lets a batch fill after its first record arrives.
const COALESCE: Duration = Duration::from_millis(1);
/// A sync that left dirty chunks (a chunk it could not read) is retried this often.
const SYNC_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkInfo {
    pub state: &'static str,
    pub since_ns: u64,
    pub last_error: Option<String>,
    pub connects: u64,
}

#[derive(Debug)]
pub struct Shipper {
    pub addr: String,
    pub group: String,
    pub volumes: Vec<Volume>,
    pub capture: Arc<Capture>,
    pub disks: Vec<Arc<CaptureBackend>>,
    pub runtime: tokio::runtime::Handle,
    pub link: Arc<Mutex<LinkInfo>>,
    /// This proxy's stream id ([`Hello::stream`]).
    pub stream: String,
    pub link_timeout: Duration,
    /// Mutual TLS to the replicator, and the name its certificate must carry (None: plain
    /// TCP, --insecure).
    pub tls: Option<(
        Arc<tls::rustls::ClientConfig>,
        tls::rustls::pki_types::ServerName<'static>,
    )>,
    /// Told where the replicator's store lives (each Welcome).
    pub writeback: Arc<crate::writeback::Policy>,
}

/// The connection to the replicator: TLS, or plain TCP with --insecure.
type Link = tls::Stream;

enum Ended {
    NeedHashes,
}

/// The replicator refused a record: it must not be sent again.
#[derive(Debug, thiserror::Error)]
#[error("the replicator refused record seq {seq}: {reason}")]
struct RecordRefused {
    seq: u64,
    reason: String,
}

/// What the replicator sent while records stream.
enum FromReplicator {
    Ack(u64),
    Refused(RecordRefused),
}

impl Shipper {
    pub fn run(self, rx: Receiver<Record>) {
        let mut log = VecDeque::new();
        let mut backoff = Duration::from_millis(100);
        let mut want_hashes = self.capture.full_sync_needed();
        self.set_link("connecting", None);
        loop {
            match self.session(&rx, &mut log, want_hashes) {
                Ok(Ended::NeedHashes) => {
                    want_hashes = true;
                    continue;
                }
                Err(e) => {
                    if let Some(r) = e.downcast_ref::<RecordRefused>() {
                        let dropped = self.capture.refused(r.seq, &rx, &mut log);
                        warn!(
                            "{r}; dropped it and the {} records after it; their ranges are \
                             tracked as dirty chunks and resynchronized from the disks",
                            dropped.saturating_sub(1)
                        );
                        if let Ok(mut last) = self.capture.stats.last_refusal.lock() {
                            *last = Some(format!("seq {}: {}", r.seq, r.reason));
                        }
                        self.note_oldest(&log);
                    }
                    let msg = format!("{e:#}");
                    let was = self.link_state();
                    if was == "connected"
                        || self
                            .link
                            .lock()
                            .map(|l| l.last_error.as_deref() != Some(&msg))
                            .unwrap_or(true)
                    {
                        warn!(
                            "replication link to {} is down: {msg}; retrying (guest I/O continues{})",
                            self.addr,
                            if self.capture.sync_waits() {
                                ", but sync-mode writes wait for the replicator"
                            } else {
                                ""
                            }
                        );
                    }
                    if was == "connected" {
                        backoff = Duration::from_millis(100);
                    }
                    self.set_link("down", Some(msg));
                    self.wait(backoff, &rx, &mut log);
                    backoff = (backoff * 2).min(Duration::from_secs(3));
                }
            }
            want_hashes = self.capture.full_sync_needed();
        }
    }

    /// Sleeps between attempts, taking new records into the log meanwhile (so the lag keeps
    /// counting from the oldest one) and starting a resync if the log overflowed.
    fn wait(&self, total: Duration, rx: &Receiver<Record>, log: &mut VecDeque<Record>) {
        let until = Instant::now() + total;
        loop {
            while let Ok(r) = rx.try_recv() {
                log.push_back(r);
            }
            self.note_oldest(log);
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(100)));
        }
    }

    /// Keeps the capture time of the oldest record not yet durable where status finds it.
    fn note_oldest(&self, log: &VecDeque<Record>) {
        let oldest = log.front().map_or(0, |r| r.time_ns);
        self.capture
            .stats
            .oldest_unacked_ns
            .store(oldest, Ordering::Release);
    }

    fn link_state(&self) -> &'static str {
        self.link.lock().map(|l| l.state).unwrap_or("down")
    }

    fn set_link(&self, state: &'static str, error: Option<String>) {
        if let Ok(mut l) = self.link.lock() {
            if l.state != state {
                l.since_ns = journal::now_ns();
            }
            l.state = state;
            if error.is_some() {
                l.last_error = error;
            }
            if state == "connected" {
                l.connects += 1;
            }
        }
    }

    fn session(
        &self,
        rx: &Receiver<Record>,
        log: &mut VecDeque<Record>,
        want_hashes: bool,
    ) -> anyhow::Result<Ended> {
        let addr = self
            .addr
            .to_socket_addrs()
            .with_context(|| format!("resolve {}", self.addr))?
            .next()
            .with_context(|| format!("{} resolves to no address", self.addr))?;
        let connect_timeout = self.link_timeout.min(Duration::from_secs(5));
        let sock = TcpStream::connect_timeout(&addr, connect_timeout)
            .with_context(|| format!("connect to replicator {addr}"))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(self.link_timeout))?;
        sock.set_write_timeout(Some(self.link_timeout))?;
        let mut stream = match &self.tls {
            Some((config, name)) => {
                Link::connect(sock, config.clone(), name.clone()).map_err(|e| {
                    anyhow::anyhow!(
                        "TLS handshake with replicator {addr} failed: {}",
                        tls::describe(&e)
                    )
                })?
            }
            None => Link::plain(sock),
        };
        let link_timeout_ms = self.link_timeout.as_millis() as u64;
        stream.write_all(
            &Hello {
                protocol: wire::PROTOCOL,
                group: self.group.clone(),
                volumes: self.volumes.clone(),
                want_hashes,
                stream: self.stream.clone(),
                link_timeout_ms,
            }
            .encode(),
        )?;
        let (kind, body) = read_frame(&mut stream, wire::MAX_HANDSHAKE_BODY, "the welcome")?;
        let welcome = Welcome::decode(&wire::Frame { kind, body: &body })?;
        self.writeback.store_is_on(welcome.store_disks.as_deref());
        let hashes = if want_hashes {
            Some(self.read_hashes(&mut stream)?)
        } else {
            None
        };
        // The journal ends with another stream's records (another proxy, or this group's
        // proxy with a lost activity log): what follows its durable seq is not ours to resume.
        let ours = !welcome.known || welcome.stream.as_deref() == Some(self.stream.as_str());
        if !ours && hashes.is_none() {
            info!(
                "the replicator's journal for group {} ends with another stream's records; \
                 comparing every chunk by hash",
                self.group
            );
        }
        let decision = self.capture.handshake(
            welcome.durable_seq,
            welcome.known,
            ours,
            rx,
            log,
            hashes.is_some(),
        );
        if decision == Handshake::NeedHashes {
            info!("the replicator's copy must be compared by hashes; reconnecting for them");
            return Ok(Ended::NeedHashes);
        }
        info!(
            "connected to replicator {addr} ({}): group {} {}, durable seq {}; {}",
            stream
                .describe_session()
                .unwrap_or_else(|| "plain TCP, --insecure".into()),
            self.group,
            if welcome.known { "known" } else { "new" },
            welcome.durable_seq,
            match decision {
                Handshake::Resume => format!("resending {} unacknowledged records", log.len()),
                Handshake::DirtySync => format!(
                    "resending {} records, then resyncing {} dirty chunks",
                    log.len(),
                    self.capture.dirty_chunks()
                ),
                Handshake::FullSync if !welcome.known => "seeding the disks".into(),
                _ => "comparing every chunk by hash (delta sync)".into(),
            }
        );
        self.set_link("connected", None);
        self.note_oldest(log);

        let (from_tx, from_rx) = crossbeam_channel::unbounded::<anyhow::Result<FromReplicator>>();
        let mut reader = stream.try_clone()?;
        let ack_thread = std::thread::spawn(move || loop {
            let r = read_from_replicator(&mut reader);
            let stop = r.is_err() || matches!(r, Ok(FromReplicator::Refused(_)));
            if from_tx.send(r).is_err() || stop {
                return;
            }
        });
        let sync = match decision {
            Handshake::FullSync => Some(Plan {
                full: true,
                hashes,
                reason: if welcome.known { "delta" } else { "seed" },
            }),
            Handshake::DirtySync => Some(Plan {
                full: false,
                hashes: None,
                reason: "resync",
            }),
            _ => None,
        };
        let keepalive = Duration::from_millis(wire::keepalive_interval_ms(
            link_timeout_ms,
            welcome.link_timeout_ms,
        ));
        let result = self.stream_records(&mut stream, rx, log, &from_rx, sync, keepalive);
        let _ = stream.socket().shutdown(std::net::Shutdown::Both);
        let _ = ack_thread.join();
        result
    }

    fn read_hashes(&self, stream: &mut Link) -> anyhow::Result<Vec<Vec<u128>>> {
        let mut out: Vec<Vec<u128>> = self
            .volumes
            .iter()
            .map(|v| Vec::with_capacity(v.size.div_ceil(wire::HASH_CHUNK) as usize))
            .collect();
        loop {
            let (kind, body) = read_frame(stream, wire::MAX_BODY, "hashes")?;
            let frame = wire::Frame { kind, body: &body };
            match kind {
                FrameType::HashesDone => return Ok(out),
                FrameType::Keepalive => continue,
                _ => {}
            }
            let h = wire::Hashes::decode(&frame)?;
            let Some(list) = out.get_mut(usize::from(h.disk)) else {
                bail!("hashes for unknown disk {}", h.disk);
            };
            let chunks = self.volumes[usize::from(h.disk)]
                .size
                .div_ceil(wire::HASH_CHUNK);
            if h.first_chunk != list.len() as u64 || list.len() + h.hashes.len() > chunks as usize {
                bail!("hashes arrived out of order");
            }
            list.extend(h.hashes);
        }
    }

    fn stream_records(
        &self,
        stream: &mut Link,
        rx: &Receiver<Record>,
        log: &mut VecDeque<Record>,
        from: &Receiver<anyhow::Result<FromReplicator>>,
        sync: Option<Plan>,
        keepalive: Duration,
    ) -> anyhow::Result<Ended> {
        // Resend what the replicator does not have yet: everything in the log.
        let mut batch = Batch::default();
        let mut sent = 0;
        while sent < log.len() {
            sent += batch.send(stream, log, sent, &self.capture)?;
        }
        let mut last_sent = Instant::now();
        if let Some(plan) = sync {
            self.start_sync(plan);
        }
        let mut last_sync = Instant::now();
        // Async mode, records arriving: the shipper looks for them every COALESCE instead of
        // waiting on the channel, so the guest's writes never have to wake it (a futex call and
        // a context switch on their reply path, twice per batch with the sleep after it).
        let mut polling = false;
        loop {
            if polling && !self.capture.sync_waits() {
                std::thread::sleep(COALESCE);
                loop {
                    match from.try_recv() {
                        Ok(a) => self.on_reply(Ok(a), log, &mut sent)?,
                        Err(crossbeam_channel::TryRecvError::Empty) => break,
                        Err(crossbeam_channel::TryRecvError::Disconnected) => {
                            bail!("replicator link closed")
                        }
                    }
                }
                let before = log.len();
                log.extend(rx.try_iter());
                polling = log.len() > before;
                if polling {
                    self.send_unsent(stream, log, &mut sent, &mut batch)?;
                    last_sent = Instant::now();
                }
            } else {
                polling = false;
                select! {
                    recv(rx) -> r => {
                        let Ok(r) = r else { bail!("capture ended") };
                        log.push_back(r);
                        if !self.capture.sync_waits() {
                            // Async: no guest write waits for this batch, so let it fill for a
                            // moment (a shipper woken for every record costs each write a
                            // wake-up, and the link a frame), then poll while records come.
                            std::thread::sleep(COALESCE);
                            polling = true;
                        }
                        log.extend(rx.try_iter());
                        self.send_unsent(stream, log, &mut sent, &mut batch)?;
                        last_sent = Instant::now();
                    }
                    recv(from) -> a => self.on_reply(a, log, &mut sent)?,
                    default(keepalive.min(Duration::from_millis(100))) => {}
                }
            }
            if last_sent.elapsed() >= keepalive {
                stream
                    .write_all(&wire::keepalive())
                    .context("send a keepalive")?;
                last_sent = Instant::now();
            }
            self.maybe_resync(&mut last_sync);
        }
    }

    /// Sends every record of the log not sent yet (`log[sent..]`), in batches.
    fn send_unsent(
        &self,
        stream: &mut Link,
        log: &mut VecDeque<Record>,
        sent: &mut usize,
        batch: &mut Batch,
    ) -> anyhow::Result<()> {
        if *sent == 0 {
            self.note_oldest(log);
        }
        while *sent < log.len() {
            *sent += batch
                .send(stream, log, *sent, &self.capture)
                .context("send records")?;
        }
        Ok(())
    }

    /// An ack frees the log up to its seq; a refusal or a broken link ends the session.
    fn on_reply(
        &self,
        got: Result<anyhow::Result<FromReplicator>, crossbeam_channel::RecvError>,
        log: &mut VecDeque<Record>,
        sent: &mut usize,
    ) -> anyhow::Result<()> {
        match got {
            Ok(Ok(FromReplicator::Ack(seq))) => {
                *sent -= self.acked(log, seq).min(*sent);
                Ok(())
            }
            Ok(Ok(FromReplicator::Refused(r))) => Err(r.into()),
            Ok(Err(e)) => Err(e.context("replicator link")),
            Err(_) => bail!("replicator link closed"),
        }
    }

    /// Frees the records up to `seq`; returns how many left the log.
    fn acked(&self, log: &mut VecDeque<Record>, seq: u64) -> usize {
        let mut freed = 0u64;
        // The lag sample is the record that waited longest for this ack (its first), so a
        // stall shows in the percentiles as long as it lasted.
        let oldest = log.front().filter(|r| r.seq <= seq).map(|r| r.time_ns);
        let mut count = 0;
        while log.front().is_some_and(|r| r.seq <= seq) {
            if let Some(r) = log.pop_front() {
                freed += r.mem_bytes();
                count += 1;
            }
        }
        self.capture
            .stats
            .records_acked
            .fetch_add(count as u64, Ordering::Relaxed);
        if let Some(at) = oldest {
            if let Ok(mut lags) = self.capture.stats.lag_us.lock() {
                if lags.len() >= 4096 {
                    lags.pop_front();
                }
                lags.push_back(journal::now_ns().saturating_sub(at) / 1000);
            }
        }
        self.note_oldest(log);
        self.capture.release(freed, seq);
        count
    }

    /// After the log overflowed (dirty tracking), resync once it has drained to half; after a
    /// sync that could not read some chunks, retry those now and then.
    fn maybe_resync(&self, last_sync: &mut Instant) {
        let c = &self.capture;
        if c.syncing.load(Ordering::Acquire) {
            return;
        }
        let overflowed = !c.is_live() && c.log_bytes.load(Ordering::Acquire) <= c.capacity / 2;
        let unread = c.is_live() && c.dirty_chunks() > 0 && last_sync.elapsed() >= SYNC_RETRY;
        if overflowed || unread {
            *last_sync = Instant::now();
            self.start_sync(Plan {
                full: false,
                hashes: None,
                reason: "resync",
            });
        }
    }

    fn start_sync(&self, plan: Plan) {
        if self.capture.syncing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (capture, disks) = (self.capture.clone(), self.disks.clone());
        self.runtime.spawn(resync::run(capture, disks, plan));
    }
}

/// What sending batches reuses: lz4's scratch space for sealing records.
#[derive(Default)]
struct Batch {
    scratch: Vec<u8>,
}

impl Batch {
    /// Sends records from `log[from..]` as one batch frame of about [`BATCH_BYTES`] (at least
    /// one record), sealing those not sealed yet and copying none; returns how many it sent.
    /// The frame's bytes are added to the shipped count.
    fn send(
        &mut self,
        stream: &mut Link,
        log: &mut VecDeque<Record>,
        from: usize,
        capture: &Capture,
    ) -> std::io::Result<usize> {
        let mut len = 0usize;
        let mut count = 0;
        let mut freed = 0;
        for r in log.range_mut(from..) {
            // Sealing may compress: the length that counts is the sealed one.
            freed += r.seal(&capture.compress, &mut self.scratch);
            if count > 0 && len + r.wire_len() > BATCH_BYTES {
                break;
            }
            len += r.wire_len();
            count += 1;
        }
        if freed > 0 {
            capture.log_bytes.fetch_sub(freed, Ordering::AcqRel);
        }
        let mut head = [0u8; FRAME_HEADER_LEN];
        head[0..4].copy_from_slice(&wire::MAGIC.to_le_bytes());
        head[4] = FrameType::Batch as u8;
        // No crc of the body: each record carries its own ([`wire`]).
        head[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + 2 * count);
        slices.push(IoSlice::new(&head));
        for r in log.range(from..from + count) {
            let (header, payload) = r
                .sealed()
                .ok_or_else(|| std::io::Error::other("a record was not sealed"))?;
            slices.push(IoSlice::new(header));
            slices.push(IoSlice::new(payload));
        }
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            let n = stream.write_vectored(slices)?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, n);
        }
        capture
            .stats
            .bytes_shipped
            .fetch_add((FRAME_HEADER_LEN + len) as u64, Ordering::Relaxed);
        Ok(count)
    }
}

/// Reads a frame; a read that times out means the replicator fell silent.
fn read_frame(r: &mut Link, limit: u32, what: &str) -> anyhow::Result<(FrameType, Vec<u8>)> {
    wire::read_frame(r, limit).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow::anyhow!(
            "the replicator sent nothing for longer than --link-timeout (reading {what})"
        ),
        _ => anyhow::anyhow!("read {what}: {}", tls::describe(&e)),
    })
}

/// The next frame that matters from the replicator: an ack or a refusal (keepalives skipped).
fn read_from_replicator(r: &mut Link) -> anyhow::Result<FromReplicator> {
    loop {
        let (kind, body) = read_frame(r, wire::MAX_HANDSHAKE_BODY, "acks")?;
        let frame = wire::Frame { kind, body: &body };
        return match kind {
            FrameType::Keepalive => continue,
            FrameType::Ack => Ok(FromReplicator::Ack(wire::decode_ack(&frame)?)),
            FrameType::Refused => {
                let r = wire::Refused::decode(&frame)?;
                Ok(FromReplicator::Refused(RecordRefused {
                    seq: r.seq,
                    reason: r.reason,
                }))
            }
            _ => Err(wire::unexpected(&frame, "ack").into()),
        };
    }
}

/// When each recent record became durable after it was captured, as percentiles (ms).
pub fn lag_percentiles(capture: &Capture) -> (f64, f64, f64) {
    let Ok(lags) = capture.stats.lag_us.lock() else {
        return (0.0, 0.0, 0.0);
    };
    if lags.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut v: Vec<u64> = lags.iter().copied().collect();
    v.sort_unstable();
    let p = |q: f64| v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    (p(0.5), p(0.99), *v.last().unwrap_or(&0) as f64 / 1000.0)
}
