//! The shipper: one thread that keeps a connection to the replicator, sends records in seq
//! order in checksummed batches, frees the log as durable acks arrive, and reconnects with
//! backoff. After a reconnect it sends only what follows the replicator's durable seq.

use std::collections::VecDeque;
use std::io::{IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use crossbeam_channel::{select, Receiver};
use journal::wire::{self, FrameType, Hello, Volume, Welcome, FRAME_HEADER_LEN};
use serde::Serialize;
use tracing::{info, warn};

use crate::capture::{Capture, CaptureBackend, Handshake, Sealed};
use crate::resync::{self, Plan};

/// Largest batch body sent in one frame.
const BATCH_BYTES: usize = 4 << 20;

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
}

enum Ended {
    NeedHashes,
}

impl Shipper {
    pub fn run(self, rx: Receiver<Sealed>) {
        let mut unacked = VecDeque::new();
        let mut backoff = Duration::from_millis(100);
        let mut want_hashes = self.capture.full_sync_needed();
        self.set_link("connecting", None);
        loop {
            match self.session(&rx, &mut unacked, want_hashes) {
                Ok(Ended::NeedHashes) => {
                    want_hashes = true;
                    continue;
                }
                Err(e) => {
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
                            if self.capture.mode == crate::capture::Mode::Sync {
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
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(3));
                }
            }
            want_hashes = self.capture.full_sync_needed();
        }
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
        rx: &Receiver<Sealed>,
        unacked: &mut VecDeque<Sealed>,
        want_hashes: bool,
    ) -> anyhow::Result<Ended> {
        let addr = self
            .addr
            .to_socket_addrs()
            .with_context(|| format!("resolve {}", self.addr))?
            .next()
            .with_context(|| format!("{} resolves to no address", self.addr))?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect to replicator {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(600)))?;
        stream.write_all(
            &Hello {
                protocol: wire::PROTOCOL,
                group: self.group.clone(),
                volumes: self.volumes.clone(),
                want_hashes,
            }
            .encode(),
        )?;
        let (kind, body) = read_frame(&mut stream).context("read welcome")?;
        let welcome = Welcome::decode(&wire::Frame { kind, body: &body })?;
        let hashes = if want_hashes {
            Some(self.read_hashes(&mut stream)?)
        } else {
            None
        };
        stream.set_read_timeout(None)?;
        let decision = self.capture.handshake(
            welcome.durable_seq,
            welcome.known,
            rx,
            unacked,
            hashes.is_some(),
        );
        if decision == Handshake::NeedHashes {
            info!("the replicator's copy must be compared by hashes; reconnecting for them");
            return Ok(Ended::NeedHashes);
        }
        info!(
            "connected to replicator {addr}: group {} {}, durable seq {}; {}",
            self.group,
            if welcome.known { "known" } else { "new" },
            welcome.durable_seq,
            match decision {
                Handshake::Resume => format!("resending {} unacknowledged records", unacked.len()),
                Handshake::DirtySync => format!(
                    "resending {} records, then resyncing {} dirty chunks",
                    unacked.len(),
                    self.capture.dirty_chunks()
                ),
                Handshake::FullSync if !welcome.known => "seeding the disks".into(),
                _ => "comparing every chunk by hash (delta sync)".into(),
            }
        );
        self.set_link("connected", None);

        let (ack_tx, ack_rx) = crossbeam_channel::unbounded::<anyhow::Result<u64>>();
        let mut reader = stream.try_clone()?;
        let ack_thread = std::thread::spawn(move || loop {
            let r = read_frame(&mut reader).and_then(|(kind, body)| {
                wire::decode_ack(&wire::Frame { kind, body: &body }).map_err(Into::into)
            });
            let stop = r.is_err();
            if ack_tx.send(r).is_err() || stop {
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
        let result = self.stream_records(&mut stream, rx, unacked, &ack_rx, sync);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let _ = ack_thread.join();
        result
    }

    fn read_hashes(&self, stream: &mut TcpStream) -> anyhow::Result<Vec<Vec<u128>>> {
        let mut out: Vec<Vec<u128>> = self
            .volumes
            .iter()
            .map(|v| Vec::with_capacity(v.size.div_ceil(wire::HASH_CHUNK) as usize))
            .collect();
        loop {
            let (kind, body) = read_frame(stream).context("read hashes")?;
            let frame = wire::Frame { kind, body: &body };
            if kind == FrameType::HashesDone {
                return Ok(out);
            }
            let h = wire::Hashes::decode(&frame)?;
            let Some(list) = out.get_mut(usize::from(h.disk)) else {
                bail!("hashes for unknown disk {}", h.disk);
            };
            if h.first_chunk != list.len() as u64 {
                bail!("hashes arrived out of order");
            }
            list.extend(h.hashes);
        }
    }

    fn stream_records(
        &self,
        stream: &mut TcpStream,
        rx: &Receiver<Sealed>,
        unacked: &mut VecDeque<Sealed>,
        ack_rx: &Receiver<anyhow::Result<u64>>,
        sync: Option<Plan>,
    ) -> anyhow::Result<Ended> {
        // Resend what the replicator does not have yet.
        let pending: Vec<&[u8]> = unacked.iter().map(|r| r.bytes.as_slice()).collect();
        for batch in batches(&pending) {
            send_batch(stream, batch)?;
        }
        if let Some(plan) = sync {
            self.start_sync(plan);
        }
        let mut batch: Vec<Sealed> = Vec::new();
        loop {
            select! {
                recv(rx) -> r => {
                    let Ok(r) = r else { bail!("capture ended") };
                    let mut bytes = r.bytes.len();
                    batch.push(r);
                    while bytes < BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(r) => { bytes += r.bytes.len(); batch.push(r); }
                            Err(_) => break,
                        }
                    }
                    if unacked.is_empty() {
                        self.capture.stats.oldest_unacked_ns.store(journal::record::time_of(&batch[0].bytes), Ordering::Relaxed);
                    }
                    let slices: Vec<&[u8]> = batch.iter().map(|r| r.bytes.as_slice()).collect();
                    let sent = send_batch(stream, &slices);
                    unacked.extend(batch.drain(..));
                    sent?;
                }
                recv(ack_rx) -> a => {
                    let seq = match a {
                        Ok(Ok(seq)) => seq,
                        Ok(Err(e)) => return Err(e.context("replicator link")),
                        Err(_) => bail!("replicator link closed"),
                    };
                    self.acked(unacked, seq);
                }
                default(Duration::from_millis(100)) => {}
            }
            self.maybe_resync();
        }
    }

    fn acked(&self, unacked: &mut VecDeque<Sealed>, seq: u64) {
        let mut freed = 0u64;
        let mut newest = None;
        while unacked.front().is_some_and(|r| r.seq <= seq) {
            if let Some(r) = unacked.pop_front() {
                freed += r.bytes.len() as u64;
                newest = Some(r.at);
            }
        }
        if let Some(at) = newest {
            if let Ok(mut lags) = self.capture.stats.lag_us.lock() {
                if lags.len() >= 4096 {
                    lags.pop_front();
                }
                lags.push_back(at.elapsed().as_micros() as u64);
            }
        }
        self.capture.stats.oldest_unacked_ns.store(
            unacked
                .front()
                .map_or(0, |r| journal::record::time_of(&r.bytes)),
            Ordering::Relaxed,
        );
        self.capture.release(freed, seq);
    }

    /// After the log overflowed (dirty tracking), resync once it has drained to half.
    fn maybe_resync(&self) {
        let c = &self.capture;
        if !c.is_live()
            && !c.syncing.load(Ordering::Acquire)
            && c.log_bytes.load(Ordering::Acquire) <= c.capacity / 2
        {
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

/// Splits records into batches of about [`BATCH_BYTES`].
fn batches<'a>(records: &'a [&'a [u8]]) -> impl Iterator<Item = &'a [&'a [u8]]> {
    let mut rest = records;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len() && (n == 0 || bytes + rest[n].len() <= BATCH_BYTES) {
            bytes += rest[n].len();
            n += 1;
        }
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        Some(batch)
    })
}

/// Sends records as one batch frame, without copying them into one buffer.
fn send_batch(stream: &mut TcpStream, records: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = records.iter().map(|r| r.len()).sum();
    let crc = records
        .iter()
        .fold(0u32, |crc, r| crc32c::crc32c_append(crc, r));
    let mut head = [0u8; FRAME_HEADER_LEN];
    head[0..4].copy_from_slice(&wire::MAGIC.to_le_bytes());
    head[4] = FrameType::Batch as u8;
    head[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    head[12..16].copy_from_slice(&crc.to_le_bytes());
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(records.len() + 1);
    slices.push(IoSlice::new(&head));
    slices.extend(records.iter().map(|r| IoSlice::new(r)));
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = stream.write_vectored(slices)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

fn read_frame(r: &mut impl Read) -> anyhow::Result<(FrameType, Vec<u8>)> {
    Ok(wire::read_frame(r)?)
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
