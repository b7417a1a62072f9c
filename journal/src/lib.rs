//! The formats of continuous data protection: records (one change each), journal segments and
//! their indexes, the wire protocol between nbd-proxy and the replicator, and the store layout
//! that the replicator writes and restore reads.
//!
//! `record`, `segment`, `checkpoint` and `wire` do no I/O and are tested on bytes; `store` (the
//! layout), `writer` (the append end and its corruption policy) and `read` (the one reader and
//! replay) are the thin layers that put them in files. `metrics` (rates, the Prometheus text
//! format and its HTTP responder) serves both binaries.

pub mod append;
pub mod checkpoint;
pub mod disks;
pub mod metrics;
pub mod names;
pub mod pit;
pub mod read;
pub mod record;
pub mod segment;
pub mod store;
pub mod sums;
pub mod testdata;
pub mod units;
pub mod wire;
pub mod writer;

pub use record::{Encoded, Header, Kind, RecordRef};

/// Nanoseconds since the Unix epoch, as records carry them.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// For commands that only print (status, list): a closed pipe (`status | head`) ends the
/// process quietly, as it does other Unix tools, instead of failing a print. Never for servers:
/// they must see EPIPE on a client's socket, not die of it.
pub fn quiet_on_closed_pipe() {
    // SAFETY: restores the default disposition of one signal; no handler code runs in Rust.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
