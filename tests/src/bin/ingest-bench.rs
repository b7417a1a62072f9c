//! Replicator ingest measured alone: no proxy, no NBD client, no disk image on the sending side.
//!
//! Builds every record beforehand in memory with the journal's own encoder (compressed the way
//! nbd-proxy compresses, sealed with consecutive seqs) and packs them into batch frames of about
//! the size nbd-proxy sends, then connects to a running `replicator serve`, says Hello, sends
//! the frames as fast as the link takes them and waits for the Ack of the last seq (durable:
//! after the replicator's fsync). Prints one JSON object: records/s and GiB/s of guest payload.
//!
//! ```text
//! ingest-bench --addr 127.0.0.1:PORT --workload 1m|4k [--records N] [--group NAME] [--tls DIR]
//! ```
//!
//! * `1m`: 1 MiB writes, each half random and half zeros (lz4 stores about half), sequential
//!   over the volume and wrapping around.
//! * `4k`: 4 KiB writes of random data (lz4 keeps them raw) at random 4 KiB-aligned offsets.
//! * `--tls DIR`: mutual TLS with `DIR/client-cert.pem`, `client-key.pem` and `ca-cert.pem`
//!   (what `replicator tls issue --out DIR` writes; its group must be --group's); without it
//!   the replicator must run with --insecure.

use std::time::Instant;

use anyhow::{bail, Context};
use journal::record::{Encoded, Kind};
use journal::wire::{self, FrameType};
use tests::cdp::RawPeer;

/// The volume the records write to.
const VOLUME_BYTES: u64 = 1 << 30;
/// Batch body size nbd-proxy sends (`BATCH_BYTES` in nbd-proxy/src/ship.rs).
const BATCH_BYTES: usize = 4 << 20;
/// Random bytes that payloads are cut from (each record compressed on its own, so a repeat
/// across records gives lz4 nothing).
const POOL_BYTES: usize = 64 << 20;

#[derive(Debug)]
struct Args {
    addr: String,
    workload: String,
    records: u64,
    group: String,
    /// Mutual TLS with the certificates in this directory (`replicator tls issue --out`).
    tls: Option<std::path::PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        addr: String::new(),
        workload: String::new(),
        records: 0,
        group: "ingest-bench".into(),
        tls: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => a.addr = value()?,
            "--workload" => a.workload = value()?,
            "--records" => a.records = value()?.parse().context("--records")?,
            "--group" => a.group = value()?,
            "--tls" => a.tls = Some(value()?.into()),
            _ => bail!("unknown argument {flag} (see the header of tests/src/bin/ingest-bench.rs)"),
        }
    }
    if a.addr.is_empty() {
        bail!("--addr HOST:PORT of a running `replicator serve` is required");
    }
    if a.records == 0 {
        a.records = match a.workload.as_str() {
            "1m" => 2048,
            _ => 500_000,
        };
    }
    Ok(a)
}

/// The records of a workload, sealed from `first_seq` on, packed into whole batch frames;
/// with the guest payload bytes they carry.
fn build(workload: &str, records: u64, first_seq: u64) -> anyhow::Result<(Vec<Vec<u8>>, u64)> {
    let (len, compressible) = match workload {
        "1m" => (1usize << 20, true),
        "4k" => (4096usize, false),
        _ => bail!("--workload is 1m or 4k, not {workload:?}"),
    };
    let pool = tests::pattern(7, POOL_BYTES);
    let mut payload = vec![0u8; len];
    let mut frames = Vec::new();
    let mut body = Vec::with_capacity(BATCH_BYTES + len + 64);
    let mut offset_rng = 0x2545_f491_4f6c_dd1du64;
    let blocks = VOLUME_BYTES / len as u64;
    for i in 0..records {
        // Each record takes the next slice of the pool (randomness), and half of a 1 MiB
        // record stays zero.
        let random = if compressible { len / 2 } else { len };
        let at = (i as usize * random) % (POOL_BYTES - random);
        payload[..random].copy_from_slice(&pool[at..at + random]);
        let offset = if compressible {
            (i % blocks) * len as u64
        } else {
            offset_rng ^= offset_rng << 13;
            offset_rng ^= offset_rng >> 7;
            offset_rng ^= offset_rng << 17;
            (offset_rng % blocks) * len as u64
        };
        let sealed = Encoded::data(Kind::Write, 0, offset, &payload, true)
            .seal(first_seq + i, journal::now_ns());
        if !body.is_empty() && body.len() + sealed.len() > BATCH_BYTES {
            frames.push(wire::frame(FrameType::Batch, &body));
            body.clear();
        }
        body.extend_from_slice(&sealed);
    }
    if !body.is_empty() {
        frames.push(wire::frame(FrameType::Batch, &body));
    }
    Ok((frames, records * len as u64))
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let session = || -> anyhow::Result<(RawPeer, u64)> {
        let mut peer = match &a.tls {
            Some(dir) => RawPeer::connect_tls(&a.addr, dir)?,
            None => RawPeer::connect(&a.addr),
        };
        let (welcome, _) = peer
            .hello(&a.group, &[("root", VOLUME_BYTES)], "ingest-bench", false)
            .map_err(|e| anyhow::anyhow!("hello: {e}"))?;
        Ok((peer, welcome.durable_seq))
    };
    // The records are built between two sessions: one that learns where the group's journal
    // ends and one that sends. A session idle while they are built (seconds on a loaded
    // machine) would pass the replicator's --link-timeout.
    let (_, durable) = session()?;
    let first_seq = durable + 1;
    let built = Instant::now();
    let (frames, payload_bytes) = build(&a.workload, a.records, first_seq)?;
    let build_s = built.elapsed().as_secs_f64();
    let (mut peer, now_durable) = session()?;
    if now_durable != durable {
        bail!(
            "group {} moved from seq {durable} to {now_durable} while records were built",
            a.group
        );
    }
    let wire_bytes: usize = frames.iter().map(Vec::len).sum();
    let last_seq = first_seq + a.records - 1;

    let mut acks = RawPeer {
        stream: peer.stream.try_clone().context("clone the socket")?,
    };
    let start = Instant::now();
    let (sent_s, durable_s) = std::thread::scope(|s| {
        let waiter = s.spawn(move || -> Result<f64, String> {
            while acks.ack()? < last_seq {}
            Ok(start.elapsed().as_secs_f64())
        });
        for f in &frames {
            peer.send(f).context("send a batch")?;
        }
        let sent_s = start.elapsed().as_secs_f64();
        let durable_s = waiter
            .join()
            .map_err(|_| anyhow::anyhow!("the ack reader panicked"))?
            .map_err(|e| anyhow::anyhow!("waiting for the last ack: {e}"))?;
        anyhow::Ok((sent_s, durable_s))
    })?;
    let out = serde_json::json!({
        "workload": a.workload,
        "records": a.records,
        "batches": frames.len(),
        "payload_bytes": payload_bytes,
        "wire_bytes": wire_bytes,
        "build_seconds": build_s,
        "sent_seconds": sent_s,
        "seconds": durable_s,
        "records_per_s": a.records as f64 / durable_s,
        "gib_per_s": payload_bytes as f64 / durable_s / f64::from(1u32 << 30),
    });
    println!("{out}");
    Ok(())
}
