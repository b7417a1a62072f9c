//! replicator: receives change streams from nbd-proxy and makes them durable (not built yet).

use clap::Parser;

/// Receives the write streams of protected disks and keeps them as a base image plus a
/// checksummed journal. Not implemented yet: this binary only reserves the name.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    Cli::parse();
    anyhow::bail!("replicator is not implemented yet (see the open issues)")
}
