//! The block backend trait: what an export is made of. The proxy serves files through
//! [`crate::FileBackend`]; the restore tool serves point-in-time views through the same trait.
//!
//! Methods return futures so that a backend may wait (for a replicator's durable ack, say) without
//! holding a thread; a backend whose work is fast and local may do it inline.

use std::future::Future;
use std::io;

use crate::buffer::Buffer;

/// What a backend can do; the server turns it into transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub read_only: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    /// Zeroing can be answered "not fast" without touching data (NBD_CMD_FLAG_FAST_ZERO).
    pub fast_zero: bool,
    pub cache: bool,
    /// A flush on any connection covers writes completed on all of them.
    pub multi_conn: bool,
    pub rotational: bool,
}

/// How a WRITE_ZEROES should be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMode {
    /// The client asked for the range to stay allocated (NBD_CMD_FLAG_NO_HOLE).
    pub no_hole: bool,
    /// Fail with [`ZeroError::NotFast`] rather than zero slowly (NBD_CMD_FLAG_FAST_ZERO).
    pub fast_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    /// Zeroing would be no faster than writing zeroes; nothing was changed.
    #[error("zeroing this range would not be fast")]
    NotFast,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One run of the export with the same allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// No data is stored here (a hole); reads return zeroes.
    pub hole: bool,
    /// Reads return zeroes (true for every hole; may be true for data too).
    pub zero: bool,
}

/// Storage behind one export. Every offset and length a server passes in has been checked
/// against [`BlockBackend::size_bytes`].
pub trait BlockBackend: Send + Sync + 'static {
    fn size_bytes(&self) -> u64;
    fn capabilities(&self) -> Capabilities;
    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes `data` at `offset`; with `fua`, durably before returning.
    fn write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes `data` at `offset`, taking the server's payload buffer: a backend that keeps the
    /// bytes after the write (the proxy's change log) keeps the buffer instead of copying it.
    /// The buffer's memory then leaves the connection's in-flight budget and is the backend's
    /// to bound. By default, [`BlockBackend::write`].
    fn write_owned(
        &self,
        offset: u64,
        data: Buffer,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async move { self.write(offset, &data, fua).await }
    }
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> impl Future<Output = Result<(), ZeroError>> + Send;
    /// Discards the range; afterwards it may read as anything the backend documents.
    fn trim(
        &self,
        offset: u64,
        length: u64,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// A hint that the range will be read soon.
    fn cache(&self, offset: u64, length: u64) -> impl Future<Output = io::Result<()>> + Send;
    /// Appends the extents covering `offset..offset+length` (at least one, at most `max` of
    /// them; the last may end before `offset+length` when `max` is reached).
    fn extents(
        &self,
        offset: u64,
        length: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> impl Future<Output = io::Result<()>> + Send;
}
