//! One disk of a replicated group: the image behind the NBD export, its range locks, and the
//! group's [`Capture`]. Every change is captured under its range lock (applied, then numbered,
//! while the lock is held); in sync mode the reply waits until the replicator has it.

use std::io;
use std::sync::Arc;

use journal::record::Kind;
use nbd_server::{BlockBackend, Buffer, Capabilities, Extent, FileBackend, ZeroError, ZeroMode};

use crate::capture::{Capture, Captured};
use crate::rangelock::RangeLocks;
use crate::record::Record;

/// One disk of a replicated group: the image, its range locks, and the group's capture.
#[derive(Debug)]
pub struct CaptureBackend {
    pub file: FileBackend,
    pub locks: RangeLocks,
    pub capture: Arc<Capture>,
    pub disk: u16,
}

impl CaptureBackend {
    /// Marks the range in the activity log before it changes on the image.
    async fn begin(&self, offset: u64, length: u64) -> io::Result<()> {
        match &self.capture.activity {
            Some(al) => al.begin(usize::from(self.disk), offset, length).await,
            None => Ok(()),
        }
    }

    fn changed(&self, offset: u64, length: u64, seq: Option<u64>) {
        if let Some(al) = &self.capture.activity {
            al.changed(usize::from(self.disk), offset, length, seq);
        }
    }

    /// One change to the image, captured: under the range lock, mark the activity log, apply
    /// (`apply`, not yet polled), and number the record `record` makes of what the apply
    /// handed back (a write's buffer); then, in sync mode, wait until the replicator has it. A
    /// failed apply records nothing.
    async fn change<E: From<io::Error>, T>(
        &self,
        offset: u64,
        length: u64,
        apply: impl std::future::Future<Output = (Result<(), E>, T)>,
        record: impl FnOnce(T) -> Record,
    ) -> Result<(), E> {
        if length == 0 {
            // Changes nothing: nothing to lock, mark or record (a record would be refused).
            return apply.await.0;
        }
        let seq = {
            let _range = self.locks.lock(offset, length).await;
            self.begin(offset, length).await?;
            let (applied, kept) = apply.await;
            let range = Some((offset, length));
            let captured = match applied {
                Ok(()) => match self.capture.push_now(record(kept), self.disk, range) {
                    Ok(captured) => captured,
                    // A full log (--on-full block, sync mode): boxed, so the future of every
                    // write carries only a pointer to the state of this rare wait.
                    Err(rec) => {
                        let push = self.capture.push_when_room(rec, self.disk, range);
                        Box::pin(push).await
                    }
                },
                Err(_) => Captured::None,
            };
            self.changed(offset, length, captured.seq());
            applied?;
            captured
        };
        if self.capture.sync_waits() {
            // Boxed: the future of every write carries only a pointer to the state of this
            // wait (it was half the size of a write's future, copied with it at each spawn).
            Box::pin(self.after_change(seq)).await;
        }
        Ok(())
    }

    /// Sync mode: waits until the replicator has the change, as a record (its seq durable) or
    /// as a dirty mark (a sync that carried it ended durably: before the first contact, or
    /// while records were not kept, that is how a change reaches the replicator).
    async fn after_change(&self, captured: Captured) {
        if !self.capture.sync_waits() {
            return;
        }
        let c = &self.capture;
        let wait = async {
            match captured {
                Captured::Seq { seq, epoch } => {
                    c.durable(seq).await;
                    // A refusal may have dropped the record (its seq now names another one):
                    // then the change reaches the replicator with the resync that follows.
                    if let Some(generation) = c.dropped_generation(seq, epoch) {
                        let mut rx = c.durable_gen.subscribe();
                        let _ = rx.wait_for(|g| *g > generation).await;
                    }
                }
                Captured::Dirty(generation) => {
                    let mut rx = c.durable_gen.subscribe();
                    let _ = rx.wait_for(|g| *g > generation).await;
                }
                Captured::None => {}
            }
        };
        match c.sync_timeout {
            None => wait.await,
            Some(limit) => {
                if tokio::time::timeout(limit, wait).await.is_err() {
                    c.degrade(captured.seq().unwrap_or_else(|| c.last_seq()));
                }
            }
        }
    }

    /// Flushes the image and queues a flush record.
    pub async fn flush_and_mark(&self) -> io::Result<Option<u64>> {
        self.file.flush().await?;
        Ok(self
            .capture
            .push_control(Record::control(Kind::Flush, self.disk, 0, 0, "")))
    }
}

impl BlockBackend for CaptureBackend {
    fn size_bytes(&self) -> u64 {
        self.file.size_bytes()
    }

    fn capabilities(&self) -> Capabilities {
        self.file.capabilities()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, buf).await
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let mut buf = Buffer::take(data.len());
        buf.copy_from_slice(data);
        self.write_owned(offset, buf, fua).await
    }

    /// The record keeps `data` (the connection's buffer) until the replicator has it.
    async fn write_owned(&self, offset: u64, data: Buffer, fua: bool) -> io::Result<()> {
        if data.is_empty() {
            return self.file.write(offset, &data, fua).await;
        }
        let length = data.len() as u64;
        let apply = async {
            let written = self.file.write(offset, &data, fua).await;
            (written, data)
        };
        let disk = self.disk;
        let record = |data| Record::data(Kind::Write, disk, offset, data);
        self.change(offset, length, apply, record).await?;
        self.capture.stats.guest_write(length);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<(), ZeroError> {
        let zeroed = async { (self.file.write_zeroes(offset, length, mode, fua).await, ()) };
        let disk = self.disk;
        let record = |()| Record::control(Kind::Zero, disk, offset, length, "");
        self.change(offset, length, zeroed, record).await
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        let trimmed = async { (self.file.trim(offset, length, fua).await, ()) };
        let disk = self.disk;
        let record = |()| Record::control(Kind::Trim, disk, offset, length, "");
        self.change(offset, length, trimmed, record).await
    }

    async fn flush(&self) -> io::Result<()> {
        let seq = self.flush_and_mark().await?;
        let captured = seq.map_or(Captured::None, |seq| Captured::Seq {
            seq,
            epoch: u64::MAX,
        });
        self.after_change(captured).await;
        Ok(())
    }

    async fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.file.cache(offset, length).await
    }

    async fn extents(
        &self,
        offset: u64,
        length: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        self.file.extents(offset, length, max, out).await
    }
}
