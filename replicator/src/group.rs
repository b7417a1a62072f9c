//! One group's store, open for writing: the journal's append end, the head images kept at the
//! durable seq, and the checks every incoming record passes before it is stored.

use std::fs::File;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use journal::record::RecordRef;
use journal::store::{self, Access, GroupDir, GroupMeta, SeqMark};
use journal::wire::{self, Volume};
use journal::writer::{JournalWriter, OpenError};
use tracing::{error, info, warn};

use crate::head::{self, HeadApplier, Touched};
use journal::sums::{ChunkSet, Sums};

#[derive(Debug)]
pub struct Group {
    pub dir: GroupDir,
    pub meta: GroupMeta,
    journal: JournalWriter,
    heads: Vec<File>,
    applier: HeadApplier,
    /// The head images follow the journal (else delta sync must resend every chunk).
    heads_valid: bool,
    /// Per volume, the head image's chunk hashes, current except for the `touched` chunks
    /// (shared with the head applier, which checkpoints them).
    head_sums: head::Sums,
    touched: Touched,
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
    /// Where compressed payloads are decompressed to be checked (reused: no allocation each).
    scratch: Vec<u8>,
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
        head_applied: Arc<AtomicU64>,
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
        let mut heads = Vec::new();
        for v in &meta.volumes {
            heads.push(
                dir.open_image("head", &v.name, Access::ReadWrite)
                    .context("open a head image")?,
            );
        }
        let head_mark = dir.mark("head")?;
        // The head's sums as of its mark; chunks changed since are rehashed when needed.
        let mut head_sums = Vec::new();
        let mut touched = Vec::new();
        for v in &meta.volumes {
            match dir.sums("head", &v.name) {
                Ok(s) if s.seq == head_mark.seq && s.size == v.size => {
                    // Chunks the checkpoint left stale are hashed when a proxy asks.
                    touched.push(s.stale());
                    head_sums.push(s);
                }
                other => {
                    let why = other
                        .err()
                        .map_or_else(|| "they are of another seq".to_owned(), |e| e.to_string());
                    warn!(group = name, "head checksums of {} are not usable ({why}): rehashing the whole image when hashes are asked for", v.name);
                    head_sums.push(Sums::zeroes(v.size, head_mark.seq));
                    touched.push(ChunkSet::all(v.size));
                }
            }
        }
        let touched: Touched = Arc::new(Mutex::new(touched));
        let head_sums: head::Sums = Arc::new(Mutex::new(head_sums));
        let mut heads_valid = true;
        if head_mark.seq < report.last_seq {
            info!(
                group = name,
                "bringing head images from seq {} to {}", head_mark.seq, report.last_seq
            );
            let caught_up = head::catch_up(&dir, &heads, &touched, head_mark.seq, report.last_seq)
                .or_else(|e| {
                    // The records after the head's mark are gone or unreadable: start the
                    // images again from the base and replay what follows it.
                    warn!(
                        group = name,
                        "head images cannot be caught up ({e}); rebuilding them from the base"
                    );
                    head::rebuild(&dir, &meta, &heads, &touched, report.last_seq)
                });
            if let Err(e) = caught_up {
                error!(
                    group = name,
                    "head images cannot be brought to seq {}: {e}; delta sync will resend every chunk",
                    report.last_seq
                );
                heads_valid = false;
            }
        }
        let applier = HeadApplier::start(
            head::Heads {
                dir: dir.clone(),
                names: meta.volumes.iter().map(|v| v.name.clone()).collect(),
                files: &heads,
                touched: touched.clone(),
                sums: head_sums.clone(),
                trusted: heads_valid,
            },
            journal.current_segment().clone(),
            journal.current_len(),
            SeqMark {
                seq: report.last_seq,
                time_ns: report.last_time_ns,
            },
            head_applied,
        )?;
        let group = Group {
            dir,
            meta,
            journal,
            heads,
            applier,
            heads_valid,
            head_sums,
            touched,
            uncommitted: 0,
            durable_seq: report.last_seq,
            durable_time_ns: report.last_time_ns,
            records_in: 0,
            bytes_in: 0,
            stored_in: 0,
            store_error: None,
            scratch: Vec::new(),
        };
        Ok((group, known))
    }

    /// Checks a batch and appends its new records to the journal (not yet durable). Records at
    /// or below the durable seq are duplicates of a resent stream and are skipped. Nothing of a
    /// batch is appended unless every new record in it passes.
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
            if h.kind.carries_data() {
                // The payload itself is checked too (decompressed, crc) before it is stored.
                r.check_payload(&mut self.scratch)
                    .map_err(|e| refuse(h.seq, e.to_string()))?;
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

    /// Makes what was ingested durable (fsync), then applies it to the head images. Returns the
    /// durable seq to acknowledge.
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

    pub fn commit(&mut self) -> anyhow::Result<u64> {
        if self.journal.last_seq() == self.durable_seq {
            return Ok(self.durable_seq);
        }
        let before = self.journal.current_segment().first_seq;
        self.journal.sync().context("make the journal durable")?;
        self.durable_seq = self.journal.last_seq();
        self.durable_time_ns = self.journal.last_time_ns();
        self.applier.durable(self.durable_seq);
        self.uncommitted = 0;
        if self.journal.current_segment().first_seq != before {
            // A segment was sealed: a good moment to checkpoint the head images (a cache: a
            // failure costs a longer catch-up at the next start, not an acknowledgement). The
            // applier does it, at most every few seconds, off the acknowledgement's path.
            self.applier.checkpoint_soon();
        }
        Ok(self.durable_seq)
    }

    /// Brings the head images to the durable seq and checkpoints them (their checksums and
    /// the seq they hold), waiting until that is done.
    pub fn sync_heads(&mut self) -> anyhow::Result<()> {
        self.applier.checkpoint_now(self.durable_seq)
    }

    /// Hashes of the head image of `disk`, one per [`wire::HASH_CHUNK`], handed to `send` in
    /// pieces of at most [`wire::HASHES_PER_FRAME`] (first chunk, hashes), so memory stays
    /// bounded whatever the disk's size. Only chunks changed since the last checkpoint are
    /// read; the rest come from the checksum file. Sends nothing when the head images cannot
    /// be trusted: then the proxy sends every chunk.
    pub fn head_hashes(
        &mut self,
        disk: usize,
        mut send: impl FnMut(u64, &[u128]) -> io::Result<()>,
    ) -> io::Result<()> {
        let drained = self.applier.drain(self.durable_seq);
        if !self.heads_valid || !self.applier.is_valid() || drained.is_err() {
            return Ok(());
        }
        // The applier does not checkpoint meanwhile (it takes this lock to do so).
        let mut head_sums = self.head_sums.lock().unwrap_or_else(|p| p.into_inner());
        // Changed chunks are rehashed as their frame comes, and a frame goes out at least
        // twice a second, so a large image keeps the link alive while it is read.
        let size = self.meta.volumes[disk].size;
        let chunks = head_sums[disk].chunks();
        let mut part = Vec::with_capacity(wire::HASHES_PER_FRAME);
        let mut first = 0;
        let mut last_sent = std::time::Instant::now();
        let mut buf = Vec::new();
        for c in 0..chunks {
            let changed = self.touched.lock().unwrap_or_else(|p| p.into_inner())[disk].contains(c);
            if changed {
                let h = journal::read::hash_chunk(&self.heads[disk], c, size, &mut buf)?;
                head_sums[disk].set(c, h);
                self.touched.lock().unwrap_or_else(|p| p.into_inner())[disk].remove(c);
            }
            part.push(head_sums[disk].get(c));
            let full = part.len() == wire::HASHES_PER_FRAME || c + 1 == chunks;
            if full || last_sent.elapsed() >= std::time::Duration::from_millis(500) {
                send(first, &part)?;
                first = c + 1;
                part.clear();
                last_sent = std::time::Instant::now();
            }
        }
        Ok(())
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
