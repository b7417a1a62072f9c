//! Accepts connections on any number of listeners and serves a fixed set of exports until a
//! shutdown future resolves; then stops accepting, lets every connection finish the requests it
//! has read, flushes every export, and returns.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info_span, warn, Instrument};

use crate::backend::BlockBackend;
use crate::connection::{self, SplitStream};
use crate::handshake::ExportInfo;
use crate::proto::*;
use crate::tls::Tls;

/// One export: its name and description as listed to clients, and what serves its blocks.
#[derive(Debug)]
pub struct Export<B> {
    pub info: ExportInfo,
    pub backend: Arc<B>,
}

impl<B: BlockBackend> Export<B> {
    pub fn new(name: &str, description: &str, backend: Arc<B>) -> Export<B> {
        let caps = backend.capabilities();
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
        for (on, flag) in [
            (caps.read_only, FLAG_READ_ONLY),
            (caps.rotational, FLAG_ROTATIONAL),
            (caps.trim && !caps.read_only, FLAG_SEND_TRIM),
            (caps.write_zeroes && !caps.read_only, FLAG_SEND_WRITE_ZEROES),
            (
                caps.fast_zero && caps.write_zeroes && !caps.read_only,
                FLAG_SEND_FAST_ZERO,
            ),
            (caps.multi_conn, FLAG_CAN_MULTI_CONN),
            (caps.cache, FLAG_SEND_CACHE),
        ] {
            if on {
                flags |= flag;
            }
        }
        let info = ExportInfo {
            name: name.to_owned(),
            description: description.to_owned(),
            size_bytes: backend.size_bytes(),
            flags,
        };
        Export { info, backend }
    }
}

/// A socket the server accepts connections on.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    /// TCP without TLS: whoever reaches it can use the exports (a WARN says so at start).
    Tcp(TcpListener),
    /// TCP offering TLS (STARTTLS), optionally or required.
    Tls(TcpListener, Arc<Tls>),
}

impl Listener {
    /// A TCP listener, offering TLS when `tls` is given.
    pub fn tcp(listener: TcpListener, tls: Option<Arc<Tls>>) -> Listener {
        match tls {
            Some(tls) => Listener::Tls(listener, tls),
            None => Listener::Tcp(listener),
        }
    }
}

/// Serves `exports` on `listeners` until `shutdown` resolves, then drains and flushes.
pub async fn run<B: BlockBackend>(
    listeners: Vec<Listener>,
    exports: Vec<Export<B>>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let exports: Arc<[Export<B>]> = exports.into();
    let (stop, stopped) = watch::channel(false);
    let mut accepting = JoinSet::new();
    for listener in listeners {
        if let Listener::Tcp(l) = &listener {
            let addr = l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string());
            warn!(
                "NBD on TCP {addr} without TLS: whoever reaches it can read and write the \
                 exports (--tls require with --tls-ca to allow only clients with a certificate)"
            );
        }
        accepting.spawn(accept_loop(listener, exports.clone(), stopped.clone()));
    }
    shutdown.await;
    let _ = stop.send(true);
    while accepting.join_next().await.is_some() {}
    let mut result = Ok(());
    for export in exports.iter() {
        if let Err(e) = export.backend.flush().await {
            error!(export = %export.info.name, "flush at shutdown failed: {e}");
            result = Err(e);
        }
    }
    result
}

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

async fn accept_loop<B: BlockBackend>(
    listener: Listener,
    exports: Arc<[Export<B>]>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            accepted = accept(&listener) => accepted,
        };
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok(Accepted::Unix(s)) => {
                spawn_connection(&mut connections, s, None, None, &exports, &stop)
            }
            Ok(Accepted::Tcp(s, peer, tls)) => {
                spawn_connection(&mut connections, s, Some(peer), tls, &exports, &stop)
            }
            Err(e) => {
                // Out of descriptors or memory: wait a little rather than spin.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    while connections.join_next().await.is_some() {}
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(
        tokio::net::TcpStream,
        std::net::SocketAddr,
        Option<Arc<Tls>>,
    ),
}

/// Socket send buffer asked for: large enough that one vectored write hands a 1 MiB read reply
/// to the kernel whole, rather than waking the writer for every 200 KiB (the default). The kernel
/// caps it at net.core.wmem_max.
const SEND_BUFFER_BYTES: usize = 4 << 20;

async fn accept(listener: &Listener) -> io::Result<Accepted> {
    use nix::sys::socket::{setsockopt, sockopt::SndBuf};
    match listener {
        Listener::Unix(l) => {
            let (stream, _) = l.accept().await?;
            let _ = setsockopt(&stream, SndBuf, &SEND_BUFFER_BYTES);
            Ok(Accepted::Unix(stream))
        }
        Listener::Tcp(l) | Listener::Tls(l, _) => {
            let (stream, peer) = l.accept().await?;
            stream.set_nodelay(true)?;
            let _ = setsockopt(&stream, SndBuf, &SEND_BUFFER_BYTES);
            let tls = match listener {
                Listener::Tls(_, tls) => Some(tls.clone()),
                _ => None,
            };
            Ok(Accepted::Tcp(stream, peer, tls))
        }
    }
}

fn spawn_connection<S: SplitStream, B: BlockBackend>(
    connections: &mut JoinSet<()>,
    stream: S,
    peer: Option<std::net::SocketAddr>,
    tls: Option<Arc<Tls>>,
    exports: &Arc<[Export<B>]>,
    stop: &watch::Receiver<bool>,
) {
    let id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed);
    let span = match peer {
        Some(peer) => info_span!("conn", id, %peer),
        None => info_span!("conn", id),
    };
    let serving = connection::serve(stream, exports.clone(), tls, stop.clone());
    connections.spawn(
        async move {
            debug!("connected");
            match serving.await {
                Ok(()) => debug!("closed"),
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    warn!("closed: protocol error: {e}")
                }
                Err(e) => debug!("closed: {e}"),
            }
        }
        .instrument(span),
    );
}

/// Resolves at the first SIGTERM or SIGINT; a second one exits at once. The handlers are
/// installed when this is called, not when the future is first polled: called as [`run`]'s
/// argument, before any connection is served, a signal that arrives once a client has been
/// answered is always a clean stop (it was fatal while the accept loops ran and the future
/// had not been polled yet). Must be called within the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = signal(SignalKind::terminate())
        .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)));
    async move {
        let Ok((mut term, mut int)) = handlers else {
            tracing::warn!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!(
            "stopping: finishing requests in flight, then flushing (signal again to exit at once)"
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            std::process::exit(130);
        });
    }
}
