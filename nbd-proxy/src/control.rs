//! The control socket: `nbd-proxy status` and `nbd-proxy bookmark` talk to a running proxy
//! through it, one JSON request line and one JSON reply line per connection.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use journal::metrics::{mib_per_s, Windows};
use journal::record::Kind;
use journal::units::human_bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::capture::Capture;
use crate::disk::CaptureBackend;
use crate::metrics::Rates;
use crate::ship::{lag_percentiles, LinkInfo};
use nbd_server::BlockBackend;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Status,
    Bookmark { name: String, timeout_ms: u64 },
}

#[derive(Debug)]
pub struct Control {
    pub group: String,
    pub replicator: String,
    pub capture: Arc<Capture>,
    pub disks: Vec<(String, String, Arc<CaptureBackend>)>,
    pub link: Arc<Mutex<LinkInfo>>,
    pub writeback: Arc<crate::writeback::Policy>,
    /// Counter samples for rates (and the metrics endpoint's snapshot).
    pub live: crate::metrics::Live,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub group: String,
    pub replicator: String,
    pub mode: String,
    pub on_full: String,
    pub link: String,
    pub link_since_ns: u64,
    pub link_error: Option<String>,
    /// Sessions established since the start.
    #[serde(default)]
    pub link_connects: u64,
    pub captured_seq: u64,
    pub durable_seq: u64,
    pub lag_seq: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub log_capacity: u64,
    pub log_used: u64,
    pub tracking: String,
    /// Times the change log filled since the start (`--on-full bitmap`).
    #[serde(default)]
    pub log_overflows: u64,
    /// Changes since the start kept only as dirty chunks (log full, before the first contact,
    /// after a refusal): a resync sends their ranges, none is its own point in history.
    #[serde(default)]
    pub changes_not_recorded: u64,
    pub dirty_chunks: u64,
    pub dirty_bytes: u64,
    pub sync_running: bool,
    pub sync_chunks_done: u64,
    pub sync_chunks_total: u64,
    pub sync_chunks_unchanged: u64,
    pub sync_bytes_sent: u64,
    pub syncs_completed: u64,
    /// Chunks a sync could not read from the disks (its window stays open; it retries).
    #[serde(default)]
    pub sync_read_failures: u64,
    /// Sync mode is degraded to async: the replicator was away longer than --sync-timeout.
    #[serde(default)]
    pub sync_degraded: bool,
    /// The last record the replicator refused (dropped, and its range resynchronized).
    #[serde(default)]
    pub last_refusal: Option<String>,
    pub records: u64,
    /// Records the replicator acknowledged as durable since the start.
    #[serde(default)]
    pub records_acked: u64,
    /// Batch bytes written to the replicator since the start.
    #[serde(default)]
    pub bytes_shipped: u64,
    /// Guest WRITE requests completed since the start, and their bytes.
    #[serde(default)]
    pub guest_writes: u64,
    #[serde(default)]
    pub guest_write_bytes: u64,
    /// Per-second rates over the last 1 s and 10 s (sampled 4 times a second).
    #[serde(default)]
    pub rates: Windows<Rates>,
    /// Extents the activity log marks as possibly not yet at the replicator.
    pub activity_log_extents: u64,
    /// Who writes the disks' dirty pages back, and why (`--writeback`).
    #[serde(default)]
    pub writeback: String,
    /// Whether the proxy sweeps them now (else the kernel writes them back).
    #[serde(default)]
    pub writeback_swept: bool,
    pub disks: Vec<DiskStatus>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DiskStatus {
    pub name: String,
    pub path: String,
    pub size: u64,
}

impl Control {
    pub fn status(&self) -> Status {
        let c = &self.capture;
        let link = self.link.lock().map(|l| l.clone()).unwrap_or_default();
        let captured = c.last_seq();
        let durable = *c.acked.borrow();
        let oldest = c.stats.oldest_unacked_ns.load(Ordering::Relaxed);
        // From the oldest record not yet durable: it grows while the replicator is away.
        let lag_ms = if captured > durable && oldest > 0 {
            journal::now_ns().saturating_sub(oldest) / 1_000_000
        } else {
            0
        };
        let (p50, p99, max) = lag_percentiles(c);
        let (writeback_swept, writeback) = self.writeback.describe();
        let dirty = c.dirty_chunks();
        Status {
            group: self.group.clone(),
            replicator: self.replicator.clone(),
            mode: format!("{:?}", c.mode).to_lowercase(),
            on_full: format!("{:?}", c.on_full).to_lowercase(),
            link: link.state.to_owned(),
            link_since_ns: link.since_ns,
            link_error: link.last_error,
            link_connects: link.connects,
            captured_seq: captured,
            durable_seq: durable,
            lag_seq: captured.saturating_sub(durable),
            lag_bytes: c.log_bytes.load(Ordering::Relaxed),
            lag_ms,
            lag_p50_ms: p50,
            lag_p99_ms: p99,
            lag_max_ms: max,
            log_capacity: c.capacity,
            log_used: c.log_bytes.load(Ordering::Relaxed),
            tracking: if c.is_live() { "live" } else { "dirty-chunks" }.into(),
            log_overflows: c.stats.log_overflows.load(Ordering::Relaxed),
            changes_not_recorded: c.stats.dirty_marked.load(Ordering::Relaxed),
            dirty_chunks: dirty,
            dirty_bytes: dirty * journal::wire::HASH_CHUNK,
            sync_running: c.syncing.load(Ordering::Relaxed),
            sync_chunks_done: c.stats.sync_chunks_done.load(Ordering::Relaxed),
            sync_chunks_total: c.stats.sync_chunks_total.load(Ordering::Relaxed),
            sync_chunks_unchanged: c.stats.sync_chunks_skipped.load(Ordering::Relaxed),
            sync_bytes_sent: c.stats.sync_bytes_sent.load(Ordering::Relaxed),
            syncs_completed: c.stats.syncs_completed.load(Ordering::Relaxed),
            sync_read_failures: c.stats.sync_read_failures.load(Ordering::Relaxed),
            sync_degraded: c.degraded.load(Ordering::Relaxed),
            last_refusal: c.stats.last_refusal.lock().ok().and_then(|l| l.clone()),
            records: c.stats.records.load(Ordering::Relaxed),
            records_acked: c.stats.records_acked.load(Ordering::Relaxed),
            bytes_shipped: c.stats.bytes_shipped.load(Ordering::Relaxed),
            guest_writes: c.stats.guest_writes.load(Ordering::Relaxed),
            guest_write_bytes: c.stats.guest_write_bytes.load(Ordering::Relaxed),
            rates: self.live.rates(),
            activity_log_extents: c.activity.as_ref().map_or(0, |al| al.hot_count()),
            writeback,
            writeback_swept,
            disks: self
                .disks
                .iter()
                .map(|(name, path, b)| DiskStatus {
                    name: name.clone(),
                    path: path.clone(),
                    size: b.file.size_bytes(),
                })
                .collect(),
        }
    }

    /// Flushes every disk, then places a named record; waits until the replicator has it.
    async fn bookmark(&self, name: &str, timeout: Duration) -> Result<serde_json::Value, String> {
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err("a bookmark name needs 1 to 200 printable characters".into());
        }
        if self.capture.syncing.load(Ordering::Acquire) {
            let st = &self.capture.stats;
            return Err(format!(
                "a seed or resync is running ({} of {} chunks): the disks at the replicator are \
                 not a state the VM was in until it ends, so a bookmark now could never be \
                 restored. Retry once `nbd-proxy status` shows no sync running",
                st.sync_chunks_done.load(Ordering::Relaxed),
                st.sync_chunks_total.load(Ordering::Relaxed)
            ));
        }
        if !self.capture.is_live() {
            return Err(
                "replication is not live (the change log overflowed or the replicator was never reached); \
                 a bookmark now would not be a consistent point. Wait for the resync (nbd-proxy status) and retry"
                    .into(),
            );
        }
        for (disk, _, backend) in &self.disks {
            use nbd_server::BlockBackend;
            backend
                .file
                .flush()
                .await
                .map_err(|e| format!("flush disk {disk}: {e}"))?;
        }
        let Some(seq) = self.capture.push_control(crate::record::Record::control(
            Kind::Bookmark,
            0,
            0,
            0,
            name,
        )) else {
            return Err("replication stopped being live while flushing; retry".into());
        };
        info!(bookmark = name, seq, "bookmark placed");
        let durable = tokio::time::timeout(timeout, self.capture.durable(seq))
            .await
            .is_ok();
        Ok(serde_json::json!({ "ok": true, "seq": seq, "name": name, "durable": durable }))
    }
}

pub async fn serve(listener: UnixListener, control: Arc<Control>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let control = control.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(Request::Status) => serde_json::to_value(control.status()).unwrap_or_default(),
                Ok(Request::Bookmark { name, timeout_ms }) => {
                    match control
                        .bookmark(&name, Duration::from_millis(timeout_ms))
                        .await
                    {
                        Ok(v) => v,
                        Err(e) => serde_json::json!({ "ok": false, "error": e }),
                    }
                }
                Err(e) => serde_json::json!({ "ok": false, "error": format!("bad request: {e}") }),
            };
            let mut out = reply.to_string();
            out.push('\n');
            if let Err(e) = write.write_all(out.as_bytes()).await {
                warn!("control reply: {e}");
            }
        });
    }
}

/// Client side: sends one request to a running proxy and returns its reply.
pub fn request(socket: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connect to the proxy's control socket {} (is nbd-proxy running with --control?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply)?;
    serde_json::from_str(&reply).context("read the proxy's reply")
}

pub fn print_status(s: &Status) {
    let since = journal::now_ns().saturating_sub(s.link_since_ns) / 1_000_000_000;
    println!(
        "group       {} (mode {}, on full: {})",
        s.group, s.mode, s.on_full
    );
    println!(
        "replicator  {} — link {} for {since} s{}",
        s.replicator,
        s.link,
        s.link_error
            .as_ref()
            .filter(|_| s.link != "connected")
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    println!(
        "lag         {} records, {}, {} ms (recent p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms)",
        s.lag_seq,
        human_bytes(s.lag_bytes),
        s.lag_ms,
        s.lag_p50_ms,
        s.lag_p99_ms,
        s.lag_max_ms
    );
    s.rates.print(
        "",
        |r| r.seconds,
        |r| {
            format!(
                "guest {:.0} writes/s ({}); records {:.0}/s captured, {:.0}/s acknowledged; shipped {}",
                r.guest_write_iops,
                mib_per_s(r.guest_write_bytes_per_s),
                r.records_captured_per_s,
                r.records_acked_per_s,
                mib_per_s(r.bytes_shipped_per_s)
            )
        },
    );
    println!(
        "seq         captured {}, durable at replicator {}",
        s.captured_seq, s.durable_seq
    );
    println!(
        "change log  {} of {} ({:.0}% full){}",
        human_bytes(s.log_used),
        human_bytes(s.log_capacity),
        s.log_used as f64 * 100.0 / s.log_capacity.max(1) as f64,
        match s.log_overflows {
            0 => String::new(),
            n => format!(
                "; filled {n} time{} since the start ({} changes in all kept only as dirty \
                 chunks: a resync sends their ranges, history has no point between them)",
                if n == 1 { "" } else { "s" },
                s.changes_not_recorded
            ),
        }
    );
    if s.tracking != "live" {
        println!(
            "tracking    DIRTY CHUNKS: {} chunks ({}) changed without records; a resync will send them",
            s.dirty_chunks,
            human_bytes(s.dirty_bytes)
        );
    }
    if s.sync_degraded {
        println!(
            "sync mode   DEGRADED to async: the replicator was away longer than --sync-timeout; \
             writes are acknowledged before they are replicated until it catches up"
        );
    }
    if let Some(r) = &s.last_refusal {
        println!("refused     the replicator refused record {r} (dropped and resynchronized)");
    }
    if s.sync_read_failures > 0 {
        println!(
            "sync errors {} chunks could not be read from the disks; the resync retries them",
            s.sync_read_failures
        );
    }
    if s.sync_running {
        println!(
            "sync        {} of {} chunks ({} unchanged, {} sent); points are not consistent until it ends",
            s.sync_chunks_done,
            s.sync_chunks_total,
            s.sync_chunks_unchanged,
            human_bytes(s.sync_bytes_sent)
        );
    } else {
        println!("sync        none running ({} completed)", s.syncs_completed);
    }
    if !s.writeback.is_empty() {
        println!("writeback   {}", s.writeback);
    }
    for d in &s.disks {
        println!(
            "disk        {} = {} ({})",
            d.name,
            d.path,
            human_bytes(d.size)
        );
    }
}
