//! restore: lists recovery points and serves or writes any of them (not built yet).

use clap::Parser;

/// Lists recovery points of a replicator's store and materializes any of them as an NBD
/// export, an image file or a boot check. Not implemented yet: this binary only reserves the name.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    Cli::parse();
    anyhow::bail!("restore is not implemented yet (see the open issues)")
}
