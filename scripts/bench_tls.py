#!/usr/bin/python3
"""What mutual TLS on the replication link costs, side by side in one run with plain TCP.

Two pairs of nbd-proxy (async) + replicator, each over its own copy of one 1 GiB random image
on a unix socket: `plain` with --insecure on both sides, `tls` with certificates from
`replicator tls init/issue`. Rows alternate between them (plain, tls, tls, plain: ABBA, so a
drift of the shared machine hits both), each from a cold page cache:
  * fio (nbd engine) 1M write QD8 (2 GiB per run) and 4k randwrite QD32 (256 MiB per run), each
    for at most --runtime seconds: the guest's rate;
  * the durable rate: the bytes fio wrote over the time from fio's start until the replicator
    acknowledged the last of them (what TLS can slow down: shipping, not the guest);
  * the proxy's and the replicator's CPU seconds per GiB (utime+stime from /proc).
Then the replicator's ingest alone over each link (tests/src/bin/ingest-bench.rs, records built
beforehand; replicator pinned to CPU 1, sender to CPU 0), ABBA as well.
Ratios are tls / plain; the goal is >= 0.9x on 1M writes.

Usage: scripts/bench_tls.py [--runtime 5] [--rounds 2] [--out FILE] [--quick]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchlib import BIN, caught_up, cold_cache, cpu_seconds, free_port, listening, wait

GIB = 1 << 30
# (name, fio rw, block size, iodepth, bytes per run): each run writes at most that much (or for
# --runtime seconds), so that the stores, which keep every write, stay a few GiB.
ROWS = [("1M write QD8", "write", "1M", 8, "2g"), ("4k randwrite QD32", "randwrite", "4k", 32, "256m")]
KINDS = ["plain", "tls"]


class Pair:
    """A replicator and a replicating nbd-proxy over `img`."""

    def __init__(self, work, kind, img, pki):
        self.kind, self.img = kind, img
        self.store, self.sock, self.ctl = f"{work}/{kind}-store", f"{work}/{kind}.sock", f"{work}/{kind}.ctl"
        addr = f"127.0.0.1:{free_port()}"
        if kind == "tls":
            rep_tls = ["--tls-cert", f"{pki}/server-cert.pem", "--tls-key", f"{pki}/server-key.pem",
                       "--tls-ca", f"{pki}/ca-cert.pem"]
            proxy_tls = ["--tls-cert", f"{pki}/bench/client-cert.pem", "--tls-key",
                         f"{pki}/bench/client-key.pem", "--tls-ca", f"{pki}/ca-cert.pem"]
        else:
            rep_tls = proxy_tls = ["--insecure"]
        log = open(f"{work}/{kind}.log", "w")
        self.rep = subprocess.Popen([f"{BIN}/replicator", "serve", "--listen", addr, "--store", self.store,
                                     *rep_tls], stdout=log, stderr=log)
        wait(lambda: self.rep.poll() is not None or listening(addr), f"the {kind} replicator", 30)
        self.proxy = subprocess.Popen([f"{BIN}/nbd-proxy", "--disk", f"d={img}", "--socket", self.sock,
                                       "--group", "bench", "--replicate", addr, "--control", self.ctl,
                                       *proxy_tls], stdout=log, stderr=log)
        wait(lambda: caught_up(self.ctl), f"the {kind} seed", 600)
        self.uri = f"nbd+unix:///d?socket={self.sock}"

    def stop(self):
        for p in (self.proxy, self.rep):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def fio_bytes(uri, rw, bs, qd, io_size, runtime):
    out = subprocess.run(["fio", "--name=t", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
                          f"--iodepth={qd}", "--size=1g", f"--io_size={io_size}", f"--runtime={runtime}",
                          "--output-format=json"], check=True, capture_output=True, text=True).stdout
    # The nbd engine may print a line before the JSON.
    job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    return job["io_bytes"], job["bw_bytes"]


def ingest_alone(work, pki, rounds, records):
    """ingest-bench against a replicator per link pinned to CPU 1, the sender on CPU 0; per
    (workload, link) the run with the best rate, with its replicator CPU seconds."""
    reps, best = {}, {}
    try:
        for kind in KINDS:
            addr = f"127.0.0.1:{free_port()}"
            tls_args = (["--tls-cert", f"{pki}/server-cert.pem", "--tls-key", f"{pki}/server-key.pem",
                         "--tls-ca", f"{pki}/ca-cert.pem"] if kind == "tls" else ["--insecure"])
            log = open(f"{work}/ingest-{kind}.log", "w")
            p = subprocess.Popen(["taskset", "-c", "1", f"{BIN}/replicator", "serve", "--listen", addr,
                                  "--store", f"{work}/ingest-{kind}-store", *tls_args], stdout=log, stderr=log)
            wait(lambda: p.poll() is not None or listening(addr), f"the {kind} ingest replicator", 30)
            reps[kind] = (p, addr)
        n = 0
        for rnd in range(rounds):
            for w, count in records.items():
                for kind in KINDS + KINDS[::-1]:
                    p, addr = reps[kind]
                    n += 1
                    group = f"bench{n}"
                    extra = []
                    if kind == "tls":
                        subprocess.run([f"{BIN}/replicator", "tls", "issue", "--dir", pki, "--group", group,
                                        "--out", f"{work}/{group}"], check=True, capture_output=True)
                        extra = ["--tls", f"{work}/{group}"]
                    c0 = cpu_seconds(p.pid)
                    out = subprocess.run(["taskset", "-c", "0", f"{BIN}/ingest-bench", "--addr", addr,
                                          "--workload", w, "--records", str(count), "--group", group, *extra],
                                         check=True, capture_output=True, text=True)
                    r = json.loads(out.stdout)
                    r["cpu"] = cpu_seconds(p.pid) - c0
                    print(f"ingest alone {w} {kind:5} {r['records_per_s']:.0f} records/s {r['gib_per_s']:.2f} GiB/s "
                          f"replicator CPU {r['cpu']:.2f} s", file=sys.stderr)
                    if (w, kind) not in best or r["records_per_s"] > best[(w, kind)]["records_per_s"]:
                        best[(w, kind)] = r
    finally:
        for p, _ in reps.values():
            p.terminate()
            p.wait(30)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="2 s rows, one round")
    a = ap.parse_args()
    if a.quick:
        a.runtime, a.rounds = 2, 1
    work = tempfile.mkdtemp(prefix="bench-tls-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    pki = f"{work}/pki"
    subprocess.run([f"{BIN}/replicator", "tls", "init", pki], check=True, capture_output=True)
    subprocess.run([f"{BIN}/replicator", "tls", "issue", "--dir", pki, "--group", "bench"], check=True,
                   capture_output=True)
    src = f"{work}/src.img"
    subprocess.run(["dd", "if=/dev/urandom", f"of={src}", "bs=1M", "count=1024", "status=none"], check=True)
    pairs = {}
    results = {}  # (row, kind) -> list of (guest MiB/s, durable MiB/s, proxy cpu/GiB, replicator cpu/GiB)
    try:
        for kind in KINDS:
            img = f"{work}/{kind}.img"
            subprocess.run(["cp", src, img], check=True)
            pairs[kind] = Pair(work, kind, img, pki)
        os.remove(src)
        for rnd in range(a.rounds):
            for label, rw, bs, qd, io_size in ROWS:
                for kind in (KINDS if rnd % 2 == 0 else KINDS[::-1]) + (KINDS[::-1] if rnd % 2 == 0 else KINDS):
                    p = pairs[kind]
                    cold_cache([p.img, p.store])
                    c0 = (cpu_seconds(p.proxy.pid), cpu_seconds(p.rep.pid))
                    t0 = time.time()
                    nbytes, bw = fio_bytes(p.uri, rw, bs, qd, io_size, a.runtime)
                    wait(lambda: caught_up(p.ctl), f"{kind} to catch up", 600)
                    durable_s = time.time() - t0
                    gib = nbytes / GIB
                    r = (bw / 2**20, nbytes / 2**20 / durable_s,
                         (cpu_seconds(p.proxy.pid) - c0[0]) / gib, (cpu_seconds(p.rep.pid) - c0[1]) / gib)
                    results.setdefault((label, kind), []).append(r)
                    print(f"round {rnd + 1} {label:18} {kind:5} guest {r[0]:.0f} MiB/s, durable {r[1]:.0f} MiB/s, "
                          f"CPU s/GiB proxy {r[2]:.2f} replicator {r[3]:.2f}", file=sys.stderr)
        alone = ingest_alone(work, pki, 1 if a.quick else 2, {"1m": 256 if a.quick else 1024,
                                                              "4k": 60_000 if a.quick else 250_000})
    finally:
        for p in pairs.values():
            p.stop()
        subprocess.run(["rm", "-rf", work])
    lines = ["| workload | link | guest MiB/s | durable MiB/s | proxy CPU s/GiB | replicator CPU s/GiB |",
             "|---|---|---|---|---|---|"]
    best = {}
    for label, *_ in ROWS:
        for kind in KINDS:
            rs = results[(label, kind)]
            b = (max(r[0] for r in rs), max(r[1] for r in rs), min(r[2] for r in rs), min(r[3] for r in rs))
            best[(label, kind)] = b
            lines.append(f"| {label} | {kind} | {b[0]:.0f} | {b[1]:.0f} | {b[2]:.2f} | {b[3]:.2f} |")
        t, p = best[(label, "tls")], best[(label, "plain")]
        lines.append(f"| {label} | **tls / plain** | **{t[0] / p[0]:.2f}x** | **{t[1] / p[1]:.2f}x** | "
                     f"{t[2] / p[2]:.2f}x | {t[3] / p[3]:.2f}x |")
    lines += ["", "Replicator ingest alone (`ingest-bench`, best of the runs):", "",
              "| workload | link | records/s | GiB/s | replicator CPU s |", "|---|---|---|---|---|"]
    for w in ("1m", "4k"):
        for kind in KINDS:
            r = alone[(w, kind)]
            lines.append(f"| {w} | {kind} | {r['records_per_s']:.0f} | {r['gib_per_s']:.2f} | {r['cpu']:.2f} |")
        t, p = alone[(w, "tls")], alone[(w, "plain")]
        lines.append(f"| {w} | **tls / plain** | **{t['records_per_s'] / p['records_per_s']:.2f}x** | "
                     f"**{t['gib_per_s'] / p['gib_per_s']:.2f}x** | {t['cpu'] / p['cpu']:.2f}x |")
    text = (f"Best of {a.rounds} rounds x 2 runs per link (ABBA), {a.runtime} s fio rows, async mode, "
            f"1 connection.\n\n" + "\n".join(lines))
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
