//! `replicator status` and `replicator check`: read the store, never write it.

use std::path::Path;

use anyhow::Context;
use journal::metrics::mib_per_s;
use journal::pit::History;
use journal::store::{self, GroupDir};
use journal::units::human_bytes;
use serde::Serialize;

use crate::retention::RetentionState;
use crate::serve::LiveStatus;

#[derive(Debug, Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub volumes: Vec<journal::wire::Volume>,
    pub durable_seq: u64,
    /// History that restore can reach: from the base (oldest) to the newest record.
    pub oldest_seq: u64,
    pub oldest_time_ns: u64,
    pub newest_time_ns: u64,
    pub segments: usize,
    pub journal_bytes: u64,
    pub store_bytes: u64,
    pub bookmarks: Vec<String>,
    /// A seed or resync is open: the newest points are not consistent yet.
    pub syncing: bool,
    /// A record that does not read back where the journal is durable: history ends before it.
    pub damage: Option<String>,
    pub live: Option<LiveStatus>,
    /// The `replicator serve` that wrote `live` is still running.
    pub replicator_running: bool,
    pub retention: Option<RetentionState>,
    /// What `serve --store s3://` has uploaded from this (staging) store.
    pub upload: Option<crate::upload::UploadStatus>,
}

pub fn group_status(dir: &GroupDir) -> anyhow::Result<GroupStatus> {
    let history = History::load(dir)?;
    let mut status = GroupStatus {
        group: history.meta.name.clone(),
        volumes: history.meta.volumes.clone(),
        durable_seq: history.last_seq,
        oldest_seq: history.oldest_seq(),
        oldest_time_ns: history.oldest_time_ns(),
        newest_time_ns: history.last_time_ns,
        segments: history.segments.len(),
        journal_bytes: 0,
        store_bytes: dir.disk_usage()?,
        bookmarks: history.bookmarks.iter().map(|b| b.name.clone()).collect(),
        syncing: history.inconsistent.last().is_some_and(|w| w.end.is_none()),
        damage: history.damage.as_ref().map(|d| d.to_string()),
        live: store::read_json(&dir.path.join("status.json")).ok(),
        replicator_running: false,
        retention: store::read_json(&dir.path.join("retention.json")).ok(),
        upload: crate::upload::read_status(&dir.path),
    };
    status.replicator_running = status
        .live
        .as_ref()
        .is_some_and(|l| Path::new(&format!("/proc/{}", l.pid)).exists());
    for seg in &history.segments {
        status.journal_bytes += std::fs::metadata(&seg.path)?.len();
    }
    Ok(status)
}

pub fn status(store_dir: &Path, json: bool) -> anyhow::Result<()> {
    let groups = store::list_groups(store_dir)
        .with_context(|| format!("read store {}", store_dir.display()))?;
    let statuses = groups
        .iter()
        .map(group_status)
        .collect::<anyhow::Result<Vec<_>>>()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
        return Ok(());
    }
    if statuses.is_empty() {
        println!("store {}: no groups yet", store_dir.display());
    }
    for s in &statuses {
        println!("group {}", s.group);
        for v in &s.volumes {
            println!("  volume {:<12} {}", v.name, human_bytes(v.size));
        }
        let link = match &s.live {
            Some(l) if !s.replicator_running => format!(
                "replicator not running (last update {} ago)",
                ago(l.updated_ns)
            ),
            Some(l) if l.connected => format!(
                "connected from {} (updated {} ago)",
                l.peer.as_deref().unwrap_or("?"),
                ago(l.updated_ns)
            ),
            Some(l) => format!("no proxy connected (last update {} ago)", ago(l.updated_ns)),
            None => "never connected".into(),
        };
        println!("  link        {link}");
        if let Some(e) = s.live.as_ref().and_then(|l| l.store_error.as_ref()) {
            println!("  STORE ERROR {e}");
        }
        // As of the live status's last update (once a second while a proxy is connected).
        if let Some(l) = s.live.as_ref().filter(|_| s.replicator_running) {
            l.rates.print(
                "  ",
                |r| r.seconds,
                |r| {
                    format!(
                        "{:.0} records/s, {} ingested, {:.0} fsyncs/s",
                        r.records_per_s,
                        mib_per_s(r.bytes_per_s),
                        r.fsyncs_per_s
                    )
                },
            );
        }
        println!("  durable seq {}", s.durable_seq);
        println!(
            "  history     seq {}..{}, {} ({} to {})",
            s.oldest_seq,
            s.durable_seq,
            span(s.oldest_time_ns, s.newest_time_ns),
            time(s.oldest_time_ns),
            time(s.newest_time_ns)
        );
        if let Some(d) = &s.damage {
            println!("  DAMAGED     {d}");
        }
        if s.syncing {
            println!(
                "  consistency a seed or resync is running: newest points are not consistent yet"
            );
        }
        println!(
            "  store       {} ({} in {} journal segments)",
            human_bytes(s.store_bytes),
            human_bytes(s.journal_bytes),
            s.segments
        );
        if let Some(r) = &s.retention {
            let target = r
                .retention_secs
                .map(|t| format!("{t} s"))
                .unwrap_or_else(|| "none".into());
            println!(
                "  retention   target {target}, {} segments folded{}",
                r.folded_segments,
                if r.history_below_target {
                    "; WARNING: --max-store-size keeps history below the target"
                } else {
                    ""
                }
            );
        }
        if !s.bookmarks.is_empty() {
            println!("  bookmarks   {}", s.bookmarks.join(", "));
        }
        if let Some(u) = &s.upload {
            crate::upload::print_status(u, s.newest_time_ns);
        }
    }
    Ok(())
}

fn ago(ns: u64) -> String {
    let d = journal::now_ns().saturating_sub(ns) / 1_000_000;
    format!("{}.{:03} s", d / 1000, d % 1000)
}

fn span(a: u64, b: u64) -> String {
    let s = b.saturating_sub(a) / 1_000_000_000;
    format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
}

fn time(ns: u64) -> String {
    journal::pit::format_time(ns)
}
