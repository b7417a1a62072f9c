//! One group's store, open for writing: the journal's append end, the chunk hashes delta sync
//! compares ([`crate::hashes`]), and the checks every incoming record passes before it is
//! stored.

use std::io;

use anyhow::{bail, Context};
use journal::record::RecordRef;
use journal::store::{self, GroupDir, GroupMeta, SeqMark};
use journal::wire::{self, Volume};
use journal::writer::{JournalWriter, OpenError};
use tracing::{error, info, warn};

use crate::hashes::Hashes;

#[derive(Debug)]
pub struct Group {
    pub dir: GroupDir,
    pub meta: GroupMeta,
    journal: JournalWriter,
    /// The chunk hashes of the latest state, made when a proxy asks for them.
    hashes: Hashes,
    /// Stored bytes appended since the last commit.
    uncommitted: usize,
    /// Highest seq made durable (fsynced) in the journal.
    pub durable_seq: u64,
    pub durable_time_ns: u64,
    pub records_in: u64,
    pub bytes_in: u64,
    pub stored_in: u64,
    /// Why the store last failed to take records (a full or failing disk); cleared when
    /// records are stored again. Shown by `replicator status`.
    pub store_error: Option<String>,
}

/// Why a batch was not taken.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The record at `seq` is not acceptable (the proxy must not send it again).
    #[error("record seq {seq} refused: {reason}")]
    Refused { seq: u64, reason: String },
    /// The store could not take it (a full or failing disk): the proxy keeps it and retries.
    #[error("{0:#}")]
    Store(anyhow::Error),
}

/// Bytes appended before a commit is forced (group commit's upper bound).
pub const PENDING_LIMIT: usize = 64 << 20;

impl Group {
    /// Opens a group's store, or creates it for `volumes`. An existing group must have the same
    /// volumes (names and sizes, in order). A damaged journal fails with a [`Damage`] in the
    /// error chain ([`journal::writer::Damage`]): the group takes no records until an operator acts.
    pub fn open(
        dir: GroupDir,
        name: &str,
        volumes: &[Volume],
        segment_limit: u64,
    ) -> anyhow::Result<(Group, bool)> {
        let known = dir.exists();
        if !known {
            info!(
                group = name,
                "new group: creating its store at {}",
                dir.path.display()
            );
            dir.create(&GroupMeta {
                format: store::FORMAT,
                name: name.to_owned(),
                volumes: volumes.to_vec(),
                created_ns: journal::now_ns(),
            })
            .with_context(|| format!("create group store {}", dir.path.display()))?;
        }
        let meta = dir.meta()?;
        check_volumes(&dir, &meta, volumes)?;
        let base = dir.mark("base")?;
        let (journal, report) = match JournalWriter::open(&dir, base.seq, segment_limit) {
            Ok(opened) => opened,
            Err(OpenError::Damaged(d)) => {
                error!(group = name, "{d}");
                return Err(anyhow::Error::new(d).context(format!("group {name}")));
            }
            Err(OpenError::Io(e)) => {
                return Err(anyhow::Error::new(e).context(format!("open journal of group {name}")))
            }
        };
        if let Some(cut) = &report.cut {
            let durable = format!(
                "it lies past the durable checkpoint (seq {}), so nothing acknowledged was cut",
                report.durable_seq
            );
            warn!(
                group = name,
                "journal tail cut at start-up: {} at byte {}, {} bytes removed ({}); {durable}",
                cut.path.display(),
                cut.at,
                cut.bytes,
                cut.why
            );
        }
        let hashes = Hashes::open(&dir, &meta, base, &journal);
        remove_head_images(&dir, &meta);
        let group = Group {
            dir,
            meta,
            journal,
            hashes,
            uncommitted: 0,
            durable_seq: report.last_seq,
            durable_time_ns: report.last_time_ns,
            records_in: 0,
            bytes_in: 0,
            stored_in: 0,
            store_error: None,
        };
        Ok((group, known))
    }

    /// Checks a batch and appends its new records to the journal (not yet durable). Records at
    /// or below the durable seq are duplicates of a resent stream and are skipped. Nothing of a
    /// batch is appended unless every new record in it passes. A record's crc covers its
    /// stored bytes (and a raw payload's data crc is checked in the same pass); a compressed
    /// payload is decompressed and checked by whoever reads it, not here: ingest appends,
    /// fsyncs and acks with nothing else on its path.
    pub fn ingest(&mut self, body: &[u8]) -> Result<(), IngestError> {
        let mut accepted: Vec<RecordRef<'_>> = Vec::new();
        let mut next = self.journal.last_seq() + 1;
        for r in wire::batch_records(body) {
            let refuse = |seq: u64, reason: String| IngestError::Refused { seq, reason };
            let r = r.map_err(|e| refuse(next, e.to_string()))?;
            let h = r.header;
            if h.seq < next {
                continue;
            }
            if h.seq != next {
                return Err(refuse(
                    next,
                    format!(
                        "seq {} arrived when {next} was expected: the stream has a gap",
                        h.seq
                    ),
                ));
            }
            let Some(volume) = self.meta.volumes.get(usize::from(h.disk)) else {
                return Err(refuse(
                    h.seq,
                    format!("it names disk {} of {}", h.disk, self.meta.volumes.len()),
                ));
            };
            if h.kind.changes_data() && h.offset + h.length > volume.size {
                return Err(refuse(
                    h.seq,
                    format!(
                        "it covers {}..{} past the end of {} ({} bytes)",
                        h.offset,
                        h.offset + h.length,
                        volume.name,
                        volume.size
                    ),
                ));
            }
            if h.kind.changes_data() && h.length == 0 {
                return Err(refuse(h.seq, "it changes zero bytes".into()));
            }
            accepted.push(r);
            next += 1;
        }
        self.journal.append(&accepted).map_err(|e| {
            IngestError::Store(anyhow::Error::new(e).context("append to the journal"))
        })?;
        // Counted once the whole batch is in.
        for r in &accepted {
            let h = &r.header;
            self.hashes.note(h.disk, h.kind, h.offset, h.length);
            self.uncommitted += h.record_len();
            self.bytes_in += if h.kind.carries_data() { h.length } else { 0 };
            self.stored_in += h.record_len() as u64;
        }
        self.records_in += accepted.len() as u64;
        Ok(())
    }

    /// Whether enough is pending that the caller should commit before reading more.
    pub fn should_commit(&self) -> bool {
        self.uncommitted >= PENDING_LIMIT
    }

    /// Seals segments once their first record is `age` old (None: only when full).
    pub fn set_seal_after(&mut self, age: Option<std::time::Duration>) {
        self.journal.set_seal_after(age);
    }

    /// While no records come: seals the open segment if it is old enough (a warning if that
    /// fails: its records are durable, and it is sealed later).
    pub fn seal_if_due(&mut self) {
        match self.journal.seal_if_due() {
            Ok(true) => tracing::debug!(group = %self.meta.name, "sealed an idle segment"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(group = %self.meta.name, "sealing an idle segment failed: {e}; it is sealed later")
            }
        }
    }

    /// Makes what was ingested durable (fsync, then the durable checkpoint). Returns the
    /// durable seq to acknowledge.
    pub fn commit(&mut self) -> anyhow::Result<u64> {
        if self.journal.last_seq() == self.durable_seq {
            return Ok(self.durable_seq);
        }
        self.journal.sync().context("make the journal durable")?;
        self.durable_seq = self.journal.last_seq();
        self.durable_time_ns = self.journal.last_time_ns();
        self.uncommitted = 0;
        Ok(self.durable_seq)
    }

    /// Between commits, when no batch waits: zeros ahead of small commits (see
    /// [`journal::writer::JournalWriter::zero_ahead`]).
    pub fn zero_ahead(&mut self) {
        self.journal.zero_ahead();
    }

    fn durable_mark(&self) -> SeqMark {
        SeqMark {
            seq: self.durable_seq,
            time_ns: self.durable_time_ns,
        }
    }

    /// Keeps the chunk hashes made so far (with the chunks changed since listed as stale), so
    /// that a restart hashes again only what changes after now (at a session's end).
    pub fn keep_hashes(&self) -> io::Result<()> {
        self.hashes.keep(&self.dir, &self.meta, self.durable_mark())
    }

    /// The hashes of every volume at the durable seq, handed to `send` as (disk, first chunk,
    /// hashes) in pieces of at most [`wire::HASHES_PER_FRAME`], so memory stays bounded
    /// whatever the disks' size. Chunks changed since their hash was made are hashed from the
    /// point (base and journal) as they come.
    pub fn send_hashes(
        &mut self,
        send: impl FnMut(u16, u64, &[u128]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mark = self.durable_mark();
        self.hashes
            .send(&self.dir, &self.meta, &self.journal, mark, send)
    }

    /// Why the journal refuses further writes (the group must be reopened), if it does.
    pub fn failed(&self) -> Option<&str> {
        self.journal.failed()
    }
}

/// A proxy must offer the volumes the group was stored with (names and sizes, in order).
pub fn check_volumes(dir: &GroupDir, meta: &GroupMeta, volumes: &[Volume]) -> anyhow::Result<()> {
    if meta.volumes != volumes {
        bail!(
            "group {} was stored with volumes {} but the proxy sends {}; \
             use another group name or remove {}",
            meta.name,
            describe(&meta.volumes),
            describe(volumes),
            dir.path.display()
        );
    }
    Ok(())
}

fn describe(volumes: &[Volume]) -> String {
    volumes
        .iter()
        .map(|v| format!("{} ({} bytes)", v.name, v.size))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Head images were kept by earlier versions (a copy of every volume's latest state, for delta
/// sync); this one hashes from the base and the journal instead, so they are only wasted space.
fn remove_head_images(dir: &GroupDir, meta: &GroupMeta) {
    for v in &meta.volumes {
        let path = dir.image("head", &v.name);
        match std::fs::remove_file(&path) {
            Ok(()) => info!(
                group = %meta.name,
                "removed {}: this version keeps the hashes of the latest state, not an image of it",
                path.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!("could not remove {}: {e}", path.display()),
        }
    }
}
