//! nbd-proxy: serves VM disk images over NBD and, with --replicate, captures every change and
//! ships it to a replicator. Flags are parsed and sockets bound here, before any thread starts;
//! serving is `nbd_server::run`, capture is `capture`, shipping is `ship`.

mod activity;
mod capture;
mod control;
mod disk;
mod metrics;
mod rangelock;
mod record;
mod resync;
mod ship;
mod writeback;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use journal::units::{parse_duration, parse_size};
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
///
/// With --replicate, every write, zeroing, trim and flush is also recorded in order and sent to
/// a replicator, which keeps the whole history (continuous data protection).
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// A disk to serve, as NAME=PATH: the export name clients ask for, and a raw image file or
    /// block device. Repeat for several disks (of one VM: they replicate as one group).
    #[arg(long = "disk", value_name = "NAME=PATH", required = true, value_parser = parse_disk)]
    disks: Vec<Disk>,

    /// Listen on this unix socket (created with mode 0600; a stale socket is replaced).
    #[arg(long, value_name = "SOCK")]
    socket: Option<PathBuf>,

    /// Also listen on TCP at this address, e.g. 127.0.0.1:10809. Without --tls require, whoever
    /// reaches the address can read and write the disks.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// NBD over TLS on --listen (STARTTLS, x509): off, on (clients choose) or require
    /// (plaintext clients are refused). The certificate is --tls-cert; with --tls-ca, NBD
    /// clients must present a certificate signed by it. Unix sockets stay plaintext (0600).
    #[arg(long, value_enum, default_value = "off", help_heading = "TLS")]
    tls: tls::Mode,

    /// The certificate and key identify this proxy to the replicator (its name must be the
    /// group's, or allowed for it there) and to NBD clients on --listen; the CA signed the
    /// replicator's certificate (and those of NBD clients).
    #[command(flatten)]
    tls_files: tls::Files,

    /// The name the replicator's certificate must carry [default: the host of --replicate].
    #[arg(long, value_name = "NAME", help_heading = "TLS")]
    tls_server_name: Option<String>,

    /// Replicate over plain TCP, unauthenticated and unencrypted (anyone on the path can read
    /// the disks' changes; anyone who reaches the replicator can pose as this group).
    #[arg(long, help_heading = "TLS")]
    insecure: bool,

    /// Serve every disk read-only (writes are refused with EPERM).
    #[arg(long)]
    read_only: bool,

    /// Worker threads serving requests [default: one per CPU].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Replicate every change to the replicator at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", help_heading = "Replication")]
    replicate: Option<String>,

    /// Name of this VM's group at the replicator: its disks share one sequence, so any point
    /// is consistent across them [default: the first disk's file name without extension].
    #[arg(long, value_name = "NAME", help_heading = "Replication")]
    group: Option<String>,

    /// async: reply to the guest after the local write (RPO: the lag, usually milliseconds).
    /// sync: reply only once the replicator has the write on disk (RPO 0; while the replicator
    /// is away writes wait, up to --sync-timeout).
    #[arg(
        long,
        value_enum,
        default_value = "async",
        help_heading = "Replication"
    )]
    mode: capture::Mode,

    /// Sync mode: how long a write waits for the replicator's acknowledgement before sync mode
    /// degrades to async (writes acknowledged before they are replicated, dirty tracking when
    /// the log fills) until the replicator has caught up; `never` keeps writes waiting for as
    /// long as the replicator is away (RPO 0, but the VM stalls with it).
    #[arg(long, value_name = "AGE|never", value_parser = parse_sync_timeout, default_value = "10s", help_heading = "Replication")]
    sync_timeout: SyncTimeout,

    /// A replicator that sends nothing (not even a keepalive) for this long is taken to be gone,
    /// even when its host vanished without closing the connection; every write to it has the
    /// same deadline. The proxy then reconnects.
    #[arg(long, value_name = "AGE", value_parser = parse_duration, default_value = "5s", help_heading = "Replication")]
    link_timeout: Duration,

    /// Memory for changes not yet acknowledged by the replicator.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "256MiB", help_heading = "Replication")]
    log_capacity: u64,

    /// What to do when the change log is full: bitmap (keep the guest at full speed, track
    /// dirty chunks, resync them later) or block (make guest writes wait).
    #[arg(
        long,
        value_enum,
        default_value = "bitmap",
        help_heading = "Replication"
    )]
    on_full: capture::OnFull,

    /// Who writes the disks' dirty pages back while replicating. auto: the proxy sweeps them
    /// to disk a slice at a time while the replicator's store shares a disk with them (its
    /// journal's fsyncs would otherwise queue behind the kernel's bursts), and leaves them to
    /// the kernel, as without replication, when the store is on other disks or another
    /// machine (cheaper for the guest). sweep, kernel: always one or the other.
    #[arg(long, value_enum, default_value = "auto", help_heading = "Replication")]
    writeback: writeback::Setting,

    /// Activity log: a small file marking the extents that may hold changes the replicator
    /// has not acknowledged, so that after a crash only those are resent
    /// [default: FIRST_DISK_PATH.cdp-al]. Without a valid one, a restarted proxy compares every
    /// chunk with the replicator by hash.
    #[arg(long, value_name = "FILE", help_heading = "Replication")]
    activity_log: Option<PathBuf>,

    /// Unix socket for `nbd-proxy status` and `nbd-proxy bookmark`.
    #[arg(long, value_name = "CTLSOCK", help_heading = "Replication")]
    control: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9100: lag, change log
    /// fill, seqs, records and bytes shipped, dirty chunks, sync and link state (what status
    /// shows). No authentication: bind it to loopback or a management network.
    #[arg(long, value_name = "ADDR", help_heading = "Replication")]
    metrics: Option<SocketAddr>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a running proxy's replication state: link, lag, rates (guest writes, records
    /// captured and acknowledged, bytes shipped, over the last 1 s and 10 s), log fill, resync
    /// progress.
    Status {
        /// The proxy's --control socket.
        #[arg(long, value_name = "CTLSOCK")]
        control: PathBuf,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Flush every disk, then place a named recovery point in the stream (for example before
    /// an upgrade); waits until the replicator has it on disk.
    Bookmark {
        #[arg(long, value_name = "CTLSOCK")]
        control: PathBuf,
        /// How long to wait for the replicator's acknowledgement.
        #[arg(long, value_name = "AGE", value_parser = parse_duration, default_value = "30s")]
        timeout: Duration,
        /// The bookmark's name, as `restore --at bookmark:NAME` will use it.
        name: String,
    },
}

const EXAMPLES: &str = "\
Examples:
  nbd-proxy --disk root=/var/lib/vms/web.img --socket /run/web.sock
  qemu-system-x86_64 ... \\
    -blockdev driver=nbd,node-name=d0,server.type=unix,server.path=/run/web.sock,export=root,reconnect-delay=10 \\
    -device virtio-blk-pci,drive=d0
  nbdinfo 'nbd+unix:///root?socket=/run/web.sock'

Protect a VM: replicate every change to a replicator, with a control socket:
  nbd-proxy --disk root=/vms/web.img --disk data=/vms/web-data.img --socket /run/web.sock \
    --group web --replicate 127.0.0.1:7070 --control /run/web.ctl
  nbd-proxy status --control /run/web.ctl
  nbd-proxy ... --metrics 127.0.0.1:9100
  curl -s http://127.0.0.1:9100/metrics
  nbd-proxy bookmark --control /run/web.ctl before-upgrade

Socket activation (LISTEN_FDS, as systemd or `nbdinfo -- [ nbd-proxy --disk ... ]` pass it) is used
when present, in place of --socket and --listen.
Logs go to stderr; RUST_LOG=debug shows connections and refused requests.";

#[derive(Debug, Clone, Copy)]
struct SyncTimeout(Option<Duration>);

fn parse_sync_timeout(s: &str) -> Result<SyncTimeout, String> {
    if s == "never" {
        return Ok(SyncTimeout(None));
    }
    parse_duration(s).map(|d| SyncTimeout(Some(d)))
}

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
    // One malloc arena: change-log records are allocated on the serving threads and freed on
    // the shipper's, which with per-thread arenas left up to three times the log's budget
    // resident (measured: 230 MiB peak for a 64 MiB log; 79 MiB with one arena).
    // SAFETY: called before any other thread exists; only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if cli.command.is_some() {
        journal::quiet_on_closed_pipe();
    }
    match &cli.command {
        Some(Command::Status { control, json }) => {
            let reply = control::request(control, &control::Request::Status)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                let status: control::Status =
                    serde_json::from_value(reply).context("read the proxy's status")?;
                control::print_status(&status);
            }
            return Ok(());
        }
        Some(Command::Bookmark {
            control,
            timeout,
            name,
        }) => {
            let reply = control::request(
                control,
                &control::Request::Bookmark {
                    name: name.clone(),
                    timeout_ms: timeout.as_millis() as u64,
                },
            )?;
            if reply["ok"] != serde_json::Value::Bool(true) {
                bail!(
                    "bookmark refused: {}",
                    reply["error"].as_str().unwrap_or("?")
                );
            }
            let seq = reply["seq"].as_u64().unwrap_or(0);
            if reply["durable"] == serde_json::Value::Bool(true) {
                println!("bookmark {name} placed at seq {seq}, durable at the replicator");
            } else {
                println!(
                    "bookmark {name} placed at seq {seq}; the replicator has not acknowledged it within {}s yet",
                    timeout.as_secs()
                );
            }
            return Ok(());
        }
        None => {}
    }
    if cli.replicate.is_none() && cli.control.is_some() {
        bail!("--control needs --replicate (it reports and bookmarks replication)");
    }
    if cli.replicate.is_none() && cli.metrics.is_some() {
        bail!("--metrics needs --replicate (it reports replication)");
    }
    if cli.replicate.is_some() && cli.read_only {
        bail!("--read-only disks never change: there is nothing to replicate");
    }

    let files = open_disks(&cli)?;
    // Sockets are bound before the runtime starts threads (socket activation edits the environment).
    let (listeners, socket_file) = bind(&cli)?;
    let control_listener = cli
        .control
        .as_ref()
        .map(|p| {
            listen::bind_unix(p)
                .with_context(|| format!("listen on control socket {}", p.display()))
        })
        .transpose()?;
    let metrics_listener = cli
        .metrics
        .map(|a| {
            std::net::TcpListener::bind(a).with_context(|| format!("listen for --metrics on {a}"))
        })
        .transpose()?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let served = match &cli.replicate {
        None => {
            let exports = files
                .into_iter()
                .map(|(disk, backend)| export(&disk, backend))
                .collect();
            serve(&runtime, listeners, exports)
        }
        Some(addr) => {
            let replication = start_replication(
                &cli,
                addr,
                files,
                &runtime,
                control_listener,
                metrics_listener,
            )?;
            let exports = replication
                .disks
                .iter()
                .zip(&cli.disks)
                .map(|(b, disk)| {
                    Export::new(&disk.name, &disk.path.display().to_string(), b.clone())
                })
                .collect();
            let served = serve(&runtime, listeners, exports);
            replication.drain(&runtime);
            served
        }
    };
    for path in socket_file.iter().chain(cli.control.iter()) {
        let _ = std::fs::remove_file(path);
    }
    served.context("serve")?;
    info!("stopped");
    Ok(())
}

fn serve<B: BlockBackend>(
    runtime: &tokio::runtime::Runtime,
    listeners: Vec<StdListener>,
    exports: Vec<Export<B>>,
) -> std::io::Result<()> {
    runtime.block_on(async {
        let listeners = listeners
            .into_iter()
            .map(into_tokio)
            .collect::<std::io::Result<Vec<_>>>()?;
        nbd_server::run(listeners, exports, nbd_server::shutdown_signal()).await
    })
}

fn export(disk: &Disk, backend: FileBackend) -> Export<FileBackend> {
    let description = disk.path.display().to_string();
    Export::new(&disk.name, &description, Arc::new(backend))
}

/// The capture side of a replicated group, running.
struct Replication {
    disks: Vec<Arc<disk::CaptureBackend>>,
    capture: Arc<capture::Capture>,
}

impl Replication {
    /// At a clean stop, gives the replicator a few seconds to acknowledge what is still in the
    /// log (a restarted proxy would otherwise compare every chunk by hash).
    fn drain(&self, runtime: &tokio::runtime::Runtime) {
        let last = self.capture.last_seq();
        if *self.capture.acked.borrow() < last && self.capture.is_live() {
            info!("waiting up to 10 s for the replicator to acknowledge seq {last}");
            let done = runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), self.capture.durable(last)).await
            });
            if done.is_err() {
                warn!(
                    "the replicator has seq {} of {last}; the next start resends what the activity log marks",
                    *self.capture.acked.borrow()
                );
            }
        }
        if let Some(al) = &self.capture.activity {
            if let Err(e) = al.clean_at_stop(*self.capture.acked.borrow()) {
                warn!("write activity log {}: {e}", al.path().display());
            }
        }
    }
}

fn start_replication(
    cli: &Cli,
    addr: &str,
    files: Vec<(Disk, FileBackend)>,
    runtime: &tokio::runtime::Runtime,
    control_listener: Option<std::os::unix::net::UnixListener>,
    metrics_listener: Option<std::net::TcpListener>,
) -> anyhow::Result<Replication> {
    let group = match &cli.group {
        Some(g) => g.clone(),
        None => default_group(&cli.disks[0]),
    };
    journal::names::check("group", &group).map_err(|e| anyhow::anyhow!("--group: {e}"))?;
    // Disk names become file names in the replicator's store.
    journal::names::check_volumes(cli.disks.iter().map(|d| d.name.as_str())).map_err(|e| {
        anyhow::anyhow!(
            "--disk: {e} (with --replicate, a disk's name names its files at the replicator)"
        )
    })?;
    let sizes: Vec<u64> = files.iter().map(|(_, f)| f.size_bytes()).collect();
    let al_path = cli.activity_log.clone().unwrap_or_else(|| {
        let mut p = cli.disks[0].path.clone().into_os_string();
        p.push(".cdp-al");
        PathBuf::from(p)
    });
    let (al, recovered) = activity::ActivityLog::open(&al_path, &group, &sizes)
        .with_context(|| format!("open activity log {}", al_path.display()))?;
    match &recovered {
        Some(r) => info!(
            "activity log {}: {} extents may hold changes the replicator lacks; resending those",
            al_path.display(),
            r.extents.iter().map(Vec::len).sum::<usize>()
        ),
        None => info!(
            "activity log {}: no trusted state; the disks will be compared with the replicator by hash",
            al_path.display()
        ),
    }
    let stream = al.stream().to_owned();
    let (capture, rx) = capture::Capture::new(
        sizes,
        cli.log_capacity.max(1 << 20),
        cli.mode,
        cli.on_full,
        cli.sync_timeout.0,
        Some((al, recovered)),
    );
    let disks: Vec<Arc<disk::CaptureBackend>> = files
        .iter()
        .enumerate()
        .map(|(i, (_, file))| -> anyhow::Result<_> {
            Ok(Arc::new(disk::CaptureBackend {
                file: FileBackend::open(file.path(), false)?,
                locks: Default::default(),
                capture: capture.clone(),
                disk: i as u16,
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    let volumes = files
        .iter()
        .map(|(d, f)| journal::wire::Volume {
            name: d.name.clone(),
            size: f.size_bytes(),
        })
        .collect();
    let link = Arc::new(Mutex::new(ship::LinkInfo::default()));
    let writeback = Arc::new(writeback::Policy::new(
        cli.writeback,
        &files
            .iter()
            .map(|(d, _)| d.path.clone())
            .collect::<Vec<_>>(),
    ));
    let shipper = ship::Shipper {
        addr: addr.to_owned(),
        group: group.clone(),
        volumes,
        capture: capture.clone(),
        disks: disks.clone(),
        runtime: runtime.handle().clone(),
        link: link.clone(),
        stream,
        link_timeout: cli.link_timeout.max(Duration::from_millis(200)),
        tls: link_tls(cli, addr)?,
        writeback: writeback.clone(),
    };
    std::thread::Builder::new()
        .name("shipper".into())
        .spawn(move || shipper.run(rx))?;
    runtime.spawn(clean_activity_log(capture.clone()));
    let images = files
        .iter()
        .map(|(_, f)| std::fs::File::open(f.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .context("open the disks for writeback")?;
    std::thread::Builder::new()
        .name("writeback".into())
        .spawn({
            let (capture, writeback) = (capture.clone(), writeback.clone());
            move || writeback::run(capture, images, writeback)
        })?;
    info!(
        "replicating group {group} to {addr} (mode {:?}{}, change log {}, on full: {:?}, link timeout {:?})",
        cli.mode,
        match (cli.mode, cli.sync_timeout.0) {
            (capture::Mode::Sync, Some(t)) => format!(", degrading to async after {t:?} without the replicator"),
            (capture::Mode::Sync, None) => ", waiting for the replicator however long it is away".into(),
            _ => String::new(),
        },
        journal::units::human_bytes(cli.log_capacity),
        cli.on_full,
        cli.link_timeout
    );
    let control = Arc::new(control::Control {
        group,
        replicator: addr.to_owned(),
        capture: capture.clone(),
        disks: files
            .iter()
            .zip(&disks)
            .map(|((d, _), b)| (d.name.clone(), d.path.display().to_string(), b.clone()))
            .collect(),
        link,
        writeback,
        live: Default::default(),
    });
    if control_listener.is_some() || metrics_listener.is_some() {
        metrics::start(control.clone(), metrics_listener.is_some())
            .context("start the metrics sampler")?;
    }
    if let Some(l) = metrics_listener {
        info!("serving metrics at http://{}/metrics", l.local_addr()?);
        let scraped = control.clone();
        journal::metrics::serve_http(l, Arc::new(move || scraped.live.scrape()))
            .context("start the metrics endpoint")?;
    }
    if let Some(l) = control_listener {
        l.set_nonblocking(true)?;
        let _guard = runtime.enter();
        let listener = tokio::net::UnixListener::from_std(l)?;
        runtime.spawn(control::serve(listener, control));
    }
    Ok(Replication { disks, capture })
}

/// Clears activity-log extents whose changes are durable, once a second.
async fn clean_activity_log(capture: Arc<capture::Capture>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let acked = *capture.acked.borrow();
        if let Some(al) = capture.activity.clone() {
            // A file sync (each second while writes flow): on a blocking thread, not on a
            // worker that also runs connections' writes.
            let path = al.path().to_owned();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || al.clean(acked)).await {
                tracing::error!("write activity log {}: {e}", path.display());
            }
        }
    }
}

/// The first disk's file name without its extension, made into a valid group name.
fn default_group(disk: &Disk) -> String {
    let stem = disk
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cleaned: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cleaned: String = cleaned
        .trim_start_matches('.')
        .chars()
        .take(journal::names::MAX_NAME_LEN)
        .collect();
    if cleaned.is_empty() {
        disk.name.clone()
    } else {
        cleaned
    }
}

fn open_disks(cli: &Cli) -> anyhow::Result<Vec<(Disk, FileBackend)>> {
    let mut out: Vec<(Disk, FileBackend)> = Vec::new();
    for disk in &cli.disks {
        if out.iter().any(|(d, _)| d.name == disk.name) {
            bail!("export name {:?} is given twice", disk.name);
        }
        let backend = FileBackend::open(&disk.path, cli.read_only)
            .with_context(|| format!("open disk {} ({})", disk.name, disk.path.display()))?;
        if backend.size_bytes() == 0 {
            warn!(export = %disk.name, "disk {} is empty", disk.path.display());
        }
        out.push((disk.clone(), backend));
    }
    Ok(out)
}

enum StdListener {
    Unix(std::os::unix::net::UnixListener),
    /// TCP, with the TLS it offers (`--tls on|require`).
    Tcp(std::net::TcpListener, Option<Arc<nbd_server::Tls>>),
}

/// Mutual TLS to the replicator at `addr`, or None with --insecure.
fn link_tls(
    cli: &Cli,
    addr: &str,
) -> anyhow::Result<
    Option<(
        Arc<tls::rustls::ClientConfig>,
        tls::rustls::pki_types::ServerName<'static>,
    )>,
> {
    if cli.insecure {
        warn!(
            "--insecure: changes go to the replicator over plain TCP, unauthenticated and \
             unencrypted"
        );
        return Ok(None);
    }
    let files = &cli.tls_files;
    let (Some(cert), Some(key), Some(ca)) = (&files.tls_cert, &files.tls_key, &files.tls_ca) else {
        bail!(
            "--replicate needs TLS: give --tls-cert, --tls-key and --tls-ca (a lab's come from \
             `replicator tls issue --dir DIR --group NAME`), or --insecure for plain TCP"
        );
    };
    let config = tls::client_config(ca, Some((cert, key)))?;
    let name = tls::server_name(cli.tls_server_name.as_deref().unwrap_or(tls::host_of(addr)))?;
    Ok(Some((config, name)))
}

/// Binds the listening sockets; also returns the socket file to remove at exit. TLS (`--tls`)
/// is offered on TCP only: a unix socket is reachable only through its 0600 mode.
fn bind(cli: &Cli) -> anyhow::Result<(Vec<StdListener>, Option<PathBuf>)> {
    let tls = nbd_server::Tls::from_flags(cli.tls, &cli.tls_files)
        .context("NBD over TLS (--tls)")?
        .map(Arc::new);
    let (listeners, socket_file) = bind_sockets(cli, &tls)?;
    if tls.is_some() && !listeners.iter().any(|l| matches!(l, StdListener::Tcp(..))) {
        bail!("--tls is for NBD on TCP (--listen); unix sockets stay plaintext");
    }
    Ok((listeners, socket_file))
}

fn bind_sockets(
    cli: &Cli,
    tls: &Option<Arc<nbd_server::Tls>>,
) -> anyhow::Result<(Vec<StdListener>, Option<PathBuf>)> {
    let inherited = listen::activated().context("take socket-activation sockets")?;
    if !inherited.is_empty() {
        info!("using {} socket(s) from socket activation", inherited.len());
        let listeners = inherited
            .into_iter()
            .map(|l| match l {
                Inherited::Unix(u) => StdListener::Unix(u),
                Inherited::Tcp(t) => StdListener::Tcp(t, tls.clone()),
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
        listeners.push(StdListener::Tcp(l, tls.clone()));
        let with_tls = match cli.tls {
            tls::Mode::Off => "",
            tls::Mode::On => ", TLS offered (nbds://)",
            tls::Mode::Require => ", TLS required (nbds://)",
        };
        for e in &cli.disks {
            info!(
                "serving {} at nbd://{addr}/{}{with_tls}",
                e.path.display(),
                e.name
            );
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
        StdListener::Tcp(l, tls) => {
            l.set_nonblocking(true)?;
            Listener::tcp(tokio::net::TcpListener::from_std(l)?, tls)
        }
    })
}
