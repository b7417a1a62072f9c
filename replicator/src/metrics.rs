//! The replicator's live numbers: per group counters that the session's writer loop updates
//! (atomics, never the group's lock), the rates that `status.json` carries for
//! `replicator status`, and the Prometheus text for `replicator serve --metrics ADDR`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use journal::metrics::{Exposition, Rate, Sampler, Value, Windows};
use journal::store::GroupDir;
use serde::{Deserialize, Serialize};

use crate::group::Group;

/// One group's counters since this replicator started (they survive reopening the group).
#[derive(Debug, Default)]
pub struct GroupStats {
    pub records_in: AtomicU64,
    /// Payload bytes of the data records ingested.
    pub bytes_in: AtomicU64,
    /// Bytes appended to the journal (records as stored).
    pub stored_in: AtomicU64,
    /// Commits (fdatasync of the journal, then the checkpoint): one per group commit.
    pub fsyncs: AtomicU64,
    pub durable_seq: AtomicU64,
    pub durable_time_ns: AtomicU64,
    /// When records were last ingested (0: not since the start).
    pub last_ingest_ns: AtomicU64,
    pub connected: AtomicBool,
    pub store_failed: AtomicBool,
    pub damaged: AtomicBool,
    samples: Mutex<Sampler<3>>,
}

/// Rates over one window, per second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupRates {
    /// The span actually measured (shorter than the window just after the start).
    pub seconds: f64,
    pub records_per_s: f64,
    /// Payload bytes of data records.
    pub bytes_per_s: f64,
    /// Group commits (each an fsync of the journal and of the checkpoint).
    pub fsyncs_per_s: f64,
}

impl From<Rate<3>> for GroupRates {
    fn from(r: Rate<3>) -> GroupRates {
        GroupRates {
            seconds: r.seconds,
            records_per_s: r.per_s[0],
            bytes_per_s: r.per_s[1],
            fsyncs_per_s: r.per_s[2],
        }
    }
}

impl GroupStats {
    /// What a group holds before any session of this process (its durable checkpoint).
    pub fn at_start(dir: &GroupDir) -> GroupStats {
        let stats = GroupStats::default();
        if let Ok(Some(c)) = dir.checkpoint() {
            stats.durable_seq.store(c.last_seq, Ordering::Relaxed);
            stats
                .durable_time_ns
                .store(c.last_time_ns, Ordering::Relaxed);
        }
        stats
    }

    /// Counts what `group` ingested since `before` (its `records_in`, `bytes_in`, `stored_in`).
    pub fn ingested(&self, before: (u64, u64, u64), group: &Group) {
        let (records, bytes, stored) = before;
        if group.records_in == records {
            return;
        }
        let add = |c: &AtomicU64, from: u64, to: u64| {
            c.fetch_add(to.saturating_sub(from), Ordering::Relaxed);
        };
        add(&self.records_in, records, group.records_in);
        add(&self.bytes_in, bytes, group.bytes_in);
        add(&self.stored_in, stored, group.stored_in);
        self.last_ingest_ns
            .store(journal::now_ns(), Ordering::Relaxed);
    }

    /// The group's durable position after a commit; `synced`: the commit made an fsync.
    pub fn committed(&self, group: &Group, synced: bool) {
        if synced {
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        self.durable_seq.store(group.durable_seq, Ordering::Relaxed);
        self.durable_time_ns
            .store(group.durable_time_ns, Ordering::Relaxed);
    }

    pub fn sample(&self) {
        let values = [
            self.records_in.load(Ordering::Relaxed),
            self.bytes_in.load(Ordering::Relaxed),
            self.fsyncs.load(Ordering::Relaxed),
        ];
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Instant::now(), values);
    }

    pub fn rates(&self) -> Windows<GroupRates> {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.windows(GroupRates::from)
    }
}

/// What the endpoint reports beside the groups.
#[derive(Debug, Clone, Copy)]
pub struct Server {
    pub connections: u64,
    pub max_connections: u64,
    pub retention_secs: Option<u64>,
    pub max_store_size: Option<u64>,
}

/// The groups (sorted by name) and the server in the Prometheus text format.
pub fn render(groups: &[(String, GroupDir, &GroupStats)], server: Server) -> String {
    let mut e = Exposition::default();
    e.gauge(
        "replicator_connections",
        "Connections open now (proxies, and clients still in their handshake).",
        &[],
        server.connections,
    );
    e.gauge(
        "replicator_max_connections",
        "Connections accepted at once (--max-connections).",
        &[],
        server.max_connections,
    );
    if let Some(secs) = server.retention_secs {
        e.gauge(
            "replicator_retention_seconds",
            "History kept (--retention); older records are folded into the base.",
            &[],
            secs,
        );
    }
    if let Some(size) = server.max_store_size {
        e.gauge(
            "replicator_max_store_size_bytes",
            "Size each group's store is kept under (--max-store-size), even inside the retention window.",
            &[],
            size,
        );
    }
    for (name, dir, s) in groups {
        let g = [("group", name.as_str())];
        let g = &g[..];
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let flag = |b: &AtomicBool| b.load(Ordering::Relaxed);
        let seconds = |c: &AtomicU64| load(c) as f64 / 1e9;
        for (name, help, c) in [
            (
                "replicator_records_ingested_total",
                "Records appended to the group's journal since the replicator started.",
                &s.records_in,
            ),
            (
                "replicator_ingested_bytes_total",
                "Payload bytes of the data records ingested since the replicator started.",
                &s.bytes_in,
            ),
            (
                "replicator_stored_bytes_total",
                "Bytes appended to the group's journal (records as stored, compressed) since the replicator started.",
                &s.stored_in,
            ),
            (
                "replicator_fsyncs_total",
                "Group commits (fsync of the journal, then of the durable checkpoint) since the replicator started.",
                &s.fsyncs,
            ),
        ] {
            e.counter(name, help, g, load(c));
        }
        for (name, help, v) in [
            (
                "replicator_proxy_connected",
                "1 while a proxy's session feeds the group.",
                Value::from(flag(&s.connected)),
            ),
            (
                "replicator_durable_seq",
                "Highest seq durable (and acknowledged) in the group's journal.",
                load(&s.durable_seq).into(),
            ),
            (
                "replicator_durable_timestamp_seconds",
                "Capture time (Unix) of the newest durable record.",
                seconds(&s.durable_time_ns).into(),
            ),
            (
                "replicator_last_ingest_timestamp_seconds",
                "When (Unix time) records were last ingested; 0 if not since the replicator started.",
                seconds(&s.last_ingest_ns).into(),
            ),
            (
                "replicator_store_failed",
                "1 while the store cannot take the group's records (full or failing disk, damage).",
                flag(&s.store_failed).into(),
            ),
            (
                "replicator_damaged",
                "1 when the group's journal is damaged before its checkpoint: it takes no records until `replicator repair`.",
                flag(&s.damaged).into(),
            ),
        ] {
            e.gauge(name, help, g, v);
        }
        if let Ok(size) = dir.disk_usage() {
            e.gauge(
                "replicator_store_size_bytes",
                "Disk space the group's store uses (base images, journal, kept hashes).",
                g,
                size,
            );
        }
        if let Some(u) = crate::upload::read_status(&dir.path) {
            crate::upload::metrics(&mut e, g, &u);
        }
    }
    e.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_as_prometheus_text() {
        let stats = GroupStats::default();
        stats.records_in.store(5, Ordering::Relaxed);
        stats.fsyncs.store(2, Ordering::Relaxed);
        stats.durable_seq.store(5, Ordering::Relaxed);
        stats.last_ingest_ns.store(1_500_000_000, Ordering::Relaxed);
        stats.damaged.store(true, Ordering::Relaxed);
        let other = GroupStats::default();
        let nowhere = std::path::Path::new("/nonexistent-store");
        let groups = [
            ("a".to_owned(), GroupDir::new(nowhere, "a"), &stats),
            ("b".to_owned(), GroupDir::new(nowhere, "b"), &other),
        ];
        let text = render(
            &groups,
            Server {
                connections: 1,
                max_connections: 64,
                retention_secs: Some(86400),
                max_store_size: None,
            },
        );
        for want in [
            "# TYPE replicator_records_ingested_total counter\n\
             replicator_records_ingested_total{group=\"a\"} 5\n\
             replicator_records_ingested_total{group=\"b\"} 0\n",
            "replicator_fsyncs_total{group=\"a\"} 2\n",
            "replicator_durable_seq{group=\"a\"} 5\n",
            "replicator_last_ingest_timestamp_seconds{group=\"a\"} 1.5\n",
            "replicator_damaged{group=\"a\"} 1\n",
            "replicator_damaged{group=\"b\"} 0\n",
            "replicator_retention_seconds 86400\n",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        // No size limit, no series for it; a store that cannot be measured has no size.
        assert!(!text.contains("replicator_max_store_size_bytes"), "{text}");
        assert!(!text.contains("replicator_store_size_bytes{"), "{text}");
    }
}
