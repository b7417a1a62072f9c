#!/usr/bin/python3
"""Restore benchmark: how fast a point becomes usable, and how fast it reads.

Builds a real store with the real binaries: a sparse --size disk (10 GiB) behind nbd-proxy
replicating to a replicator, and fio writing --records 4 KiB random writes (1,000,000), half
compressible. Then, for `restore export --at latest`:

  * time from starting `restore export` to the first byte read by a client (libnbd), against
    the baseline a user would otherwise wait for: `restore materialize` of the same point;
  * peak RSS of the export (VmHWM), after the first byte and after the reads below;
  * fio 4k randread QD32 and 1M sequential read from the export, next to nbdkit serving the
    materialized image of the same point (same content), as ratios.

Usage: scripts/bench_restore.py [--size 10G] [--records 1000000] [--runtime 10] [--out FILE] [--quick]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from benchlib import BIN, caught_up, peak_rss_mib, proxy_status, wait


def fio(uri, rw, bs, qd, runtime, out, extra=()):
    cmd = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", "--output-format=json", f"--output={out}", *extra]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        text = f.read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    return job


def first_byte_ms(store, sock, log, at="latest"):
    """Starts `restore export --at AT` and returns (ms to the first byte read, process)."""
    import nbd  # python3-libnbd
    if os.path.exists(sock):
        os.remove(sock)
    t0 = time.perf_counter()
    proc = subprocess.Popen([f"{BIN}/restore", "export", "--store", store, "--group", "bench",
                             "--at", at, "--socket", sock], stdout=log, stderr=log)
    while True:
        if proc.poll() is not None:
            sys.exit("restore export exited; see its log")
        try:
            h = nbd.NBD()
            h.connect_uri(f"nbd+unix:///d?socket={sock}")
            h.pread(4096, 0)
            ms = (time.perf_counter() - t0) * 1000
            h.shutdown()
            return ms, proc
        except nbd.Error:
            time.sleep(0.002)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="10G")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="1 GiB, 100,000 records, 3 s rows")
    a = ap.parse_args()
    if a.quick:
        a.size, a.records, a.runtime = "1G", 100_000, 3
    work = tempfile.mkdtemp(prefix="bench-restore-", dir="/var/tmp")
    procs = []
    try:
        disk, store = f"{work}/disk.img", f"{work}/store"
        subprocess.run(["truncate", "-s", a.size, disk], check=True)
        log = open(f"{work}/log.txt", "w")
        port = 17900 + os.getpid() % 90
        rep = subprocess.Popen([f"{BIN}/replicator", "serve", "--listen", f"127.0.0.1:{port}",
                                "--store", store, "--insecure"], stdout=log, stderr=log)
        procs.append(rep)
        time.sleep(0.3)
        sock, ctl = f"{work}/nbd.sock", f"{work}/ctl"
        proxy = subprocess.Popen([f"{BIN}/nbd-proxy", "--disk", f"d={disk}", "--socket", sock,
                                  "--group", "bench", "--replicate", f"127.0.0.1:{port}",
                                  "--control", ctl, "--insecure"], stdout=log, stderr=log)
        procs.append(proxy)
        wait(lambda: caught_up(ctl), "the seed", 600)
        print(f"writing {a.records} records of 4 KiB over {a.size}...", file=sys.stderr)
        t0 = time.time()
        fio(f"nbd+unix:///d?socket={sock}", "randwrite", "4k", 32, 0, f"{work}/w.json",
            [f"--number_ios={a.records}", f"--size={a.size}", "--buffer_compress_percentage=50",
             "--refill_buffers", "--norandommap", "--randrepeat=0"])
        wait(lambda: caught_up(ctl), "replication", 1200)
        write_s = time.time() - t0
        status = proxy_status(ctl)
        proxy.send_signal(signal.SIGTERM)
        proxy.wait()
        rep.send_signal(signal.SIGTERM)
        rep.wait()
        records = status["captured_seq"]
        journal = sum(os.path.getsize(os.path.join(dp, f))
                      for dp, _, fs in os.walk(f"{store}/bench/journal") for f in fs)
        print(f"{records} records in the journal ({journal / 2**30:.2f} GiB), written and replicated in {write_s:.0f} s",
              file=sys.stderr)

        # Time to first byte, three times; the export's memory.
        firsts = []
        for i in range(3):
            ms, exp = first_byte_ms(store, f"{work}/exp.sock", log)
            firsts.append(ms)
            rss_first = peak_rss_mib(exp.pid)
            if i < 2:
                exp.send_signal(signal.SIGTERM)
                exp.wait()
        procs.append(exp)
        # Baseline: materialize the same point.
        t0 = time.perf_counter()
        subprocess.run([f"{BIN}/restore", "materialize", "--store", store, "--group", "bench",
                        "--at", "latest", "--output", f"{work}/point.img"], check=True,
                       stderr=subprocess.DEVNULL)
        materialize_s = time.perf_counter() - t0
        subprocess.run(["sync"], check=True)

        # Reads: the export vs nbdkit serving the materialized point.
        nbdkit = subprocess.Popen(["nbdkit", "-f", "-U", f"{work}/kit.sock", "file",
                                   f"{work}/point.img"], stdout=log, stderr=log)
        procs.append(nbdkit)
        wait(lambda: os.path.exists(f"{work}/kit.sock"), "nbdkit", 20)
        rows = []
        for label, rw, bs, qd, unit in [("4k randread QD32", "randread", "4k", 32, "IOPS"),
                                        ("1M read QD8", "read", "1M", 8, "MiB/s")]:
            vals = {}
            for name, uri in [("export", f"nbd+unix:///d?socket={work}/exp.sock"),
                              ("nbdkit", f"nbd+unix:///?socket={work}/kit.sock")]:
                job = fio(uri, rw, bs, qd, a.runtime, f"{work}/{name}.json")
                vals[name] = job["read"]["iops"] if unit == "IOPS" else job["read"]["bw"] / 1024
            rows.append((label, unit, vals["export"], vals["nbdkit"]))
        rss_after = peak_rss_mib(exp.pid)

        med = sorted(firsts)[1]
        lines = [
            f"Command: `python3 scripts/bench_restore.py --size {a.size} --records {a.records} --runtime {a.runtime}`",
            "",
            f"Store: one {a.size} disk, {records} records ({journal / 2**30:.2f} GiB of journal).",
            "",
            "| measure | restore export | baseline | ratio |",
            "|---|---|---|---|",
            f"| time to first byte (median of 3: {', '.join(f'{x:.0f}' for x in firsts)} ms) | {med:.0f} ms | "
            f"materialize: {materialize_s * 1000:.0f} ms | {materialize_s * 1000 / med:.1f}x sooner |",
        ]
        for label, unit, e, k in rows:
            lines.append(f"| {label} ({unit}) | {e:,.0f} | nbdkit on the materialized image: {k:,.0f} | {e / k:.2f}x |")
        lines.append(f"| export peak RSS (VmHWM) | {rss_first:.1f} MiB after the first byte, "
                     f"{rss_after:.1f} MiB after the reads | | |")
        text = "\n".join(lines)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text + "\n")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
