//! replicator: receives change streams from nbd-proxy and keeps them durable (base images plus
//! an append-only journal), acknowledges what is durable, and applies retention.

mod check;
mod group;
mod head;
mod inspect;
mod metrics;
mod repair;
mod retention;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use journal::units::{parse_duration, parse_size};
use tracing::info;

/// Keep every write of protected VM disks: receive change streams from nbd-proxy, store them
/// durably as base images plus a checksummed journal, acknowledge what is on disk.
#[derive(Parser, Debug)]
#[command(version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Accept proxies on --listen and store their groups under --store.
    Serve {
        /// Address to listen on for proxies, e.g. 127.0.0.1:7070.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// Store directory (created if missing); one subdirectory per group.
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
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
    },
    /// Show each group's durable seq, history covered, store size, link state, and the rates
    /// of a running `replicator serve` (records/s, MiB/s, fsyncs/s over the last 1 s and 10 s).
    Status {
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Verify every file of every group: metadata, the durable checkpoint, every record and
    /// payload, indexes, and the base and head images against their chunk checksums. Names
    /// each bad or missing file and place; exit status 1 when anything is wrong.
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

const EXAMPLES: &str = "\
Examples:
  replicator serve --listen 127.0.0.1:7070 --store /srv/cdp --retention 24h --max-store-size 200GiB
  nbd-proxy --disk root=/vms/web.img --socket /run/web.sock --group web --replicate 127.0.0.1:7070
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
            retention,
            max_store_size,
            segment_size,
            retention_interval,
            link_timeout,
            handshake_timeout,
            max_connections,
            metrics,
        } => {
            std::fs::create_dir_all(&store)
                .with_context(|| format!("create store {}", store.display()))?;
            // Before listening: a proxy is only served once its group's base is whole.
            retention::finish_interrupted_folds(&store);
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
                    retention: retention::Retention {
                        max_age: retention,
                        max_size: max_store_size,
                        interval: retention_interval,
                    },
                    link_timeout: link_timeout.max(Duration::from_millis(200)),
                    handshake_timeout: handshake_timeout.max(Duration::from_millis(200)),
                    max_connections: max_connections.max(1),
                },
                metrics,
            )
        }
        Command::Status { store, json } => {
            journal::quiet_on_closed_pipe();
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
