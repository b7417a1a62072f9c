#!/usr/bin/python3
"""Replication with two builds side by side (A/B, alternating rounds ABBA), to measure what one
change costs: each build runs its own replicator and proxy (sync and async; plain: the proxy
alone, no replicator) over a copy of one 1 GiB random image, fio writes through it, and the
table gives each row's IOPS and p99 completion latency per build and the ratio after/before.

Usage: scripts/bench_ab.py --before DIR --after DIR [--runtime 5] [--rounds 2]
                           [--modes plain,sync,async] [--conns 1] [--rows QD32,1M] [--store-dir DIR]
       (DIR: a target/release directory holding nbd-proxy and replicator)
Example: git worktree add /tmp/old REV && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target \\
         cargo build --release --bins) && scripts/bench_ab.py --before /tmp/old-target/release \\
         --after target/release
"""

import argparse
import json
import os
import subprocess
import tempfile
import time

from benchlib import caught_up, cold_cache, proxy_status, wait

ROWS = [("4k randwrite QD1", "randwrite", "4k", 1), ("4k randwrite QD32", "randwrite", "4k", 32),
        ("1M write QD8", "write", "1M", 8)]


def insecure(bin_dir):
    """--insecure for builds whose replication link needs TLS otherwise (older ones lack it)."""
    out = subprocess.run([f"{bin_dir}/replicator", "serve", "--help"], capture_output=True, text=True)
    return ["--insecure"] if "--insecure" in out.stdout else []


def overflows(ctl, bin_dir):
    """The proxy's `log_overflows` so far (0 from a build whose status lacks it)."""
    return (proxy_status(ctl, bin_dir) or {}).get("log_overflows", 0)


def marked(x):
    """A round's IOPS, with `!` when its change log overflowed."""
    return f"{x[0]:.0f}" + ("!" if x[2] else "")


def run(bin_dir, tag, mode, work, port, runtime, conns, store_dir=None):
    """One build in one mode (plain: the proxy alone; sync, async: with its own replicator) over
    a fresh copy of the image: each row's IOPS and p99 completion latency. The image and the
    store are removed after, so rounds do not add up on disk."""
    img = f"{work}/{tag}-{mode}.img"
    store = f"{store_dir or work}/{tag}-{mode}-store"
    subprocess.run(["cp", "--sparse=always", f"{work}/src.img", img], check=True)
    sock, ctl = f"{work}/{tag}-{mode}.sock", f"{work}/{tag}-{mode}.ctl"
    rep = None
    if mode == "plain":
        replicate = []
    else:
        rep = subprocess.Popen([f"{bin_dir}/replicator", "serve", "--listen", f"127.0.0.1:{port}",
                                "--store", store, *insecure(bin_dir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        replicate = ["--replicate", f"127.0.0.1:{port}", "--group", "g", "--control", ctl,
                     "--mode", mode, *insecure(bin_dir)]
    proxy = subprocess.Popen([f"{bin_dir}/nbd-proxy", "--disk", f"d={img}", "--socket", sock,
                              *replicate],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if mode == "plain":
        wait(lambda: os.path.exists(sock), f"{tag}'s proxy to listen", 120)
    else:
        wait(lambda: caught_up(ctl, bin_dir), f"{tag}'s {mode} proxy to be seeded", 120)
    res = {}
    for name, rw, bs, qd in ROWS:
        # Every build and row starts from an empty page cache (pages the seed read in sit in
        # large folios, which makes 4k writes several times slower here).
        cold_cache([img])
        before = overflows(ctl, bin_dir) if rep else 0
        out = f"{work}/fio.json"
        subprocess.run(["fio", "--name=b", "--ioengine=nbd", f"--uri=nbd+unix:///d?socket={sock}",
                        f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--numjobs={conns}",
                        "--group_reporting", "--size=1g", "--time_based",
                        f"--runtime={runtime}", "--output-format=json", f"--output={out}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        text = open(out).read()
        w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
        res[name] = (w["iops"], w["clat_ns"]["percentile"].get("99.000000", 0) / 1000,
                     overflows(ctl, bin_dir) - before if rep else 0)
    proxy.terminate()
    proxy.wait()
    if rep:
        rep.terminate()
        rep.wait()
    subprocess.run(["rm", "-rf", img, store], check=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="sync,async",
                    help="comma-separated: plain (the proxy alone), sync, async")
    ap.add_argument("--conns", type=int, default=1, help="fio jobs, each its own connection")
    ap.add_argument("--store-dir", help="where the replicators' stores go (default: with the images; "
                    "e.g. /dev/shm for a store on another disk than the images)")
    ap.add_argument("--rows", help="comma-separated: only the rows whose name has one of these "
                    "(e.g. 'QD32,1M'); a row alone gets more rounds in the same time")
    args = ap.parse_args()
    if args.rows:
        ROWS[:] = [r for r in ROWS if any(k in r[0] for k in args.rows.split(","))]
    builds = {"before": args.before, "after": args.after}
    modes = args.modes.split(",")
    results = {}
    port = 19100
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        subprocess.run(["dd", "if=/dev/urandom", f"of={work}/src.img", "bs=1M", "count=1024",
                        "status=none"], check=True)
        for rnd in range(args.rounds):
            order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
            for mode in modes:
                for tag in order:
                    port += 1
                    for k, v in run(builds[tag], tag, mode, work, port, args.runtime, args.conns,
                                      args.store_dir).items():
                        results.setdefault((mode, k, tag), []).append(v)
    print("| mode | row | before IOPS | after IOPS | after/before | before p99 µs | after p99 µs |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        for name, *_ in ROWS:
            b, a = results[(mode, name, "before")], results[(mode, name, "after")]
            bi, ai = sum(x[0] for x in b) / len(b), sum(x[0] for x in a) / len(a)
            bp, ap_ = sum(x[1] for x in b) / len(b), sum(x[1] for x in a) / len(a)
            print(f"| {mode} | {name} | {bi:.0f} | {ai:.0f} | {ai / bi:.2f}x | {bp:.0f} | {ap_:.0f} |")
    print("\nEach round's IOPS, before / after (`!` marks a round whose change log overflowed: "
          "writes kept as dirty chunks and resynced, not each as a record):")
    for mode in modes:
        for name, *_ in ROWS:
            b, a = results[(mode, name, "before")], results[(mode, name, "after")]
            print(f"* {mode} {name}: " + ", ".join(f"{marked(x)} / {marked(y)}" for x, y in zip(b, a)))


if __name__ == "__main__":
    main()
