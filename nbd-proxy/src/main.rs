//! nbd-proxy: serves VM disk images over NBD. Flags are parsed and sockets bound here, before
//! any thread starts; serving is `nbd_server::run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use nbd_server::listen::{self, Inherited};
use nbd_server::{BlockBackend, Export, FileBackend, Listener};
use tracing::{info, warn};

/// Serve VM disk images over NBD, so a VM's QEMU can use them through this proxy instead of
/// opening the image itself.
///
/// Each --disk becomes an export that QEMU (or qemu-img, nbdinfo, nbdcopy, fio) opens by name.
/// The proxy stops cleanly on SIGTERM or SIGINT: it stops accepting, finishes the requests it has
/// read, flushes the disks, and exits 0; QEMU attached with reconnect-delay waits and reconnects
/// to a restarted proxy without losing guest I/O.
#[derive(Parser, Debug)]
#[command(version, after_help = EXAMPLES)]
struct Cli {
    /// A disk to serve, as NAME=PATH: the export name clients ask for, and a raw image file or
    /// block device. Repeat for several disks.
    #[arg(long = "disk", value_name = "NAME=PATH", required = true, value_parser = parse_disk)]
    disks: Vec<Disk>,

    /// Listen on this unix socket (created with mode 0600; a stale socket is replaced).
    #[arg(long, value_name = "SOCK")]
    socket: Option<PathBuf>,

    /// Also listen on TCP at this address, e.g. 127.0.0.1:10809. There is no authentication:
    /// whoever reaches the address can read and write the disks.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Serve every disk read-only (writes are refused with EPERM).
    #[arg(long)]
    read_only: bool,

    /// Worker threads serving requests [default: one per CPU].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

const EXAMPLES: &str = "\
Examples:
  nbd-proxy --disk root=/var/lib/vms/web.img --socket /run/web.sock
  qemu-system-x86_64 ... \\
    -blockdev driver=nbd,node-name=d0,server.type=unix,server.path=/run/web.sock,export=root,reconnect-delay=10 \\
    -device virtio-blk-pci,drive=d0
  nbdinfo 'nbd+unix:///root?socket=/run/web.sock'

Socket activation (LISTEN_FDS, as systemd or `nbdinfo -- [ nbd-proxy --disk ... ]` pass it) is used
when present, in place of --socket and --listen.
Logs go to stderr; RUST_LOG=debug shows connections and refused requests.";

#[derive(Debug, Clone)]
struct Disk {
    name: String,
    path: PathBuf,
}

fn parse_disk(s: &str) -> Result<Disk, String> {
    let Some((name, path)) = s.split_once('=') else {
        return Err(format!("expected NAME=PATH, got {s:?}"));
    };
    if name.is_empty() || path.is_empty() {
        return Err(format!(
            "expected NAME=PATH with both parts non-empty, got {s:?}"
        ));
    }
    Ok(Disk {
        name: name.to_owned(),
        path: PathBuf::from(path),
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let exports = open_disks(&cli)?;
    // Sockets are bound before the runtime starts threads (socket activation edits the environment).
    let (listeners, socket_file) = bind(&cli)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let served = runtime.block_on(async {
        let listeners = listeners
            .into_iter()
            .map(into_tokio)
            .collect::<std::io::Result<Vec<_>>>()?;
        nbd_server::run(listeners, exports, shutdown_signal()).await
    });
    if let Some(path) = socket_file {
        let _ = std::fs::remove_file(path);
    }
    served.context("serve")?;
    info!("stopped");
    Ok(())
}

fn open_disks(cli: &Cli) -> anyhow::Result<Vec<Export<FileBackend>>> {
    let mut exports: Vec<Export<FileBackend>> = Vec::new();
    for disk in &cli.disks {
        if exports.iter().any(|e| e.info.name == disk.name) {
            bail!("export name {:?} is given twice", disk.name);
        }
        let backend = FileBackend::open(&disk.path, cli.read_only)
            .with_context(|| format!("open disk {} ({})", disk.name, disk.path.display()))?;
        if backend.size_bytes() == 0 {
            warn!(export = %disk.name, "disk {} is empty", disk.path.display());
        }
        let description = disk.path.display().to_string();
        exports.push(Export::new(&disk.name, &description, Arc::new(backend)));
    }
    Ok(exports)
}

enum StdListener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

/// Binds the listening sockets; also returns the socket file to remove at exit.
fn bind(cli: &Cli) -> anyhow::Result<(Vec<StdListener>, Option<PathBuf>)> {
    let inherited = listen::activated().context("take socket-activation sockets")?;
    if !inherited.is_empty() {
        info!("using {} socket(s) from socket activation", inherited.len());
        let listeners = inherited
            .into_iter()
            .map(|l| match l {
                Inherited::Unix(u) => StdListener::Unix(u),
                Inherited::Tcp(t) => StdListener::Tcp(t),
            })
            .collect();
        return Ok((listeners, None));
    }
    if cli.socket.is_none() && cli.listen.is_none() {
        bail!("nowhere to listen: give --socket SOCK and/or --listen ADDR");
    }
    let mut listeners = Vec::new();
    if let Some(path) = &cli.socket {
        let l = listen::bind_unix(path)
            .with_context(|| format!("listen on unix socket {}", path.display()))?;
        listeners.push(StdListener::Unix(l));
        for e in &cli.disks {
            info!(
                "serving {} at nbd+unix:///{}?socket={}",
                e.path.display(),
                e.name,
                path.display()
            );
        }
    }
    if let Some(addr) = cli.listen {
        let l =
            std::net::TcpListener::bind(addr).with_context(|| format!("listen on TCP {addr}"))?;
        let addr = l.local_addr()?;
        listeners.push(StdListener::Tcp(l));
        for e in &cli.disks {
            info!("serving {} at nbd://{addr}/{}", e.path.display(), e.name);
        }
    }
    Ok((listeners, cli.socket.clone()))
}

fn into_tokio(listener: StdListener) -> std::io::Result<Listener> {
    Ok(match listener {
        StdListener::Unix(l) => {
            l.set_nonblocking(true)?;
            Listener::Unix(tokio::net::UnixListener::from_std(l)?)
        }
        StdListener::Tcp(l) => {
            l.set_nonblocking(true)?;
            Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
        }
    })
}

/// Resolves at the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("stopping: finishing requests in flight, then flushing (signal again to exit at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        std::process::exit(130);
    });
}
