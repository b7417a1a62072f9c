//! NBD server library: the protocol as pure parsing and encoding (`proto`, `handshake`,
//! `request`, `reply`), and an async server (`server`, `connection`) generic over a
//! [`BlockBackend`], so the same code serves the proxy's images and restore's point-in-time views.

pub mod backend;
pub mod buffer;
pub mod connection;
pub mod file;
pub mod handshake;
pub mod listen;
pub mod proto;
pub mod reply;
pub mod request;
pub mod server;
pub mod tls;

pub use backend::{BlockBackend, Capabilities, Extent, ZeroError, ZeroMode};
pub use buffer::Buffer;
pub use file::FileBackend;
pub use server::{run, shutdown_signal, Export, Listener};
pub use tls::Tls;
