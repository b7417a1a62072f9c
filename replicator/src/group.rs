//! One group's store, open for writing: the journal's append end, the head images kept at the
//! durable seq, and the checks every incoming record passes before it is stored.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{bail, Context};
use journal::record::RecordRef;
use journal::store::{self, Access, GroupDir, GroupMeta, SeqMark};
use journal::wire::{self, Volume};
use journal::writer::{JournalWriter, OpenError};
use tracing::{error, info, warn};

use crate::head::{self, HeadApplier};

#[derive(Debug)]
pub struct Group {
    pub dir: GroupDir,
    pub meta: GroupMeta,
    journal: JournalWriter,
    heads: Vec<File>,
    applier: HeadApplier,
    /// The head images follow the journal (else delta sync must resend every chunk).
    heads_valid: bool,
    /// Stored bytes appended since the last commit.
    uncommitted: usize,
    /// Highest seq made durable (fsynced) in the journal.
    pub durable_seq: u64,
    pub durable_time_ns: u64,
    pub records_in: u64,
    pub bytes_in: u64,
    pub stored_in: u64,
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
            let durable = if report.legacy {
                "this store has no durable checkpoint (an older version wrote it), so the cut was \
                 judged by the record's shape alone"
                    .to_owned()
            } else {
                format!(
                    "it lies past the durable checkpoint (seq {}), so nothing acknowledged was cut",
                    report.durable_seq
                )
            };
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
        let mut heads_valid = true;
        if head_mark.seq < report.last_seq {
            info!(
                group = name,
                "bringing head images from seq {} to {}", head_mark.seq, report.last_seq
            );
            if let Err(e) = head::catch_up(&dir, &heads, head_mark.seq, report.last_seq) {
                error!(
                    group = name,
                    "head images cannot be brought to seq {}: {e}; delta sync will resend every chunk",
                    report.last_seq
                );
                heads_valid = false;
            }
        }
        let applier = HeadApplier::start(
            &dir,
            &heads,
            journal.current_segment().clone(),
            journal.current_len(),
            report.last_seq,
        )?;
        let mut group = Group {
            dir,
            meta,
            journal,
            heads,
            applier,
            heads_valid,
            uncommitted: 0,
            durable_seq: report.last_seq,
            durable_time_ns: report.last_time_ns,
            records_in: 0,
            bytes_in: 0,
            stored_in: 0,
        };
        if heads_valid {
            group.mark_heads()?;
        }
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
                r.payload().map_err(|e| refuse(h.seq, e.to_string()))?;
            }
            self.uncommitted += h.record_len();
            self.bytes_in += if h.kind.carries_data() { h.length } else { 0 };
            self.stored_in += h.record_len() as u64;
            accepted.push(r);
            next += 1;
        }
        self.journal.append(&accepted).map_err(|e| {
            IngestError::Store(anyhow::Error::new(e).context("append to the journal"))
        })?;
        self.records_in += accepted.len() as u64;
        Ok(())
    }

    /// Whether enough is pending that the caller should commit before reading more.
    pub fn should_commit(&self) -> bool {
        self.uncommitted >= PENDING_LIMIT
    }

    /// Makes what was ingested durable (fsync), then applies it to the head images. Returns the
    /// durable seq to acknowledge.
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
            // A segment was sealed: a good moment to checkpoint the head images.
            self.sync_heads()?;
        }
        Ok(self.durable_seq)
    }

    /// The seq the head images have reached (shared with retention).
    pub fn head_applied(&self) -> Arc<AtomicU64> {
        self.applier.applied()
    }

    /// Flushes the head images and records the seq they hold.
    pub fn sync_heads(&mut self) -> anyhow::Result<()> {
        self.applier.drain(self.durable_seq)?;
        self.mark_heads()
    }

    /// Flushes the head images (already at the durable seq) and records that seq.
    fn mark_heads(&mut self) -> anyhow::Result<()> {
        for f in &self.heads {
            f.sync_data()?;
        }
        self.dir.set_mark(
            "head",
            SeqMark {
                seq: self.durable_seq,
                time_ns: self.durable_time_ns,
            },
        )?;
        Ok(())
    }

    /// Hashes of the head image of `disk`, one per [`wire::HASH_CHUNK`], handed to `send` in
    /// pieces of at most [`wire::HASHES_PER_FRAME`] (first chunk, hashes), so memory stays
    /// bounded whatever the disk's size. Sends nothing when the head images cannot be trusted:
    /// then the proxy sends every chunk.
    pub fn head_hashes(
        &self,
        disk: usize,
        mut send: impl FnMut(u64, &[u128]) -> io::Result<()>,
    ) -> io::Result<()> {
        let drained = self.applier.drain(self.durable_seq);
        if !self.heads_valid || !self.applier.is_valid() || drained.is_err() {
            return Ok(());
        }
        let size = self.meta.volumes[disk].size;
        let file = &self.heads[disk];
        let chunk = wire::HASH_CHUNK;
        let zero_hash = wire::chunk_hash(&vec![0u8; chunk as usize]);
        let mut part = Vec::with_capacity(wire::HASHES_PER_FRAME);
        let mut first = 0u64;
        let mut buf = vec![0u8; chunk as usize];
        let mut next_data = 0u64;
        let mut off = 0u64;
        while off < size {
            let len = chunk.min(size - off) as usize;
            if next_data < off {
                next_data = seek_data(file, off)?.unwrap_or(u64::MAX);
            }
            if next_data >= off + len as u64 && len as u64 == chunk {
                part.push(zero_hash);
            } else {
                file.read_exact_at(&mut buf[..len], off)?;
                part.push(wire::chunk_hash(&buf[..len]));
            }
            off += len as u64;
            if part.len() == wire::HASHES_PER_FRAME || off >= size {
                send(first, &part)?;
                first += part.len() as u64;
                part.clear();
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

/// The next offset at or after `off` that holds data, or None when only a hole follows.
fn seek_data(file: &File, off: u64) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a valid descriptor owned by `file`; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Ok(Some(off)),
        };
    }
    Ok(Some(r as u64))
}
