//! `replicator status` and `replicator check`: read the store, never write it.

use std::path::Path;

use anyhow::Context;
use journal::pit::History;
use journal::segment::ScanStop;
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

/// Verifies every record of every group; returns the number of problems found.
pub fn check(store_dir: &Path) -> anyhow::Result<usize> {
    let groups = store::list_groups(store_dir)
        .with_context(|| format!("read store {}", store_dir.display()))?;
    let mut problems = 0;
    for dir in &groups {
        let meta = dir.meta()?;
        let base = dir.mark("base")?;
        let mut expected = None::<u64>;
        let mut records = 0u64;
        let mut bytes = 0u64;
        for v in &meta.volumes {
            for which in ["base", "head"] {
                let p = dir.image(which, &v.name);
                match std::fs::metadata(&p) {
                    Ok(m) if m.len() == v.size => {}
                    Ok(m) => {
                        problems += 1;
                        println!(
                            "BAD  {}: {} bytes, expected {}",
                            p.display(),
                            m.len(),
                            v.size
                        );
                    }
                    Err(e) => {
                        problems += 1;
                        println!("BAD  {}: {e}", p.display());
                    }
                }
            }
        }
        for seg in dir.segments()? {
            let mut bad_payload = None;
            let scan = match seg.scan(|r, pos| {
                if bad_payload.is_none() && r.header.kind.carries_data() {
                    if let Err(e) = r.payload() {
                        bad_payload = Some((pos, r.header.seq, e));
                    }
                }
            }) {
                Ok(s) => s,
                Err(e) => {
                    problems += 1;
                    println!("BAD  group {}: {e}", meta.name);
                    continue;
                }
            };
            if let Some(first) = scan.entries.first() {
                if let Some(exp) = expected {
                    if first.seq != exp && first.seq > base.seq {
                        problems += 1;
                        println!(
                            "BAD  group {}: {} starts at seq {} but seq {} was expected (records missing)",
                            meta.name,
                            seg.path.display(),
                            first.seq,
                            exp
                        );
                    }
                }
            }
            if let Some(last) = scan.entries.last() {
                expected = Some(last.seq + 1);
            }
            records += scan.entries.len() as u64;
            bytes += scan.valid_len;
            if let Some((pos, seq, e)) = bad_payload {
                problems += 1;
                println!(
                    "BAD  group {}: {} at byte {pos}: record seq {seq}: {e}",
                    meta.name,
                    seg.path.display()
                );
            }
            if let Some((pos, why)) = &scan.stop {
                problems += 1;
                let after = scan
                    .entries
                    .last()
                    .map(|e| format!(" (after seq {})", e.seq))
                    .unwrap_or_default();
                let hint = if matches!(why, ScanStop::Truncated) {
                    "; a torn tail is cut off when `replicator serve` starts"
                } else {
                    ""
                };
                println!(
                    "BAD  group {}: {} at byte {pos}{after}: {why}{hint}",
                    meta.name,
                    seg.path.display()
                );
            }
            if seg.index_path().exists() {
                let len = std::fs::metadata(&seg.path)?.len();
                let idx = std::fs::read(seg.index_path())?;
                match journal::segment::decode_index(&idx, len) {
                    Ok(entries) if entries == scan.entries => {}
                    Ok(_) => {
                        problems += 1;
                        println!(
                            "BAD  {}: index differs from the segment",
                            seg.index_path().display()
                        );
                    }
                    Err(e) => {
                        problems += 1;
                        println!("BAD  {}: {e}", seg.index_path().display());
                    }
                }
            }
        }
        println!(
            "{}  group {}: {records} records, {} of journal checked",
            if problems == 0 { "OK " } else { "BAD" },
            meta.name,
            human_bytes(bytes)
        );
    }
    Ok(problems)
}
