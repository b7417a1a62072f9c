//! restore: lists the recovery points of a replicator's store and materializes any of them as
//! an NBD export (instant recovery), an image file, or a boot-verified check. The store is only
//! ever read: writes to an export go to an overlay of its own.

mod open;
mod remote;
mod verify;
mod view;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use journal::pit::{format_time, History, Source};
use journal::units::human_bytes;
use nbd_server::{Export, Listener};
use tracing::info;

/// Restore any point of a protected VM's disks: list the points a store holds, serve one as an
/// NBD export a VM boots from at once, write one out as an image, or boot one to prove it works.
#[derive(Parser, Debug)]
#[command(version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Groups, disks, the history window, bookmarks, flush points, and windows that are not
    /// consistent (a seed or resync ran there).
    List {
        /// The replicator's store directory, or s3://BUCKET/PREFIX (its store on S3).
        #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
        store: PathBuf,
        #[command(flatten)]
        remote: remote::CacheArgs,
        /// Only this group.
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Serve a point as NBD exports (one per disk, named like the disks) until SIGTERM/SIGINT.
    Export {
        #[command(flatten)]
        point: PointArgs,
        /// Listen on this unix socket.
        #[arg(long, value_name = "SOCK", required_unless_present = "listen")]
        socket: Option<PathBuf>,
        /// Listen on TCP at this address. Without --tls require, whoever reaches it can read
        /// the point (and with --writable, write its overlay).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Accept writes (a VM booting from the point needs this); they go to a sparse overlay
        /// file, never to the store, and are discarded at exit unless --keep-overlay.
        #[arg(long)]
        writable: bool,
        /// Directory for the overlay files [default: a temporary directory].
        #[arg(long, value_name = "DIR", requires = "writable")]
        overlay: Option<PathBuf>,
        /// Keep the overlay files (in --overlay) at exit.
        #[arg(long, requires = "overlay")]
        keep_overlay: bool,
        /// NBD over TLS on --listen (STARTTLS, x509): off, on (clients choose) or require
        /// (plaintext clients are refused). Needs --tls-cert and --tls-key; with --tls-ca,
        /// clients must present a certificate signed by it. Unix sockets stay plaintext.
        #[arg(long, value_enum, default_value = "off", help_heading = "TLS")]
        tls: tls::Mode,
        #[command(flatten)]
        tls_files: tls::Files,
    },
    /// Write a point of one disk to an image file, checking every record on the way.
    Materialize {
        #[command(flatten)]
        point: PointArgs,
        /// The image to write (must not exist).
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: Format,
    },
    /// Boot a point under QEMU (from an export with a throw-away overlay) and wait for a line on
    /// the serial console: proof that the backup boots. Exit status 0 on pass, 1 on fail.
    Verify {
        #[command(flatten)]
        point: PointArgs,
        #[command(flatten)]
        boot: verify::BootArgs,
    },
}

#[derive(clap::Args, Debug)]
struct PointArgs {
    /// The replicator's store directory, or s3://BUCKET/PREFIX (its store on S3: read on
    /// demand by range GETs, every block checked before it is served).
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    store: PathBuf,
    #[command(flatten)]
    remote: remote::CacheArgs,
    /// The group (one VM) to restore.
    #[arg(long, value_name = "NAME")]
    group: String,
    /// Only this disk of the group [default: all of them; materialize needs one when the group
    /// has several].
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// The point: latest, seq:N, bookmark:NAME, a UTC time (2026-11-22T10:15:03Z) or a
    /// relative one (-5m: five minutes ago; `--at -5m` and `--at=-5m` both work).
    #[arg(long, value_name = "POINT", allow_hyphen_values = true)]
    at: String,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Raw,
    Qcow2,
}

const EXAMPLES: &str = "\
Examples:
  restore list --store /srv/cdp
  restore export --store /srv/cdp --group web --at bookmark:before-upgrade --socket /run/web-past.sock --writable
  restore export --store /srv/cdp --group web --at 2026-11-22T10:15:03Z --listen 127.0.0.1:10810
  restore materialize --store /srv/cdp --group web --disk root --at -5m --output root.qcow2 --format qcow2
  restore verify --store /srv/cdp --group web --at latest --boot --expect 'login:'
  AWS_ENDPOINT_URL=http://127.0.0.1:8333 restore export --store s3://cdp/site1 --group web --at -1h --socket /run/web.sock --writable

Points inside a seed or resync window are refused: the disks there are not a state the VM was
ever in. `restore list` shows them.";

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match cli.command {
        Command::List {
            store,
            group,
            json,
            remote,
        } => {
            journal::quiet_on_closed_pipe();
            remote::Store::open(&store, &remote).and_then(|s| list(&s, group.as_deref(), json))
        }
        Command::Export {
            point,
            socket,
            listen,
            writable,
            overlay,
            keep_overlay,
            tls,
            tls_files,
        } => export(
            &point,
            Listen {
                socket,
                tcp: listen,
                tls,
                tls_files,
            },
            writable,
            overlay,
            keep_overlay,
        ),
        Command::Materialize {
            point,
            output,
            format,
        } => materialize(&point, &output, format),
        Command::Verify { point, boot } => point
            .store()
            .and_then(|s| verify::verify(&s, &point.group, &point.at, &boot)),
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("restore: {e:#}");
            std::process::exit(2);
        }
    }
}

impl PointArgs {
    fn store(&self) -> anyhow::Result<remote::Store> {
        remote::Store::open(&self.store, &self.remote)
    }
}

#[derive(Debug, serde::Serialize)]
struct Listing {
    group: String,
    volumes: Vec<journal::wire::Volume>,
    oldest_seq: u64,
    oldest_time: String,
    newest_seq: u64,
    newest_time: String,
    latest_consistent_seq: Option<u64>,
    bookmarks: Vec<serde_json::Value>,
    flushes: u64,
    last_flush_seq: Option<u64>,
    inconsistent: Vec<serde_json::Value>,
    /// A record that does not read back where the journal is durable: history ends before it.
    damage: Option<String>,
}

fn listing(h: &History) -> Listing {
    let oldest_time = h.oldest_time_ns();
    Listing {
        group: h.meta.name.clone(),
        volumes: h.meta.volumes.clone(),
        oldest_seq: h.oldest_seq(),
        oldest_time: format_time(oldest_time),
        newest_seq: h.last_seq,
        newest_time: format_time(h.last_time_ns),
        latest_consistent_seq: h.resolve(&journal::pit::Point::Latest).ok(),
        bookmarks: h
            .bookmarks
            .iter()
            .map(|b| {
                serde_json::json!({
                    "name": b.name, "seq": b.seq, "time": format_time(b.time_ns),
                    "consistent": h.is_consistent(b.seq),
                })
            })
            .collect(),
        flushes: h.flushes,
        last_flush_seq: h.last_flush.map(|(s, _)| s),
        inconsistent: h
            .inconsistent
            .iter()
            .map(|w| {
                serde_json::json!({
                    "from_seq": w.start, "to_seq": w.end,
                    "from_time": format_time(w.start_time_ns),
                    "to_time": w.end_time_ns.map(format_time),
                })
            })
            .collect(),
        damage: h.damage.as_ref().map(|d| d.to_string()),
    }
}

fn list(store: &remote::Store, group: Option<&str>, json: bool) -> anyhow::Result<bool> {
    let (listings, broken) = match store {
        remote::Store::Dir(store) => {
            let groups = match group {
                Some(g) => vec![open::group_dir(store, g)?],
                None => journal::store::list_groups(store)
                    .with_context(|| format!("read store {}", store.display()))?,
            };
            let listings = groups
                .iter()
                .map(|d| History::load(d).map(|h| listing(&h)))
                .collect::<std::io::Result<Vec<_>>>()?;
            let broken = if group.is_none() {
                journal::store::list_broken_groups(store)?
            } else {
                Vec::new()
            };
            (listings, broken)
        }
        remote::Store::Bucket(r) => {
            let groups = match group {
                Some(g) => vec![g.to_owned()],
                None => r.groups()?,
            };
            let listings = groups
                .iter()
                .map(|g| r.history(g).map(|(h, _)| listing(&h)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            (listings, Vec::new())
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&listings)?);
        return Ok(true);
    }
    for b in &broken {
        eprintln!(
            "restore: {} holds a group's files but no group.json: it cannot be restored (run `replicator check`)",
            b.display()
        );
    }
    if listings.is_empty() && broken.is_empty() {
        println!("store {store}: no groups");
    }
    for l in &listings {
        println!("group {}", l.group);
        for v in &l.volumes {
            println!("  disk        {:<12} {}", v.name, human_bytes(v.size));
        }
        println!(
            "  window      seq {}..{}   {} .. {}",
            l.oldest_seq, l.newest_seq, l.oldest_time, l.newest_time
        );
        match l.latest_consistent_seq {
            Some(s) => println!("  latest      seq {s} (--at latest)"),
            None => println!("  latest      none: no consistent point yet"),
        }
        println!(
            "  flushes     {}{}",
            l.flushes,
            l.last_flush_seq
                .map(|s| format!(" (last at seq {s})"))
                .unwrap_or_default()
        );
        for b in &l.bookmarks {
            println!(
                "  bookmark    {:<20} seq {:<8} {}{}",
                b["name"].as_str().unwrap_or(""),
                b["seq"],
                b["time"].as_str().unwrap_or(""),
                if b["consistent"] == true {
                    ""
                } else {
                    "  NOT CONSISTENT (inside a resync)"
                }
            );
        }
        for w in &l.inconsistent {
            println!(
                "  not consistent  seq {}..{}  {} .. {}  (seed or resync: refused by --at)",
                w["from_seq"],
                if w["to_seq"].is_null() {
                    "(running)".to_string()
                } else {
                    w["to_seq"].to_string()
                },
                w["from_time"].as_str().unwrap_or(""),
                w["to_time"].as_str().unwrap_or("now"),
            );
        }
        if let Some(d) = &l.damage {
            println!(
                "  DAMAGED     {d}: points after seq {} are refused",
                l.newest_seq
            );
        }
    }
    Ok(broken.is_empty())
}

/// Where an export listens: `--socket`, `--listen` and its `--tls` flags.
struct Listen {
    socket: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    tls: tls::Mode,
    tls_files: tls::Files,
}

impl Listen {
    /// The TLS that `--listen` offers; checked before anything is opened.
    fn tls(&self) -> anyhow::Result<Option<Arc<nbd_server::Tls>>> {
        let tls = nbd_server::Tls::from_flags(self.tls, &self.tls_files)
            .context("NBD over TLS (--tls)")?;
        if tls.is_none() && self.tls_files.any() {
            bail!("--tls-cert, --tls-key and --tls-ca are for --tls on or --tls require");
        }
        if tls.is_some() && self.tcp.is_none() {
            bail!("--tls is for NBD on TCP (--listen); unix sockets stay plaintext");
        }
        Ok(tls.map(Arc::new))
    }
}

fn export(
    p: &PointArgs,
    listen: Listen,
    writable: bool,
    overlay: Option<PathBuf>,
    keep_overlay: bool,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let tls = listen.tls()?;
    let Listen {
        socket,
        tcp: listen,
        ..
    } = listen;
    let temp_overlay = if writable && overlay.is_none() {
        Some(
            tempfile::Builder::new()
                .prefix("restore-overlay-")
                .tempdir()?,
        )
    } else {
        None
    };
    let overlay_dir = overlay
        .clone()
        .or_else(|| temp_overlay.as_ref().map(|t| t.path().to_owned()));
    let store = p.store()?;
    if let Some(o) = &overlay {
        refuse_inside_store(&store, o)?;
    }
    let mut opened = open::open_point(
        &store,
        &p.group,
        p.disk.as_deref(),
        &p.at,
        overlay_dir.as_deref().map(|d| (d, keep_overlay)),
    )?;
    let what = format!(
        "group {} at {}{}",
        p.group,
        open::describe(&opened),
        if p.at.starts_with("bookmark:") {
            format!(" [{}]", p.at)
        } else {
            String::new()
        }
    );
    let disks = open::into_arcs(&mut opened);
    let exports: Vec<Export<view::PointView>> = disks
        .iter()
        .map(|(name, _, v)| Export::new(name, &what, v.clone()))
        .collect();
    let mut std_listeners: Vec<std::os::unix::net::UnixListener> = Vec::new();
    if let Some(path) = &socket {
        let l = nbd_server::listen::bind_unix(path)
            .with_context(|| format!("listen on {}", path.display()))?;
        std_listeners.push(l);
    }
    let tcp = match listen {
        Some(addr) => {
            Some(std::net::TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))?)
        }
        None => None,
    };
    println!(
        "exporting {what}, {}",
        if writable {
            format!(
                "writable (writes go to overlays in {}{})",
                overlay_dir
                    .as_deref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
                if keep_overlay {
                    ", kept at exit"
                } else {
                    ", discarded at exit"
                }
            )
        } else {
            "read-only".into()
        }
    );
    for (name, size, _) in &disks {
        let mut lines = Vec::new();
        if let Some(path) = &socket {
            lines.push(format!("nbd+unix:///{name}?socket={}", path.display()));
            lines.push(format!(
                "-blockdev driver=nbd,node-name={name},server.type=unix,server.path={},export={name}{}",
                path.display(),
                if writable { "" } else { ",read-only=on" }
            ));
        }
        if let Some(l) = &tcp {
            let addr = l.local_addr()?;
            let (scheme, creds) = match tls {
                Some(_) => ("nbds", ",tls-creds=tls0"),
                None => ("nbd", ""),
            };
            lines.push(format!("{scheme}://{addr}/{name}"));
            if tls.is_some() {
                lines.push(
                    "-object tls-creds-x509,id=tls0,dir=CLIENT_CERT_DIR,endpoint=client".into(),
                );
            }
            lines.push(format!(
                "-blockdev driver=nbd,node-name={name},server.type=inet,server.host={},server.port={},export={name}{creds}{}",
                addr.ip(),
                addr.port(),
                if writable { "" } else { ",read-only=on" }
            ));
        }
        println!("  {name} ({}):", human_bytes(*size));
        for l in lines {
            println!("    {l}");
        }
    }
    println!(
        "ready in {} ms (stop with Ctrl-C or SIGTERM)",
        started.elapsed().as_millis()
    );
    info!(
        "serving {what}: ready {} ms after start",
        started.elapsed().as_millis()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = runtime.block_on(async {
        let mut listeners = Vec::new();
        for l in std_listeners {
            l.set_nonblocking(true)?;
            listeners.push(Listener::Unix(tokio::net::UnixListener::from_std(l)?));
        }
        if let Some(l) = tcp {
            l.set_nonblocking(true)?;
            listeners.push(Listener::tcp(tokio::net::TcpListener::from_std(l)?, tls));
        }
        nbd_server::run(listeners, exports, nbd_server::shutdown_signal()).await
    });
    if let Some(path) = &socket {
        let _ = std::fs::remove_file(path);
    }
    served?;
    drop(opened);
    Ok(true)
}

/// Restore never writes the store: an overlay (or an output) inside it is refused.
fn refuse_inside_store(store: &remote::Store, path: &Path) -> anyhow::Result<()> {
    let remote::Store::Dir(store) = store else {
        return Ok(());
    };
    let store =
        std::fs::canonicalize(store).with_context(|| format!("read store {}", store.display()))?;
    // The path may not exist yet: resolve its nearest existing ancestor.
    let mut probe = path.to_path_buf();
    let resolved = loop {
        if let Ok(r) = std::fs::canonicalize(&probe) {
            break Some(r);
        }
        if !probe.pop() {
            break None;
        }
    };
    if resolved.is_some_and(|r| r.starts_with(&store)) {
        bail!(
            "{} is inside the store {}: restore never writes the store; put it elsewhere",
            path.display(),
            store.display()
        );
    }
    Ok(())
}

fn materialize(p: &PointArgs, output: &Path, format: Format) -> anyhow::Result<bool> {
    let started = Instant::now();
    if output.exists() {
        bail!(
            "{} exists; materialize never overwrites a file",
            output.display()
        );
    }
    let store = p.store()?;
    refuse_inside_store(&store, output)?;
    let opened = open::open_point(&store, &p.group, p.disk.as_deref(), &p.at, None)?;
    if opened.disks.len() > 1 {
        bail!(
            "group {} has several disks ({}): choose one with --disk",
            p.group,
            opened
                .disks
                .iter()
                .map(|(n, _, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let disk = opened.disks[0].0.clone();
    let (_, size, view) = &opened.disks[0];
    let raw_path = match format {
        Format::Raw => output.to_owned(),
        Format::Qcow2 => output.with_extension("raw.partial"),
    };
    let result = write_raw(view, *size, &raw_path);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&raw_path);
        return Err(e);
    }
    if format == Format::Qcow2 {
        let status = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw_path)
            .arg(output)
            .status()
            .context("run qemu-img (install qemu-utils)")?;
        let _ = std::fs::remove_file(&raw_path);
        if !status.success() {
            let _ = std::fs::remove_file(output);
            bail!("qemu-img convert failed ({status})");
        }
    }
    eprintln!(
        "wrote disk {disk} of group {} at {} to {} ({:?}, {}) in {:.1} s",
        p.group,
        open::describe(&opened),
        output.display(),
        format,
        human_bytes(*size),
        started.elapsed().as_secs_f64()
    );
    Ok(true)
}

/// Writes the point as a sparse raw file: ranges that are zero or holes stay holes.
fn write_raw(view: &view::PointView, size: u64, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    out.set_len(size)?;
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    const WINDOW: u64 = 4 << 20;
    let mut pieces = Vec::new();
    let mut buf = vec![0u8; WINDOW as usize];
    let mut off = 0;
    while off < size {
        let len = WINDOW.min(size - off);
        view.pieces(off, len, &mut pieces);
        for &(at, plen, source) in &pieces {
            if source == Source::Zero {
                continue;
            }
            let b = &mut buf[..plen as usize];
            view.read_point(at, b)
                .with_context(|| format!("read the point at byte {at}"))?;
            if source == Source::Base && b.iter().all(|&x| x == 0) {
                continue;
            }
            out.write_all_at(b, at)?;
        }
        off += len;
        bar.set_position(off);
    }
    out.sync_all()?;
    bar.finish_and_clear();
    Ok(())
}
