//! The proxy's live numbers: rates for `nbd-proxy status`, and the Prometheus endpoint
//! (`--metrics ADDR`). A sampler thread reads the capture's counters every
//! [`SAMPLE_PERIOD`] and, when the endpoint is on, takes a [`Status`] snapshot that scrapes
//! render: a scrape never touches the sequencer's lock or anything else on the data path.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use journal::metrics::{Exposition, Rate, Sampler, Windows, SAMPLE_PERIOD};
use serde::{Deserialize, Serialize};

use crate::capture::Stats;
use crate::control::{Control, Status};

/// The counters behind the rates, in this order.
const GUEST_WRITES: usize = 0;
const GUEST_WRITE_BYTES: usize = 1;
const RECORDS: usize = 2;
const RECORDS_ACKED: usize = 3;
const BYTES_SHIPPED: usize = 4;

fn counters(s: &Stats) -> [u64; 5] {
    let mut v = [0; 5];
    v[GUEST_WRITES] = s.guest_writes.load(Ordering::Relaxed);
    v[GUEST_WRITE_BYTES] = s.guest_write_bytes.load(Ordering::Relaxed);
    v[RECORDS] = s.records.load(Ordering::Relaxed);
    v[RECORDS_ACKED] = s.records_acked.load(Ordering::Relaxed);
    v[BYTES_SHIPPED] = s.bytes_shipped.load(Ordering::Relaxed);
    v
}

/// Rates over one window, per second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// The span actually measured (shorter than the window just after the start).
    pub seconds: f64,
    /// Guest WRITE requests completed.
    pub guest_write_iops: f64,
    pub guest_write_bytes_per_s: f64,
    /// Records numbered into the change log (writes, zeroes, trims, flushes, sync chunks).
    pub records_captured_per_s: f64,
    /// Records the replicator acknowledged as durable.
    pub records_acked_per_s: f64,
    /// Batch bytes written to the replicator.
    pub bytes_shipped_per_s: f64,
}

impl From<Rate<5>> for Rates {
    fn from(r: Rate<5>) -> Rates {
        Rates {
            seconds: r.seconds,
            guest_write_iops: r.per_s[GUEST_WRITES],
            guest_write_bytes_per_s: r.per_s[GUEST_WRITE_BYTES],
            records_captured_per_s: r.per_s[RECORDS],
            records_acked_per_s: r.per_s[RECORDS_ACKED],
            bytes_shipped_per_s: r.per_s[BYTES_SHIPPED],
        }
    }
}

/// Samples kept for rates, and the snapshot scrapes render.
#[derive(Debug, Default)]
pub struct Live {
    samples: Mutex<Sampler<5>>,
    snapshot: Mutex<Option<String>>,
}

impl Live {
    pub fn rates(&self) -> Windows<Rates> {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.windows(Rates::from)
    }

    /// What a scrape answers: the text rendered from the newest snapshot.
    pub fn scrape(&self) -> String {
        self.snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

/// Samples the counters every [`SAMPLE_PERIOD`] for as long as the process runs; with
/// `snapshots`, also renders the status for the metrics endpoint.
pub fn start(control: Arc<Control>, snapshots: bool) -> std::io::Result<()> {
    let sample = move || {
        let values = counters(&control.capture.stats);
        control
            .live
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Instant::now(), values);
        if snapshots {
            let text = render(&control.status());
            *control
                .live
                .snapshot
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(text);
        }
    };
    sample();
    std::thread::Builder::new()
        .name("sampler".into())
        .spawn(move || loop {
            std::thread::sleep(SAMPLE_PERIOD);
            sample();
        })?;
    Ok(())
}

/// The status in the Prometheus text format; every series carries the group's name.
pub fn render(s: &Status) -> String {
    let mut e = Exposition::default();
    let g = [("group", s.group.as_str())];
    let g = &g[..];
    e.gauge(
        "nbd_proxy_info",
        "Always 1; the labels say how the proxy replicates.",
        &[
            ("group", &s.group),
            ("replicator", &s.replicator),
            ("mode", &s.mode),
            ("on_full", &s.on_full),
        ],
        1u64,
    );
    e.gauge(
        "nbd_proxy_link_connected",
        "1 while a session with the replicator is established.",
        g,
        s.link == "connected",
    );
    e.counter(
        "nbd_proxy_link_connects_total",
        "Sessions with the replicator established since the start.",
        g,
        s.link_connects,
    );
    e.gauge(
        "nbd_proxy_captured_seq",
        "Highest seq numbered so far.",
        g,
        s.captured_seq,
    );
    e.gauge(
        "nbd_proxy_durable_seq",
        "Highest seq the replicator acknowledged as durable.",
        g,
        s.durable_seq,
    );
    e.gauge(
        "nbd_proxy_lag_records",
        "Records captured but not yet durable at the replicator (what a disaster would lose).",
        g,
        s.lag_seq,
    );
    e.gauge(
        "nbd_proxy_lag_bytes",
        "Bytes of records not yet durable at the replicator.",
        g,
        s.lag_bytes,
    );
    e.gauge(
        "nbd_proxy_lag_seconds",
        "Age of the oldest record not yet durable at the replicator (0 when caught up): the RPO now.",
        g,
        s.lag_ms as f64 / 1000.0,
    );
    for (name, q, v) in [
        ("nbd_proxy_lag_p50_seconds", "median", s.lag_p50_ms),
        ("nbd_proxy_lag_p99_seconds", "99th percentile", s.lag_p99_ms),
        ("nbd_proxy_lag_max_seconds", "maximum", s.lag_max_ms),
    ] {
        e.gauge(
            name,
            &format!(
                "Capture-to-durable-ack time of the oldest record of each recent acknowledgement \
                 (the last 4096), {q}."
            ),
            g,
            v / 1000.0,
        );
    }
    e.gauge(
        "nbd_proxy_change_log_used_bytes",
        "Change log memory holding records not yet acknowledged.",
        g,
        s.log_used,
    );
    e.gauge(
        "nbd_proxy_change_log_capacity_bytes",
        "Change log capacity (--log-capacity).",
        g,
        s.log_capacity,
    );
    e.counter(
        "nbd_proxy_records_total",
        "Records numbered into the change log since the start.",
        g,
        s.records,
    );
    e.counter(
        "nbd_proxy_records_acked_total",
        "Records the replicator acknowledged as durable since the start.",
        g,
        s.records_acked,
    );
    e.counter(
        "nbd_proxy_shipped_bytes_total",
        "Batch bytes written to the replicator since the start (resends included).",
        g,
        s.bytes_shipped,
    );
    e.counter(
        "nbd_proxy_guest_writes_total",
        "Guest WRITE requests completed since the start.",
        g,
        s.guest_writes,
    );
    e.counter(
        "nbd_proxy_guest_write_bytes_total",
        "Bytes of guest WRITE requests completed since the start.",
        g,
        s.guest_write_bytes,
    );
    e.gauge(
        "nbd_proxy_tracking_live",
        "1 while every change is recorded; 0 while changes only mark dirty chunks (log overflow, before the first contact).",
        g,
        s.tracking == "live",
    );
    e.counter(
        "nbd_proxy_change_log_overflows_total",
        "Times the change log filled and changes went to dirty chunks (--on-full bitmap).",
        g,
        s.log_overflows,
    );
    e.counter(
        "nbd_proxy_changes_not_recorded_total",
        "Changes kept only as dirty chunks (resent by a resync, not each a point in history).",
        g,
        s.changes_not_recorded,
    );
    e.gauge(
        "nbd_proxy_dirty_chunks",
        "256 KiB chunks changed without a record, waiting for a resync.",
        g,
        s.dirty_chunks,
    );
    e.gauge(
        "nbd_proxy_dirty_bytes",
        "Bytes of the dirty chunks.",
        g,
        s.dirty_bytes,
    );
    e.gauge(
        "nbd_proxy_sync_running",
        "1 while a seed or resync runs (points are not consistent until it ends).",
        g,
        s.sync_running,
    );
    e.gauge(
        "nbd_proxy_sync_chunks_done",
        "Chunks the running (or last) sync has handled.",
        g,
        s.sync_chunks_done,
    );
    e.gauge(
        "nbd_proxy_sync_chunks",
        "Chunks the running (or last) sync has to handle.",
        g,
        s.sync_chunks_total,
    );
    e.counter(
        "nbd_proxy_syncs_completed_total",
        "Seeds and resyncs completed since the start.",
        g,
        s.syncs_completed,
    );
    e.counter(
        "nbd_proxy_sync_read_failures_total",
        "Chunks a sync could not read from the disks (retried).",
        g,
        s.sync_read_failures,
    );
    e.gauge(
        "nbd_proxy_writeback_swept",
        "1 while the proxy sweeps its disks' dirty pages to disk (the replicator's store shares a \
         disk with them, or --writeback sweep), 0 while the kernel writes them back.",
        g,
        s.writeback_swept,
    );
    e.gauge(
        "nbd_proxy_sync_degraded",
        "1 while --mode sync is degraded to async (the replicator was away longer than --sync-timeout).",
        g,
        s.sync_degraded,
    );
    e.gauge(
        "nbd_proxy_activity_log_extents",
        "4 MiB extents the activity log marks as possibly not yet at the replicator.",
        g,
        s.activity_log_extents,
    );
    for d in &s.disks {
        e.gauge(
            "nbd_proxy_disk_size_bytes",
            "Size of each disk (export) of the group.",
            &[("group", &s.group), ("disk", &d.name), ("path", &d.path)],
            d.size,
        );
    }
    e.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::DiskStatus;

    #[test]
    fn status_as_prometheus_text() {
        let s = Status {
            group: "web".into(),
            link: "connected".into(),
            tracking: "live".into(),
            captured_seq: 12,
            records: 12,
            lag_ms: 1500,
            lag_p99_ms: 4.5,
            log_capacity: 1 << 20,
            disks: vec![DiskStatus {
                name: "root".into(),
                path: "/vms/a \"b\"\\c".into(),
                size: 4096,
            }],
            ..Status::default()
        };
        let text = render(&s);
        for line in [
            "# TYPE nbd_proxy_records_total counter\nnbd_proxy_records_total{group=\"web\"} 12\n",
            "# TYPE nbd_proxy_captured_seq gauge\nnbd_proxy_captured_seq{group=\"web\"} 12\n",
            "nbd_proxy_link_connected{group=\"web\"} 1\n",
            "nbd_proxy_tracking_live{group=\"web\"} 1\n",
            "nbd_proxy_lag_seconds{group=\"web\"} 1.5\n",
            "nbd_proxy_lag_p99_seconds{group=\"web\"} 0.0045\n",
            "nbd_proxy_change_log_capacity_bytes{group=\"web\"} 1048576\n",
            "nbd_proxy_disk_size_bytes{group=\"web\",disk=\"root\",path=\"/vms/a \\\"b\\\"\\\\c\"} 4096\n",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
        // Each family once, each with HELP then TYPE.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
        let mut names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap_or_default())
            .collect();
        let all = names.len();
        names.dedup();
        assert_eq!(names.len(), all);
    }
}
