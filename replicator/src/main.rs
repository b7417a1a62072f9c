//! replicator: receives change streams from nbd-proxy and keeps them durable (base images plus
//! an append-only journal), acknowledges what is durable, and applies retention.

mod check;
mod group;
mod hashes;
mod inspect;
mod metrics;
mod repair;
mod retention;
mod serve;
mod upload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use journal::units::{parse_duration, parse_size};
use tracing::{info, warn};

/// Keep every write of protected VM disks: receive change streams from nbd-proxy, store them
/// durably as base images plus a checksummed journal, acknowledge what is on disk.
#[derive(Parser, Debug)]
#[command(version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Accept proxies on --listen and store their groups under --store.
    Serve {
        /// Address to listen on for proxies, e.g. 127.0.0.1:7070.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// Store directory (created if missing); one subdirectory per group. Or s3://BUCKET/PREFIX:
        /// the store on S3-compatible object storage, with --staging as the local store that
        /// acknowledges (fsync) and uploads sealed segments and base images to the bucket.
        #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
        store: PathBuf,
        #[command(flatten)]
        s3: Box<upload::ServeArgs>,
        /// Keep this much history (e.g. 24h, 7d); older records are folded into the base.
        #[arg(long, value_name = "AGE", value_parser = parse_duration)]
        retention: Option<Duration>,
        /// Fold older history, even inside the retention window, to keep each group's store
        /// under this size (e.g. 20GiB). Status and the log say when this shortens history.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_store_size: Option<u64>,
        /// Seal journal segments at this size.
        #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64MiB")]
        segment_size: u64,
        /// Also seal a segment once its first record is this old, e.g. 30s, 5m. A bucket
        /// receives only sealed segments, so this bounds how far it lags (the RPO to the
        /// bucket) when writes trickle or stop. [default: 60s with an s3:// --store, else only
        /// at --segment-size]
        #[arg(long, value_name = "AGE", value_parser = parse_duration)]
        seal_after: Option<Duration>,
        /// How often retention runs.
        #[arg(long, value_name = "AGE", value_parser = parse_duration, default_value = "10s")]
        retention_interval: Duration,
        /// A proxy that sends nothing (not even a keepalive) for this long is taken to be gone
        /// and its connection closed, even without a FIN from its host. Every write to a proxy
        /// has the same deadline.
        #[arg(long, value_name = "AGE", value_parser = parse_duration, default_value = "5s")]
        link_timeout: Duration,
        /// Time a new connection has to introduce itself; silent ones are dropped.
        #[arg(long, value_name = "AGE", value_parser = parse_duration, default_value = "10s")]
        handshake_timeout: Duration,
        /// Connections open at once (proxies, and any client still in its handshake); more
        /// are refused.
        #[arg(long, value_name = "N", default_value = "64")]
        max_connections: usize,
        /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9101: per group
        /// records and bytes ingested, fsyncs, durable seq, store size, last ingest time, and
        /// whether the store failed or the journal is damaged. No authentication: bind it to
        /// loopback or a management network.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        /// The replicator's certificate and key, and the CA that signed the proxies'
        /// certificates (mutual TLS: a proxy without one is refused). A proxy may feed a group
        /// when its certificate's name (CN or DNS name) is the group's, or allowed for it by
        /// --allow. `replicator tls init` makes a lab's.
        #[command(flatten)]
        tls: tls::Files,
        /// Let certificates named NAME feed group GROUP too (repeatable), e.g.
        /// --allow web=host7.example.
        #[arg(long, value_name = "GROUP=NAME", value_parser = parse_allow, help_heading = "TLS")]
        allow: Vec<(String, String)>,
        /// Accept proxies over plain TCP, unauthenticated and unencrypted: anyone who reaches
        /// --listen can create groups and append to their history.
        #[arg(long, help_heading = "TLS", conflicts_with_all = ["tls_cert", "tls_key", "tls_ca", "allow"])]
        insecure: bool,
    },
    /// Make certificates for a lab, so no openssl is needed (QEMU's file names: the
    /// directories work as QEMU `tls-creds-x509` and libnbd `tls-certificates` directories).
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
    /// Show each group's durable seq, history covered, store size, link state, and the rates
    /// of a running `replicator serve` (records/s, MiB/s, fsyncs/s over the last 1 s and 10 s).
    Status {
        /// The store directory (for a store on S3: the --staging DIR of `serve`, whose
        /// status says what is uploaded and what is local only).
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Verify every file of every group: metadata, the durable checkpoint, every record and
    /// payload, indexes, the base images against their chunk checksums, and the kept chunk
    /// hashes of the latest state against the journal. Names each bad or missing file and
    /// place; exit status 1 when anything is wrong.
    Check {
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
    },
    /// Cut a damaged journal at its first unreadable record, so the group takes records again.
    /// The history after that record is lost (its bytes are kept in GROUP/quarantine/); the
    /// proxy then compares every chunk by hash, so the latest state is whole. Run it only with
    /// `replicator serve` stopped, after `replicator check` named the damage.
    Repair {
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        #[arg(long, value_name = "NAME")]
        group: String,
        /// Say what would be cut, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TlsCommand {
    /// Make a CA (DIR/ca-cert.pem, DIR/ca-key.pem) and the replicator's certificate signed by
    /// it (DIR/server-cert.pem, DIR/server-key.pem), valid for localhost, 127.0.0.1, ::1, this
    /// host's name and every --host.
    Init {
        /// Directory to create them in (must not hold a CA yet).
        dir: PathBuf,
        /// Another name or address the replicator is reached by (repeatable).
        #[arg(long, value_name = "HOST")]
        host: Vec<String>,
        /// Validity of the certificates, in days.
        #[arg(long, value_name = "N", default_value = "825")]
        days: u32,
    },
    /// Issue a proxy's certificate for a group from the CA in --dir: OUT/client-cert.pem,
    /// OUT/client-key.pem and a copy of OUT/ca-cert.pem. Give them to the group's nbd-proxy
    /// (--tls-cert, --tls-key, --tls-ca); they also serve NBD over TLS on its --listen for
    /// localhost, 127.0.0.1, ::1 and every --host.
    Issue {
        /// The directory `tls init` made.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The group the certificate may feed (its name).
        #[arg(long, value_name = "NAME")]
        group: String,
        /// Where to write [default: DIR/GROUP].
        #[arg(long, value_name = "OUT")]
        out: Option<PathBuf>,
        /// A name or address the proxy's NBD clients reach it by (repeatable).
        #[arg(long, value_name = "HOST")]
        host: Vec<String>,
        /// Validity of the certificate, in days.
        #[arg(long, value_name = "N", default_value = "825")]
        days: u32,
    },
}

fn parse_allow(s: &str) -> Result<(String, String), String> {
    let (group, name) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected GROUP=NAME"))?;
    if group.is_empty() || name.is_empty() {
        return Err(format!("{s:?}: expected GROUP=NAME"));
    }
    Ok((group.to_owned(), name.to_owned()))
}

/// The TLS configuration of `serve`: mutual TLS, or None with --insecure.
fn serve_tls(
    files: &tls::Files,
    insecure: bool,
) -> anyhow::Result<Option<std::sync::Arc<tls::rustls::ServerConfig>>> {
    if insecure {
        warn!(
            "--insecure: proxies connect over plain TCP, unauthenticated and unencrypted; anyone \
             who reaches --listen can create groups and append to their history"
        );
        return Ok(None);
    }
    let (Some(cert), Some(key), Some(ca)) = (&files.tls_cert, &files.tls_key, &files.tls_ca) else {
        bail!(
            "the replication link needs TLS: give --tls-cert, --tls-key and --tls-ca (make a \
             lab's with `replicator tls init DIR`), or --insecure for plain TCP"
        );
    };
    Ok(Some(tls::server_config(
        cert,
        key,
        Some((ca, tls::ClientCerts::Required)),
    )?))
}

fn tls_command(command: TlsCommand) -> anyhow::Result<()> {
    let (files, dir) = match command {
        TlsCommand::Init { dir, host, days } => (
            tls::lab::init(&dir, &host, tls::lab::Validity::days(days))?,
            dir,
        ),
        TlsCommand::Issue {
            dir,
            group,
            out,
            host,
            days,
        } => {
            journal::names::check("group", &group).map_err(anyhow::Error::msg)?;
            let out = out.unwrap_or_else(|| dir.join(&group));
            // Loopback only: the proxy runs elsewhere; --host names it.
            let mut hosts = tls::lab::loopback_hosts();
            hosts.extend(host);
            (
                tls::lab::issue(&dir, &group, &hosts, &out, tls::lab::Validity::days(days))?,
                out,
            )
        }
    };
    for f in &files {
        println!("{}", f.display());
    }
    eprintln!("wrote {} files in {}", files.len(), dir.display());
    Ok(())
}

const EXAMPLES: &str = "\
Examples:
  replicator tls init /etc/cdp/tls
  replicator tls issue --dir /etc/cdp/tls --group web
  replicator serve --listen 127.0.0.1:7070 --store /srv/cdp --retention 24h --max-store-size 200GiB \\
    --tls-cert /etc/cdp/tls/server-cert.pem --tls-key /etc/cdp/tls/server-key.pem \\
    --tls-ca /etc/cdp/tls/ca-cert.pem
  nbd-proxy --disk root=/vms/web.img --socket /run/web.sock --group web --replicate 127.0.0.1:7070 \\
    --tls-cert /etc/cdp/tls/web/client-cert.pem --tls-key /etc/cdp/tls/web/client-key.pem \\
    --tls-ca /etc/cdp/tls/web/ca-cert.pem
  replicator status --store /srv/cdp
  replicator check --store /srv/cdp
  replicator serve ... --metrics 127.0.0.1:9101
  curl -s http://127.0.0.1:9101/metrics

Records are acknowledged to the proxy only after they are fsynced; a restart loses nothing that
was acknowledged, and a torn tail left by a crash is cut off (with a log line) at start-up.";

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
    match cli.command {
        Command::Serve {
            listen,
            store,
            s3,
            retention,
            max_store_size,
            segment_size,
            seal_after,
            retention_interval,
            link_timeout,
            handshake_timeout,
            max_connections,
            metrics,
            tls,
            allow,
            insecure,
        } => {
            let tls = serve_tls(&tls, insecure)?;
            let (store, bucket) = upload::store_and_bucket(store, &s3)?;
            std::fs::create_dir_all(&store)
                .with_context(|| format!("create store {}", store.display()))?;
            // Before listening: a proxy is only served once its group's base is whole.
            retention::finish_interrupted_folds(&store);
            let seal_after = seal_after
                .or(bucket.is_some().then_some(Duration::from_secs(60)))
                .map(|a| a.max(Duration::from_secs(1)));
            if let Some(bucket) = bucket {
                // Before listening: a group the bucket holds and this staging store lacks is
                // rebuilt from the bucket before a proxy of it is served.
                upload::prepare(&store, &bucket)?;
                upload::start(upload::Options {
                    store: store.clone(),
                    bucket,
                    interval: s3.upload_interval,
                })?;
            }
            let listener = std::net::TcpListener::bind(listen)
                .with_context(|| format!("listen on {listen}"))?;
            let metrics = metrics
                .map(|a| {
                    std::net::TcpListener::bind(a)
                        .with_context(|| format!("listen for --metrics on {a}"))
                })
                .transpose()?;
            info!(
                "replicator listening on {} with store {}",
                listener.local_addr()?,
                store.display()
            );
            serve::serve(
                listener,
                serve::Options {
                    store,
                    segment_size: segment_size.max(1 << 20),
                    seal_after,
                    retention: retention::Retention {
                        max_age: retention,
                        max_size: max_store_size,
                        interval: retention_interval,
                    },
                    link_timeout: link_timeout.max(Duration::from_millis(200)),
                    handshake_timeout: handshake_timeout.max(Duration::from_millis(200)),
                    max_connections: max_connections.max(1),
                    tls,
                    allow,
                },
                metrics,
            )
        }
        Command::Tls { command } => tls_command(command),
        Command::Status { store, json } => {
            journal::quiet_on_closed_pipe();
            if store.to_str().and_then(bucket::Location::parse).is_some() {
                bail!("status reads the local store: give --store the --staging DIR of `serve`");
            }
            inspect::status(&store, json)
        }
        Command::Repair {
            store,
            group,
            dry_run,
        } => {
            if !repair::repair(&store, &group, dry_run)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Check { store } => {
            journal::quiet_on_closed_pipe();
            let problems = check::check(&store)?;
            if problems > 0 {
                eprintln!("{problems} problem(s) found");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
