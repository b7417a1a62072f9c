#!/usr/bin/python3
"""Side-by-side NBD server benchmark: nbd-proxy, nbdkit (file plugin) and qemu-nbd, in one run.

Each server serves its own 1 GiB raw image, prepared identically (random data, then synced), over
a unix socket. Every fio row runs against the three servers back to back, and the whole matrix
runs --rounds times; each cell reports the best round (machines here are shared and noisy, so
ratios within a round are what matter). Peak RSS (VmHWM) of each server is read at the end.

Usage: scripts/bench.py [--runtime 5] [--rounds 2] [--out FILE] [--quick]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY = os.path.join(ROOT, "target", "release", "nbd-proxy")
GIB = 1 << 30

# (name, fio rw, block size, iodepth, connections, unit)
ROWS = [
    ("4k randwrite QD32", "randwrite", "4k", 32, 1, "IOPS"),
    ("4k randread QD32", "randread", "4k", 32, 1, "IOPS"),
    ("1M write QD8", "write", "1M", 8, 1, "MiB/s"),
    ("1M read QD8", "read", "1M", 8, 1, "MiB/s"),
    ("4k randwrite QD32", "randwrite", "4k", 32, 4, "IOPS"),
    ("4k randread QD32", "randread", "4k", 32, 4, "IOPS"),
    ("1M write QD8", "write", "1M", 8, 4, "MiB/s"),
    ("1M read QD8", "read", "1M", 8, 4, "MiB/s"),
    ("4k randwrite QD64", "randwrite", "4k", 64, 1, "IOPS"),
    ("1M randwrite QD64", "randwrite", "1M", 64, 1, "MiB/s"),
]


def wait_for_socket(path, proc, timeout_s=20):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited early: {proc.args}")
        if os.path.exists(path):
            return
        time.sleep(0.02)
    sys.exit(f"timed out waiting for {path}")


def start_servers(work):
    servers = {}
    cmds = {
        "nbd-proxy": lambda img, sock: [PROXY, "--disk", f"d={img}", "--socket", sock],
        "nbdkit": lambda img, sock: ["nbdkit", "-f", "-U", sock, "file", img],
        "qemu-nbd": lambda img, sock: ["qemu-nbd", "-f", "raw", "-k", sock, "-x", "d", "--persistent",
                                       "--shared=8", "--cache=writeback", "--aio=threads", img],
    }
    for name, cmd in cmds.items():
        img = os.path.join(work, f"{name}.img")
        sock = os.path.join(work, f"{name}.sock")
        log = open(os.path.join(work, f"{name}.log"), "w")
        proc = subprocess.Popen(cmd(img, sock), stdout=log, stderr=log)
        wait_for_socket(sock, proc)
        servers[name] = (proc, f"nbd+unix:///d?socket={sock}")
    return servers


def make_images(work):
    """Three images made the same way, so that each server starts from the same page-cache state
    (a file freshly written by dd sits in large folios, which makes 4k writes slower for any
    server on recent kernels)."""
    print("preparing three 1 GiB images (random data, copied, synced)...", file=sys.stderr)
    source = os.path.join(work, "source.img")
    subprocess.run(["dd", "if=/dev/urandom", f"of={source}", "bs=1M", "count=1024", "status=none"], check=True)
    for name in ("nbd-proxy", "nbdkit", "qemu-nbd"):
        subprocess.run(["cp", source, os.path.join(work, f"{name}.img")], check=True)
    os.remove(source)
    subprocess.run(["sync"], check=True)


def fio(uri, rw, bs, qd, conns, runtime, out):
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", f"--numjobs={conns}", "--group_reporting", "--size=1g",
           "--time_based", f"--runtime={runtime}", "--output-format=json", f"--output={out}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    mib_s = (job["read"]["bw"] + job["write"]["bw"]) / 1024
    return iops, mib_s


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="times the whole matrix runs (default 2)")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--quick", action="store_true", help="one round of 2 s runs, for a smoke check")
    args = ap.parse_args()
    if args.quick:
        args.runtime, args.rounds = 2, 1
    if not os.path.exists(PROXY):
        sys.exit(f"{PROXY} is missing: run `make build` first")

    best = {}
    with tempfile.TemporaryDirectory(prefix="nbd-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")) as work:
        make_images(work)
        servers = start_servers(work)
        try:
            for rnd in range(args.rounds):
                for row in ROWS:
                    label, rw, bs, qd, conns, unit = row
                    for name, (_, uri) in servers.items():
                        iops, mib_s = fio(uri, rw, bs, qd, conns, args.runtime, os.path.join(work, "fio.json"))
                        value = iops if unit == "IOPS" else mib_s
                        key = (label, conns, name)
                        best[key] = max(best.get(key, 0), value)
                        print(f"round {rnd + 1} {label:18} conns={conns} {name:9} {value:10.0f} {unit}",
                              file=sys.stderr)
            rss = {name: peak_rss_mib(proc.pid) for name, (proc, _) in servers.items()}
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait()

    lines = [
        "| workload | conns | unit | nbd-proxy | nbdkit | qemu-nbd | proxy / nbdkit | proxy / qemu-nbd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rw, bs, qd, conns, unit in ROWS:
        p, k, q = (best[(label, conns, n)] for n in ("nbd-proxy", "nbdkit", "qemu-nbd"))
        lines.append(f"| {label} | {conns} | {unit} | {p:.0f} | {k:.0f} | {q:.0f} | {p / k:.2f}x | {p / q:.2f}x |")
    lines.append("")
    lines.append("Peak RSS over the whole run (VmHWM): " +
                 ", ".join(f"{n} {v:.1f} MiB" for n, v in rss.items()))
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
