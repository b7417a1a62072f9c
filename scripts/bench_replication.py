#!/usr/bin/python3
"""Replication benchmark: what capturing every write costs, side by side in one run with what a
QEMU user would pick instead, as ratios.

Servers, each over its own copy of one 1 GiB random image, all on unix sockets:
  proxy          nbd-proxy alone (no replication)
  +async, +sync  nbd-proxy replicating to its own local `replicator serve` (own store, seeded)
  blklogwrites   qemu-storage-daemon, driver=blklogwrites over the image and a local log file
                 (every write logged, dm-log-writes format), exported over NBD
  active mirror  qemu-storage-daemon exporting the image while a blockdev-mirror job
                 (sync=full, copy-mode=write-blocking, driven over QMP until ready) copies every
                 write to a qemu-nbd target before it completes; the target writes into its
                 page cache (qemu-nbd --cache=writeback), so a completed write is not durable
  durable mirror the same with a target that makes every write durable before it answers
                 (qemu-nbd --cache=writethrough: each write followed by a flush), which is what
                 +sync promises (RPO 0 on disk); +sync's like-for-like peer
  nbdkit         nbdkit's file plugin
Rows (fio nbd engine, 1 and 4 connections = fio jobs): 4k randwrite QD32, 4k randwrite QD1
(IOPS and fio's p50/p99 completion latency), 1M write QD8; 4k randread QD32 and 1M read QD8 on
one connection. After each write row, every file the server wrote is fsynced and the fsync
timed, so that servers that acknowledge from the page cache and replicators that fsync before
they acknowledge are also compared on durable terms. Then: the proxies' CPU seconds per GiB written (utime+stime of the process from
/proc/PID/stat around each write row; for +async read after it caught up, so shipping counts;
also the +async replicator's; and with the CPU of the fsync after the row added, which writes
back what the proxy left in the page cache), the replication lag at half the plain proxy's 4k rate for
--lag-seconds, the end-to-end rate of a compressible stream, the proxy's memory under a stalled
replicator, and the replicator's ingest measured alone (tests/src/bin/ingest-bench.rs sending
records built beforehand, replicator pinned to CPU 1 and sender to CPU 0). Last, a large disk
right after protection starts (measure_large): what the 1 GiB rows hide.

Identical image preparation: the images are copies of one random file, synced. After every
server is up, every replicator seeded and the mirror ready, and again before each row, every
file the servers write (images, the mirror target, the blklogwrites log, the replicators'
stores) is fsynced and dropped from the page cache (POSIX_FADV_DONTNEED), so that every server
starts each write row from a cold cache: on this machine a file whose pages sit in the page
cache in large folios (freshly written by dd, or read by a seed) makes 4k writes several times
slower for any server, and each server's earlier fio writes warm its cache differently. Before
the read rows the images are dropped the same way and then read once whole, so that every
server reads from a fully cached image (a cold one would measure the disk, the same for all).

Disk: about 30 GiB free under $BENCH_DIR (default /var/tmp) at the peak of a full run (seven 1 GiB
images, the replicators' journals, the blklogwrites log), removed at the end.

Usage: scripts/bench_replication.py [--runtime 5] [--rounds 1] [--lag-seconds 60] [--out FILE]
       [--quick]   (--quick: 2 s rows, 10 s lag, smaller ingest runs; a few minutes)
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from benchlib import (BIN, Qmp, caught_up, cold_cache, cpu_seconds, free_port, fsync_files, listening,
                      peak_rss_mib, proxy_status, wait, warm_cache)

GIB = 1 << 30
# (name, fio rw, block size, iodepth, connections)
ROWS = [
    ("4k randwrite QD32", "randwrite", "4k", 32, 1),
    ("4k randwrite QD1", "randwrite", "4k", 1, 1),
    ("1M write QD8", "write", "1M", 8, 1),
    ("4k randwrite QD32", "randwrite", "4k", 32, 4),
    ("4k randwrite QD1", "randwrite", "4k", 1, 4),
    ("1M write QD8", "write", "1M", 8, 4),
    ("4k randread QD32", "randread", "4k", 32, 1),
    ("1M read QD8", "read", "1M", 8, 1),
]
SERVERS = ["proxy", "proxy-async", "proxy-sync", "blklogwrites", "mirror", "mirror-durable", "nbdkit"]
TITLES = ["proxy", "+async", "+sync", "blklogwrites", "active mirror", "durable mirror", "nbdkit"]
# (metric, unit, higher is better)
THROUGHPUT = {"4k": ("iops", "IOPS", True), "1M": ("mib", "MiB/s", True)}
LATENCY = [("p50", "p50 µs", False), ("p99", "p99 µs", False)]


def metrics(label):
    """The metrics a row reports: its throughput, and for QD1 rows the latency percentiles."""
    m = [THROUGHPUT[label.split()[0]]]
    return m + LATENCY if label.endswith("QD1") else m


def fio(uri, rw, bs, qd, conns, runtime, out, extra=()):
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", f"--numjobs={conns}", "--group_reporting", "--size=1g",
           "--output-format=json", f"--output={out}", *extra]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        text = f.read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    d = job["write"] if rw.endswith("write") else job["read"]
    pct = d["clat_ns"].get("percentile", {})
    return {"iops": d["iops"], "mib": d["bw"] / 1024, "bytes": job["write"]["io_bytes"],
            "seconds": d["runtime"] / 1000,
            "p50": pct.get("50.000000", 0) / 1000, "p99": pct.get("99.000000", 0) / 1000}


class Servers:
    def __init__(self, work):
        self.work, self.procs, self.uri, self.ctl, self.rep, self.pid = work, [], {}, {}, {}, {}
        self.files = []  # what the servers write, for cold_cache
        self.owned = {}  # the same, per server: what it leaves to fsync after a row
        self.images = []  # what fio reads through them, for warm_cache
        self.qmp = {}  # the mirrors' monitors, open for the run

    def spawn(self, cmd, name):
        p = subprocess.Popen(cmd, stdout=open(f"{self.work}/{name}.log", "w"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def replicator(self, name, pin=None):
        addr, store = f"127.0.0.1:{free_port()}", f"{self.work}/{name}-store"
        cmd = [f"{BIN}/replicator", "serve", "--listen", addr, "--store", store, "--insecure"]
        rep = self.spawn(["taskset", "-c", pin, *cmd] if pin else cmd, f"{name}-replicator")
        wait(lambda: rep.poll() is not None or listening(addr), f"{name}'s replicator to listen", 30)
        if rep.poll() is not None:
            sys.exit(f"{name}'s replicator exited: see {self.work}/{name}-replicator.log")
        self.rep[name] = rep
        self.own(name, store)
        return addr

    def proxy(self, name, img, extra=()):
        sock, ctl = f"{self.work}/{name}.sock", f"{self.work}/{name}.ctl"
        cmd = [f"{BIN}/nbd-proxy", "--disk", f"d={img}", "--socket", sock]
        if name != "proxy":
            cmd += ["--group", "bench", "--replicate", self.replicator(name), "--control", ctl,
                    "--insecure", *extra]
        p = self.spawn(cmd, name)
        self.listen(name, p, sock, img)
        self.own(name, f"{img}.cdp-al")  # its activity log
        if name != "proxy":
            self.ctl[name] = ctl
            wait(lambda: caught_up(ctl), f"{name}'s seed", 600)
        return p

    def listen(self, name, p, sock, img, export="d"):
        wait(lambda: p.poll() is not None or os.path.exists(sock), f"{name} to listen", 30)
        if p.poll() is not None:
            sys.exit(f"{name} exited: see {self.work}/{name}.log")
        self.uri[name] = f"nbd+unix:///{export}?socket={sock}"
        self.pid[name] = p.pid
        self.own(name, img)
        self.images.append(img)

    def nbdkit(self, img):
        sock = f"{self.work}/nbdkit.sock"
        self.listen("nbdkit", self.spawn(["nbdkit", "-f", "-U", sock, "file", img], "nbdkit"), sock, img, "")

    def qsd(self, name, img, blockdevs, node, extra=()):
        """qemu-storage-daemon exporting `node` (over `img` and `blockdevs`) as export d."""
        sock = f"{self.work}/{name}.sock"
        cmd = ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=disk,filename={img}"]
        for b in blockdevs:
            cmd += ["--blockdev", b]
        cmd += ["--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", f"type=nbd,id=e,node-name={node},name=d,writable=on", *extra]
        self.listen(name, self.spawn(cmd, name), sock, img)

    def blklogwrites(self, img):
        log = f"{self.work}/blklog.img"
        open(log, "w").close()
        self.qsd("blklogwrites", img, [f"driver=file,node-name=log,filename={log}",
                                       "driver=blklogwrites,node-name=blw,file=disk,log=log,log-sector-size=4096"],
                 "blw")
        self.own("blklogwrites", log)

    def mirror(self, name, img, cache):
        """An active mirror (write-blocking) of `img` to a qemu-nbd target with --cache=`cache`."""
        w = f"{self.work}/{name}"
        target, tsock, qmp = f"{w}-target.img", f"{w}-target.sock", f"{w}-qmp.sock"
        with open(target, "w") as f:
            f.truncate(os.path.getsize(img))
        t = self.spawn(["qemu-nbd", "-f", "raw", "-x", "t", "-k", tsock, f"--cache={cache}", target],
                       f"{name}-target")
        wait(lambda: t.poll() is not None or os.path.exists(tsock), f"{name}'s qemu-nbd target", 30)
        self.qsd(name, img,
                 [f"driver=nbd,node-name=tgt,server.type=unix,server.path={tsock},export=t"], "disk",
                 ["--chardev", f"socket,id=qmp,path={qmp},server=on,wait=off", "--monitor", "chardev=qmp"])
        self.own(name, target)
        m = Qmp(qmp)
        m.cmd("blockdev-mirror", **{"job-id": "m", "device": "disk", "target": "tgt", "sync": "full",
                                    "copy-mode": "write-blocking"})
        wait(lambda: any(j["device"] == "m" and j.get("ready") for j in m.cmd("query-block-jobs")),
             f"{name}'s job to be ready", 600)
        self.qmp[name] = m

    def own(self, name, path):
        self.files.append(path)
        self.owned.setdefault(name, []).append(path)

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


LARGE_GIB = 8


def measure_large(work, out, runtime):
    """A fresh 8 GiB disk in its first seconds of protection, next to the plain proxy: both
    images sparse, +async just seeded (its page cache as the seed left it, every activity-log
    extent idle), fio 4k randwrite QD32 over the whole disk. The 1 GiB rows hide what this
    shows: they drop the page cache before each row, and their 256 extents warm up at once."""
    s = Servers(work + "/large")
    os.makedirs(s.work)
    try:
        for name in ("proxy", "proxy-async"):
            with open(f"{s.work}/{name}.img", "wb") as f:
                f.truncate(LARGE_GIB * GIB)
        s.proxy("proxy", f"{s.work}/proxy.img")
        s.proxy("proxy-async", f"{s.work}/proxy-async.img")  # returns once seeded
        r = {}
        for name in ("proxy-async", "proxy"):
            r[name] = fio(s.uri[name], "randwrite", "4k", 32, 1, runtime, out, [f"--size={LARGE_GIB}g"])
            print(f"{LARGE_GIB} GiB disk, 4k randwrite QD32 {name:12} {r[name]['iops']:.0f} IOPS  "
                  f"p99 {r[name]['p99']:.0f} µs", file=sys.stderr)
        return r
    finally:
        s.stop()


def pct(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * (len(s) - 1)))] if s else float("nan")


def measure_rows(s, a, out):
    """Every row against every server; per (row, conns, server) the best value of each metric
    over the rounds, and per (row, conns) the CPU seconds and bytes written of the proxies.
    After a write row, every file the server wrote is fsynced at once and the fsync timed
    (`fsync` in seconds, the least over the rounds): a server that acknowledges from the page
    cache (the plain proxy, nbdkit, blklogwrites, the active mirror's target) leaves the writes there,
    a replicator has fsynced them before it acknowledged. `durable` is the row's throughput
    over fio's run plus that fsync."""
    best, cpu = {}, {}
    for rnd in range(a.rounds):
        warm = False
        for label, rw, bs, qd, conns in ROWS:
            if rw.endswith("write"):
                cold_cache(s.files)
                warm = False
            elif not warm:
                cold_cache(s.files)
                warm_cache(s.images)
                warm = True
            for name in SERVERS:
                watched = {"proxy": {"proxy": s.pid["proxy"]},
                           "proxy-async": {"proxy-async": s.pid["proxy-async"],
                                           "replicator": s.rep["proxy-async"].pid}}.get(name, {})
                before = {k: cpu_seconds(pid) for k, pid in watched.items()}
                overflows = proxy_status(s.ctl[name])["log_overflows"] if name in s.ctl else 0
                r = fio(s.uri[name], rw, bs, qd, conns, a.runtime, out)
                if name in s.ctl:
                    wait(lambda: caught_up(s.ctl[name]), f"{name} to catch up", 600)
                    # The change log filled during the row: writes from then until a resync
                    # were kept as dirty chunks, not each as a record.
                    key = (label, conns, name, "overflows")
                    best[key] = max(best.get(key, 0), proxy_status(s.ctl[name])["log_overflows"] - overflows)
                if rw.endswith("write"):
                    # The writeback an fsync starts runs in the caller's context: this thread's
                    # CPU over it is what making the server's page cache durable cost.
                    t0 = time.thread_time()
                    r["fsync"] = fsync_files(s.owned[name])
                    r["fsync_cpu"] = time.thread_time() - t0
                    r["durable"] = r[THROUGHPUT[bs][0]] * r["seconds"] / (r["seconds"] + r["fsync"])
                for k, pid in watched.items():
                    c = cpu.setdefault((label, conns, k), [0.0, 0, 0.0])
                    c[0] += cpu_seconds(pid) - before[k]
                    c[1] += r["bytes"]
                    if k == name:
                        c[2] += r.get("fsync_cpu", 0.0)
                kept = metrics(label) + ([("fsync", "", False), ("durable", "", True)] if "fsync" in r else [])
                for m, unit, higher in kept:
                    key = (label, conns, name, m)
                    v = r[m]
                    best[key] = v if key not in best else (max if higher else min)(best[key], v)
                shown = "  ".join(f"{r[m]:.0f} {unit}" for m, unit, _ in metrics(label))
                if "fsync" in r:
                    shown += f"  fsync after {r['fsync'] * 1000:.0f} ms"
                if best.get((label, conns, name, "overflows")):
                    shown += f"  change log overflowed ({best[(label, conns, name, 'overflows')]}x)"
                print(f"round {rnd + 1} {label:18} conns={conns} {name:12} {shown}", file=sys.stderr)
    return best, cpu


def measure_lag(s, rate, seconds):
    """lag_ms of +async polled every 50 ms while fio writes 4k at `rate` IOPS for `seconds`."""
    ctl = s.ctl["proxy-async"]
    samples = []
    p = subprocess.Popen(["fio", "--name=lag", "--ioengine=nbd", f"--uri={s.uri['proxy-async']}",
                          "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=1g", "--time_based",
                          f"--runtime={seconds}", f"--rate_iops={rate}", "--output=/dev/null"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None:
        st = proxy_status(ctl)
        if st:
            samples.append(st["lag_ms"])
        time.sleep(0.05)
    st = proxy_status(ctl)
    wait(lambda: caught_up(ctl), "catch up", 600)
    third = max(1, len(samples) // 3)
    return {"rate": rate, "seconds": seconds, "n": len(samples), "p50": pct(samples, 0.5),
            "p99": pct(samples, 0.99), "max": max(samples, default=float("nan")),
            "first_p99": pct(samples[:third], 0.99), "last_p99": pct(samples[-third:], 0.99),
            "acks_p50": st["lag_p50_ms"], "acks_p99": st["lag_p99_ms"], "acks_max": st["lag_max_ms"]}


def measure_ingest_alone(work, records):
    """ingest-bench against a fresh replicator pinned to CPU 1, the sender on CPU 0."""
    s = Servers(work)
    results = {}
    try:
        addr = s.replicator("ingest", pin="1")
        pid = s.rep["ingest"].pid
        for workload, n in records.items():
            c0 = cpu_seconds(pid)
            out = subprocess.run(["taskset", "-c", "0", f"{BIN}/ingest-bench", "--addr", addr,
                                  "--workload", workload, "--records", str(n), "--group", f"g{workload}"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                log = open(f"{s.work}/ingest-replicator.log").read().splitlines()[-10:]
                sys.exit(f"ingest-bench --workload {workload} failed: {out.stderr.strip()}\n"
                         "the replicator's log ends:\n" + "\n".join(log))
            r = json.loads(out.stdout)
            r["replicator_cpu_s"] = cpu_seconds(pid) - c0
            results[workload] = r
            print(f"ingest alone {workload}: {out.stdout.strip()}", file=sys.stderr)
    finally:
        s.stop()
    return results


def table(best, cpu, lag, ingest, mem, rss, alone, large):
    cols = " | ".join(TITLES)
    lines = ["Ratios are of the row's unit: for IOPS and MiB/s higher is better, for latency (µs) lower is.",
             "",
             f"| workload | conns | unit | {cols} | async / proxy | sync / proxy | async / blklogwrites | sync / active mirror "
             "| sync / durable mirror |",
             "|---|---|---|" + "---|" * (len(SERVERS) + 5)]
    for label, _, _, _, conns in ROWS:
        for m, unit, _ in metrics(label):
            v = dict(zip(SERVERS, (best[(label, conns, n, m)] for n in SERVERS)))
            ratio = lambda x, y: f"{v[x] / v[y]:.2f}x" if v[y] else "-"
            lines.append(f"| {label} | {conns} | {unit} | " + " | ".join(f"{v[n]:.0f}" for n in SERVERS) +
                         f" | {ratio('proxy-async', 'proxy')} | {ratio('proxy-sync', 'proxy')} | "
                         f"{ratio('proxy-async', 'blklogwrites')} | {ratio('proxy-sync', 'mirror')} | "
                         f"{ratio('proxy-sync', 'mirror-durable')} |")
    lines += ["", "Made durable: right after a write row (for +async and +sync once caught up), every file the "
              "server wrote is fsynced and the fsync timed (ms). The plain proxy, nbdkit, blklogwrites and the "
              "active mirror's target acknowledge from the page cache unless the guest flushes (fio sends no flush "
              "here; the durable mirror's target flushes after every write); "
              "a replicator has fsynced its journal before it acknowledges, but the proxies' own images are "
              "still written through the page cache. `durable` is the row's rate over fio's run plus that fsync.",
              "",
              f"| workload | conns | unit | fsync ms: {cols} | durable: {cols} | async / proxy | sync / active mirror "
              "| sync / durable mirror |",
              "|---|---|---|" + "---|" * (2 * len(SERVERS) + 3)]
    for label, rw, bs, _, conns in ROWS:
        if rw.endswith("write"):
            f = [best[(label, conns, n, "fsync")] * 1000 for n in SERVERS]
            d = dict(zip(SERVERS, (best[(label, conns, n, "durable")] for n in SERVERS)))
            ratio = lambda x, y: f"{d[x] / d[y]:.2f}x" if d[y] else "-"
            lines.append(f"| {label} | {conns} | {THROUGHPUT[bs][1]} | " + " | ".join(f"{x:.0f}" for x in f) + " | "
                         + " | ".join(f"{d[n]:.0f}" for n in SERVERS) +
                         f" | {ratio('proxy-async', 'proxy')} | {ratio('proxy-sync', 'mirror')} "
                         f"| {ratio('proxy-sync', 'mirror-durable')} |")
    overflowed = [(label, conns, n, best[(label, conns, n, "overflows")]) for label, rw, _, _, conns in ROWS
                  for n in ("proxy-async", "proxy-sync") if best.get((label, conns, n, "overflows"))]
    lines += ["", "Change log overflows (`log_overflows` of `nbd-proxy status`): rows where the proxy's change "
              "log (--log-capacity, 256 MiB) filled, so that writes were kept as dirty chunks and sent by a "
              "resync, not each as a record (history of that interval coalesced; the row's rate is not that "
              "of keeping every write):", ""]
    lines += [f"* {label}, {conns} conn(s), {n}: filled {k} time(s) in a round" for label, conns, n, k in overflowed] \
        or ["* none"]
    lines += ["", "CPU seconds per GiB written (utime+stime of the process over the row's fio run; for "
              "+async until it caught up, a resync after an overflow included). *Made durable* adds the CPU "
              "of the fsync after the row, which writes back what the proxy left in the page cache (the "
              "writeback runs in the fsync's context): the plain proxy leaves all its writes there, to the "
              "kernel's flusher or that fsync, while +async writes its image back as it goes, on its own "
              "thread, whose CPU the first column counts:", "",
              "| workload | conns | proxy | +async | async / proxy | made durable: proxy | +async | async / proxy "
              "| +async's replicator |", "|---|---|---|---|---|---|---|---|---|"]
    per_gib = lambda k, i=(0,): sum(cpu[k][j] for j in i) / (cpu[k][1] / GIB) if cpu.get(k) and cpu[k][1] \
        else float("nan")
    for label, rw, _, _, conns in ROWS:
        if rw.endswith("write"):
            p, q, r = (per_gib((label, conns, k)) for k in ("proxy", "proxy-async", "replicator"))
            pd, qd = (per_gib((label, conns, k), (0, 2)) for k in ("proxy", "proxy-async"))
            lines.append(f"| {label} | {conns} | {p:.2f} | {q:.2f} | {q / p:.2f}x | {pd:.2f} | {qd:.2f} | "
                         f"{qd / pd:.2f}x | {r:.2f} |")
    grows = lag["last_p99"] > 1.5 * lag["first_p99"] and lag["last_p99"] - lag["first_p99"] > 10
    lines += ["",
              f"Replication lag of +async with fio 4k randwrite QD32 at {lag['rate']} IOPS (half the plain proxy's "
              f"rate) for {lag['seconds']} s, `lag_ms` polled every 50 ms ({lag['n']} samples): p50 {lag['p50']:.0f} ms, "
              f"p99 {lag['p99']:.0f} ms, max {lag['max']:.0f} ms; p99 of the first third {lag['first_p99']:.0f} ms, "
              f"of the last third {lag['last_p99']:.0f} ms: {'it grows' if grows else 'it does not grow'}. "
              f"The proxy's own capture-to-durable-ack samples (the oldest record of each of the last 4096 acks): p50 {lag['acks_p50']:.1f} ms, "
              f"p99 {lag['acks_p99']:.1f} ms, max {lag['acks_max']:.1f} ms.",
              "",
              f"Compressible stream through +async (fio 1M writes, 2 GiB, 75% compressible): durable at "
              f"{ingest[0]:.2f} GiB/s end to end (fio done in {ingest[1]:.1f} s, all durable at the replicator "
              f"after {ingest[2]:.1f} s).",
              "",
              "Replicator ingest alone (`ingest-bench`: records built beforehand with the journal's encoder, sent "
              "over loopback as fast as the link takes them, until the last durable ack; replicator on CPU 1, "
              "sender on CPU 0):", "",
              "| workload | records | GiB of payload | seconds | records/s | GiB/s | replicator CPU s |",
              "|---|---|---|---|---|---|---|"]
    names = {"1m": "1 MiB writes, half random half zeros (lz4)", "4k": "4 KiB writes, random"}
    for w, r in alone.items():
        lines.append(f"| {names[w]} | {r['records']} | {r['payload_bytes'] / GIB:.2f} | {r['seconds']:.2f} | "
                     f"{r['records_per_s']:.0f} | {r['gib_per_s']:.2f} | {r['replicator_cpu_s']:.2f} |")
    lines += ["",
              f"Proxy memory with `--log-capacity 64MiB` and the replicator stopped (SIGSTOP) while 1 GiB is "
              f"written: peak RSS {mem[0]:.1f} MiB; the log held {mem[1]:.1f} MiB, tracking {mem[2]}. "
              f"Peak RSS over the rows: proxy {rss['proxy']:.1f} MiB, proxy+async {rss['proxy-async']:.1f} MiB.",
              "",
              f"A fresh {LARGE_GIB} GiB disk (sparse image) right after protection starts: +async just seeded, "
              f"its page cache as the seed left it and its {LARGE_GIB * 256} activity-log extents idle; fio 4k "
              f"randwrite QD32 over the whole disk, one connection:", "",
              "| | proxy | +async | async / proxy |", "|---|---|---|---|"]
    p, q = large["proxy"], large["proxy-async"]
    lines += [f"| IOPS | {p['iops']:.0f} | {q['iops']:.0f} | {q['iops'] / p['iops']:.2f}x |",
              f"| p99 µs | {p['p99']:.0f} | {q['p99']:.0f} | {q['p99'] / p['p99']:.2f}x |"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio row and server (default 5)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--lag-seconds", type=int, default=60, help="length of the lag run (default 60)")
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="2 s rows, a 10 s lag run, smaller ingest runs")
    a = ap.parse_args()
    alone_records = {"1m": 2048, "4k": 500_000}
    if a.quick:
        a.runtime, a.lag_seconds, alone_records = 2, 10, {"1m": 512, "4k": 100_000}
    for b in ("nbd-proxy", "replicator", "ingest-bench"):
        if not os.path.exists(f"{BIN}/{b}"):
            sys.exit(f"{BIN}/{b} is missing: run `cargo build --release --bins` first")
    work = tempfile.mkdtemp(prefix="bench-repl-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    s = Servers(work)
    out = f"{work}/fio.json"
    try:
        print("preparing images (1 GiB of random data each), seeding the replicators, syncing the mirror...",
              file=sys.stderr)
        src = f"{work}/source.img"
        subprocess.run(["dd", "if=/dev/urandom", f"of={src}", "bs=1M", "count=1024", "status=none"], check=True)
        for name in SERVERS:
            subprocess.run(["cp", src, f"{work}/{name}.img"], check=True)
        os.remove(src)
        subprocess.run(["sync"], check=True)
        s.proxy("proxy", f"{work}/proxy.img")
        s.proxy("proxy-async", f"{work}/proxy-async.img")
        s.proxy("proxy-sync", f"{work}/proxy-sync.img", ["--mode", "sync"])
        s.blklogwrites(f"{work}/blklogwrites.img")
        s.mirror("mirror", f"{work}/mirror.img", "writeback")
        s.mirror("mirror-durable", f"{work}/mirror-durable.img", "writethrough")
        s.nbdkit(f"{work}/nbdkit.img")

        best, cpu = measure_rows(s, a, out)
        cold_cache(s.files)
        lag = measure_lag(s, int(best[("4k randwrite QD32", 1, "proxy", "iops")] / 2), a.lag_seconds)
        print(f"lag: {json.dumps(lag)}", file=sys.stderr)

        # Ingest: a compressible stream, from fio's start until all of it is durable.
        ctl = s.ctl["proxy-async"]
        t0 = time.time()
        fio(s.uri["proxy-async"], "write", "1M", 8, 1, 0, out,
            ["--io_size=2g", "--buffer_compress_percentage=75", "--refill_buffers"])
        fio_s = time.time() - t0
        wait(lambda: caught_up(ctl), "catch up", 600)
        ingest_s = time.time() - t0
        ingest = (2.0 / ingest_s, fio_s, ingest_s)

        rss = {n: peak_rss_mib(s.pid[n]) for n in ("proxy", "proxy-async")}
        s.stop()

        # Memory with a 64 MiB log under a stalled replicator: the log fills, then dirty chunks.
        s2 = Servers(work + "/mem")
        os.makedirs(s2.work)
        subprocess.run(["cp", f"{work}/proxy.img", f"{s2.work}/m.img"], check=True)
        try:
            mp = s2.proxy("proxy-mem", f"{s2.work}/m.img", ["--log-capacity", "64MiB"])
            s2.rep["proxy-mem"].send_signal(signal.SIGSTOP)
            fio(s2.uri["proxy-mem"], "randwrite", "64k", 16, 1, 0, out, ["--io_size=1g", "--refill_buffers"])
            st_full = proxy_status(s2.ctl["proxy-mem"])
            s2.rep["proxy-mem"].send_signal(signal.SIGCONT)
            wait(lambda: caught_up(s2.ctl["proxy-mem"]), "the resync after the stall", 600)
            mem = (peak_rss_mib(mp.pid), st_full["log_used"] / 2**20, st_full["tracking"])
        finally:
            s2.stop()

        alone = measure_ingest_alone(work, alone_records)
        large = measure_large(work, out, a.runtime)
        text = table(best, cpu, lag, ingest, mem, rss, alone, large)
        print(text)
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                f.write(text + "\n")
    finally:
        s.stop()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
