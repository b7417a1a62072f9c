//! `replicator serve`: one thread per proxy connection. A connection's reader thread hands
//! batches to its writer loop, which appends them, commits (fsync) whenever no more input is
//! waiting (group commit), acknowledges the durable seq, then applies to the head images.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, TryRecvError};
use journal::store::{self, GroupDir};
use journal::wire::{self, FrameType, Hello, Welcome};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::group::Group;
use crate::retention::{self, Retention};

#[derive(Debug, Clone)]
pub struct Options {
    pub store: PathBuf,
    pub segment_size: u64,
    pub retention: Retention,
}

/// A group known to this server: its store (when open) and its current connection.
#[derive(Debug, Default)]
struct Slot {
    group: Mutex<Option<Group>>,
    connection: Mutex<Option<TcpStream>>,
    retention_started: Mutex<bool>,
}

type Slots = Arc<Mutex<HashMap<String, Arc<Slot>>>>;

pub fn serve(listener: TcpListener, opts: Options) -> anyhow::Result<()> {
    let slots: Slots = Arc::default();
    let opts = Arc::new(opts);
    for conn in listener.incoming() {
        let stream = match conn {
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
        let (slots, opts) = (slots.clone(), opts.clone());
        std::thread::Builder::new()
            .name(format!("conn {peer}"))
            .spawn(move || match handle(stream, &peer, &slots, &opts) {
                Err(e) if is_disconnect(&e) => {
                    debug!(%peer, "connection closed: {e:#}")
                }
                Err(e) => warn!(%peer, "connection ended: {e:#}"),
                Ok(()) => {}
            })?;
    }
    Ok(())
}

fn read_frame(r: &mut impl Read) -> anyhow::Result<(FrameType, Vec<u8>)> {
    Ok(wire::read_frame(r)?)
}

fn handle(mut stream: TcpStream, peer: &str, slots: &Slots, opts: &Options) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (kind, body) = read_frame(&mut stream).context("read hello")?;
    let hello = match Hello::decode(&wire::Frame { kind, body: &body }) {
        Ok(h) => h,
        Err(e) => {
            let _ = stream.write_all(&wire::error(&e.to_string()));
            return Err(e.into());
        }
    };
    if hello.protocol != wire::PROTOCOL {
        let msg = format!(
            "protocol {} is not supported (this replicator speaks {})",
            hello.protocol,
            wire::PROTOCOL
        );
        let _ = stream.write_all(&wire::error(&msg));
        bail!(msg);
    }
    if !store::valid_group_name(&hello.group) {
        let msg = format!(
            "group name {:?} is not allowed (letters, digits, '-', '_', '.')",
            hello.group
        );
        let _ = stream.write_all(&wire::error(&msg));
        bail!(msg);
    }
    stream.set_read_timeout(None)?;
    let slot = slots
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .entry(hello.group.clone())
        .or_default()
        .clone();
    // A new connection for a group replaces the old one (the proxy reconnected).
    if let Some(old) = slot
        .connection
        .lock()
        .map_err(poison)?
        .replace(stream.try_clone()?)
    {
        info!(group = %hello.group, "closing the group's previous connection");
        let _ = old.shutdown(Shutdown::Both);
    }
    let mut guard = slot.group.lock().map_err(poison)?;
    if guard.is_none() {
        let dir = GroupDir::new(&opts.store, &hello.group);
        match Group::open(dir, &hello.group, &hello.volumes, opts.segment_size) {
            Ok((g, known)) => {
                info!(
                    group = %hello.group,
                    durable_seq = g.durable_seq,
                    "{} group opened",
                    if known { "known" } else { "new" }
                );
                *guard = Some(g);
            }
            Err(e) => {
                let _ = stream.write_all(&wire::error(&format!("{e:#}")));
                return Err(e);
            }
        }
    }
    let Some(group) = guard.as_mut() else {
        bail!("group not open");
    };
    if let Err(e) = crate::group::check_volumes(&group.dir, &group.meta, &hello.volumes) {
        let _ = stream.write_all(&wire::error(&format!("{e:#}")));
        return Err(e);
    }
    start_retention(&slot, group, opts);
    let known = group.records_in > 0 || group.durable_seq > 0;
    info!(
        group = %hello.group, %peer, durable_seq = group.durable_seq,
        "proxy connected{}", if hello.want_hashes { "; sending image hashes" } else { "" }
    );
    stream.write_all(
        &Welcome {
            protocol: wire::PROTOCOL,
            known,
            durable_seq: group.durable_seq,
        }
        .encode(),
    )?;
    if hello.want_hashes {
        send_hashes(&mut stream, group)?;
    }
    write_status(group, Some(peer));
    let (tx, rx) = bounded::<Vec<u8>>(16);
    let mut reader = stream.try_clone()?;
    let reader_thread = std::thread::spawn(move || -> anyhow::Result<()> {
        loop {
            let (kind, body) = read_frame(&mut reader)?;
            match kind {
                FrameType::Batch => {
                    if tx.send(body).is_err() {
                        return Ok(());
                    }
                }
                FrameType::Error => {
                    bail!("proxy reported: {}", String::from_utf8_lossy(&body))
                }
                other => bail!("unexpected {other:?} frame from the proxy"),
            }
        }
    });
    let result = ingest_loop(&mut stream, group, &rx, peer);
    let _ = stream.shutdown(Shutdown::Both);
    drop(rx);
    let read_end = reader_thread.join();
    // Whatever happened, what was appended becomes durable before the group is released.
    let committed = group.commit();
    let _ = group.sync_heads();
    write_status(group, None);
    committed?;
    match result {
        Ok(()) => {}
        Err(e) => return Err(e),
    }
    match read_end {
        Ok(Err(e)) if !is_disconnect(&e) => Err(e),
        _ => {
            info!(group = %group.meta.name, %peer, durable_seq = group.durable_seq, "proxy disconnected");
            Ok(())
        }
    }
}

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

fn send_hashes(stream: &mut TcpStream, group: &Group) -> anyhow::Result<()> {
    for disk in 0..group.meta.volumes.len() {
        let hashes = group.head_hashes(disk)?;
        for (i, part) in hashes.chunks(wire::HASHES_PER_FRAME).enumerate() {
            let frame = wire::Hashes {
                disk: disk as u16,
                first_chunk: (i * wire::HASHES_PER_FRAME) as u64,
                hashes: part.to_vec(),
            };
            stream.write_all(&frame.encode())?;
        }
    }
    stream.write_all(&wire::frame(FrameType::HashesDone, &[]))?;
    Ok(())
}

fn ingest_loop(
    stream: &mut TcpStream,
    group: &mut Group,
    rx: &Receiver<Vec<u8>>,
    peer: &str,
) -> anyhow::Result<()> {
    let mut last_status = Instant::now();
    let mut acked = group.durable_seq;
    loop {
        let body = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(body) => body,
            Err(RecvTimeoutError::Timeout) => {
                // An idle link: keep the status fresh.
                write_status(group, Some(peer));
                last_status = Instant::now();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        ingest(stream, group, &body)?;
        // Group commit: take whatever else has arrived, then one fsync for all of it.
        loop {
            if group.should_commit() {
                break;
            }
            match rx.try_recv() {
                Ok(body) => ingest(stream, group, &body)?,
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
        let durable = group.commit()?;
        if durable != acked {
            stream.write_all(&wire::ack(durable))?;
            acked = durable;
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            write_status(group, Some(peer));
            last_status = Instant::now();
        }
    }
}

fn ingest(stream: &mut TcpStream, group: &mut Group, body: &[u8]) -> anyhow::Result<()> {
    if let Err(e) = group.ingest(body) {
        let _ = stream.write_all(&wire::error(&format!("{e:#}")));
        return Err(e.context("refused a batch"));
    }
    Ok(())
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
    let head = group.head_applied();
    std::thread::spawn(move || retention::run(dir, meta, policy, head));
}

/// The live part of `replicator status`, written to the group's status.json.
#[derive(Debug, Serialize, serde::Deserialize)]
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
}

fn write_status(group: &Group, peer: Option<&str>) {
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
    };
    if let Err(e) = store::write_json_atomic(&group.dir.path.join("status.json"), &status) {
        warn!("write status: {e}");
    }
}
