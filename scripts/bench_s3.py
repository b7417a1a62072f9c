#!/usr/bin/python3
"""Store on S3 benchmark: upload, and restore straight from the bucket next to the local store.

Builds a real store with the real binaries, as scripts/bench_restore.py does: a sparse --size
disk (10 GiB) behind nbd-proxy, fio writing --records 4 KiB random writes (1,000,000), half
compressible, replicated to `replicator serve --store s3://bench/cdp --staging DIR` with a
SeaweedFS (`weed mini`, installed by `make setup`) on 127.0.0.1. Then, for the last point the
bucket holds (the same seq from both stores):

  * upload: how long after the last acknowledged write the bucket holds every sealed segment;
  * time from starting `restore export` to the first byte a client (libnbd) reads, from the
    bucket (nothing cached: indexes fetched each time) and from the staging store;
  * fio 1M sequential read QD8 from both exports right after they open (the bucket's export
    is still fetching the point in the background), then, once that is done, 1M sequential
    read QD8 and 4k randread QD32 again, in one run, as ratios;
  * peak RSS of the bucket's export.

Usage: scripts/bench_s3.py [--size 10G] [--records 1000000] [--runtime 10] [--out FILE] [--quick]
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from benchlib import BIN, ROOT, caught_up, peak_rss_mib, proxy_status, wait
from bench_restore import fio, first_byte_ms

WEED = os.environ.get("CDP_WEED", os.path.join(ROOT, "target/seaweedfs/venv/bin/weed"))
KEY, SECRET = "cdpbenchkey", "cdpbenchsecret0123456789"


def free_ports(n):
    """n free ports p on 127.0.0.1 with p+10000 free too (SeaweedFS's gRPC ports)."""
    def free(p):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return True
            except OSError:
                return False
    taken = []
    while len(taken) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p <= 55000 and not {p, p + 10000, p - 10000} & set(taken) and free(p + 10000):
            taken.append(p)
    return taken


def start_weed(work, bucket, log):
    """SeaweedFS with `bucket`, data in work/s3; returns (process, endpoint)."""
    os.makedirs(f"{work}/s3/data")
    os.makedirs(f"{work}/s3/logs")
    with open(f"{work}/s3/s3.json", "w") as f:
        json.dump({"identities": [{"name": "cdp", "credentials": [
            {"accessKey": KEY, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, f)
    s3, master, volume, filer, admin = free_ports(5)
    proc = subprocess.Popen(
        [WEED, f"-logdir={work}/s3/logs", "mini", f"-dir={work}/s3/data", "-ip=127.0.0.1",
         "-ip.bind=127.0.0.1", f"-s3.port={s3}", f"-master.port={master}",
         f"-volume.port={volume}", f"-filer.port={filer}", f"-admin.port={admin}",
         "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
         "-s3.autoCreateBucket=false", f"-bucket={bucket}", f"-s3.config={work}/s3/s3.json"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env={**os.environ, "GOMEMLIMIT": "256MiB"})
    endpoint = f"http://127.0.0.1:{s3}"

    def ready():
        if proc.poll() is not None:
            sys.exit(f"weed exited; see {work}/s3/logs")
        r = subprocess.run(["curl", "-sf", "-o", "/dev/null", "--max-time", "5", "--aws-sigv4",
                            "aws:amz:us-east-1:s3", "--user", f"{KEY}:{SECRET}",
                            f"{endpoint}/{bucket}?list-type=2&max-keys=1"])
        return r.returncode == 0
    wait(ready, "SeaweedFS", 90)
    return proc, endpoint


def upload_status(store):
    out = subprocess.run([f"{BIN}/replicator", "status", "--store", store, "--json"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    groups = json.loads(out.stdout)
    groups = groups.get("groups", []) if isinstance(groups, dict) else groups
    for g in groups:
        if "bench" in (g.get("name"), g.get("group")):
            return g.get("upload")
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="10G")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--segment-size", default="64MiB")
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="1 GiB, 100,000 records, 3 s rows")
    a = ap.parse_args()
    if a.quick:
        a.size, a.records, a.runtime = "1G", 100_000, 3
    if not os.path.exists(WEED):
        sys.exit(f"SeaweedFS is missing ({WEED}): run make setup")
    work = tempfile.mkdtemp(prefix="bench-s3-", dir="/var/tmp")
    procs = []
    try:
        log = open(f"{work}/log.txt", "w")
        weed, endpoint = start_weed(work, "bench", log)
        procs.append(weed)
        os.environ.update({"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
        url, staging, disk = "s3://bench/cdp", f"{work}/staging", f"{work}/disk.img"
        subprocess.run(["truncate", "-s", a.size, disk], check=True)
        port = free_ports(1)[0]
        rep = subprocess.Popen([f"{BIN}/replicator", "serve", "--listen", f"127.0.0.1:{port}",
                                "--store", url, "--staging", staging, "--insecure",
                                "--segment-size", a.segment_size], stdout=log, stderr=log)
        procs.append(rep)
        time.sleep(0.5)
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
        acked = time.time()
        write_s = acked - t0
        captured = proxy_status(ctl)["captured_seq"]
        # The bucket holds every sealed segment (the open one stays local: the RPO to the
        # bucket) once the uploaded seq stops moving.
        wait(lambda: (upload_status(staging) or {}).get("uploaded_segments"), "the upload", 600)
        last, still = None, time.time()
        while time.time() - still < 3:
            u = upload_status(staging)
            if u["uploaded_seq"] != last:
                last, still = u["uploaded_seq"], time.time()
            time.sleep(0.1)
        upload_s = max(0.0, still - acked)
        seq = last
        proxy.send_signal(signal.SIGTERM)
        proxy.wait()
        rep.send_signal(signal.SIGTERM)
        rep.wait()
        journal = sum(os.path.getsize(os.path.join(dp, f))
                      for dp, _, fs in os.walk(f"{staging}/bench/journal") for f in fs)
        print(f"{captured} records ({journal / 2**30:.2f} GiB of journal) in {write_s:.0f} s; "
              f"bucket at seq {seq} {upload_s:.1f} s after the last ack", file=sys.stderr)

        at = f"seq:{seq}"
        firsts = {"bucket": [], "staging": []}
        exports = {}
        bucket_log = f"{work}/export-bucket.log"
        for i in range(3):
            for name, store in [("bucket", url), ("staging", staging)]:
                out = open(bucket_log, "w") if (i, name) == (2, "bucket") else log
                ms, exp = first_byte_ms(store, f"{work}/{name}.sock", out, at)
                firsts[name].append(ms)
                if i < 2:
                    exp.send_signal(signal.SIGTERM)
                    exp.wait()
                else:
                    exports[name] = exp
                    procs.append(exp)
        opened = time.time()
        rss_first = peak_rss_mib(exports["bucket"].pid)

        def row(label, rw, bs, qd, unit):
            vals = {}
            for name in ["bucket", "staging"]:
                job = fio(f"nbd+unix:///d?socket={work}/{name}.sock", rw, bs, qd, a.runtime,
                          f"{work}/{name}.json")
                vals[name] = job["read"]["iops"] if unit == "IOPS" else job["read"]["bw"] / 1024
            return (label, unit, vals["bucket"], vals["staging"])

        # Cold: right after the export opened, while it fetches the point in the background.
        rows = [row("1M read QD8, cold (while the point is fetched)", "read", "1M", 8, "MiB/s")]

        def hydrated():
            with open(bucket_log) as f:
                for line in f:
                    if "the cache holds" in line:
                        return line.strip()
            return None
        done_line = wait(hydrated, "the background fetch", 1800)
        hydrate_s = time.time() - opened
        rows.append(row("1M read QD8, after the background fetch", "read", "1M", 8, "MiB/s"))
        rows.append(row("4k randread QD32, after the background fetch", "randread", "4k", 32, "IOPS"))
        rss_after = peak_rss_mib(exports["bucket"].pid)
        for e in exports.values():
            e.send_signal(signal.SIGTERM)
            e.wait()

        # Upload alone: the same staging store uploaded again to an empty prefix (every sealed
        # segment, nothing else running).
        rep = subprocess.Popen([f"{BIN}/replicator", "serve", "--listen", f"127.0.0.1:{port}",
                                "--store", "s3://bench/again", "--staging", staging,
                                "--insecure", "--upload-interval", "100ms"],
                               stdout=log, stderr=log)
        procs.append(rep)
        t0 = time.time()
        wait(lambda: (lambda u: u and u.get("bucket", "").endswith("again")
                      and u["uploaded_seq"] >= seq)(upload_status(staging)), "the upload again", 1800)
        upload_alone_s = time.time() - t0
        rep.send_signal(signal.SIGTERM)
        rep.wait()
        sealed = sum(os.path.getsize(os.path.join(dp, f))
                     for dp, _, fs in os.walk(f"{staging}/bench/journal") for f in fs
                     if f.endswith(".seg")) - os.path.getsize(sorted(
                         os.path.join(f"{staging}/bench/journal", f)
                         for f in os.listdir(f"{staging}/bench/journal") if f.endswith(".seg"))[-1])

        med = {k: sorted(v)[1] for k, v in firsts.items()}
        lines = [
            f"Command: `python3 scripts/bench_s3.py --size {a.size} --records {a.records} "
            f"--runtime {a.runtime} --segment-size {a.segment_size}`",
            "",
            f"Store: one {a.size} disk, {captured} records ({journal / 2**30:.2f} GiB of journal), "
            f"written and replicated in {write_s:.0f} s; the bucket held every sealed segment "
            f"(to seq {seq}) {upload_s:.1f} s after the last acknowledged write.",
            "",
            "| measure (point seq %d) | from the bucket | from the staging store | ratio |" % seq,
            "|---|---|---|---|",
            f"| time to first byte, median of 3 ({', '.join(f'{x:.0f}' for x in firsts['bucket'])} / "
            f"{', '.join(f'{x:.0f}' for x in firsts['staging'])} ms) | {med['bucket']:.0f} ms | "
            f"{med['staging']:.0f} ms | |",
        ]
        for label, unit, b, s in rows:
            lines.append(f"| {label} ({unit}) | {b:,.0f} | {s:,.0f} | {b / s:.2f}x |")
        lines.append(f"| upload alone: every sealed segment ({sealed / 2**30:.2f} GiB) to an empty "
                     f"prefix, from the replicator's start | {upload_alone_s:.1f} s "
                     f"({sealed / 2**20 / upload_alone_s:,.0f} MiB/s) | | |")
        lines.append(f"| background fetch of the point done (poll granularity ~1 row) | "
                     f"{hydrate_s:.0f} s after the first byte | | |")
        lines.append(f"| bucket export peak RSS (VmHWM) | {rss_first:.1f} MiB after the first byte, "
                     f"{rss_after:.1f} MiB after the reads | | |")
        lines += ["", f"Export log: `{done_line.split('restore::remote::cache: ')[-1]}`"]
        text = "\n".join(lines)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text + "\n")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
