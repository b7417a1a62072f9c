#!/usr/bin/env bash
# Replication lag under a steady write rate, alone (bench_replication.py's lag run is the one
# `make bench` reports; this is the quick probe used to find where its spikes come from):
# a replicator and an async nbd-proxy over a copy of a 1 GiB random image, fio 4k randwrite
# QD32 at IOPS for SECONDS, `lag_ms` polled every 50 ms; prints p50/p99/max and when it
# passed 100 ms.
#
# Usage: scripts/lag_probe.sh [BIN_DIR] [IOPS] [SECONDS]   (default target/release 30000 40)
set -euo pipefail
B=$(realpath "${1:-target/release}"); R=${2:-30000}; T=${3:-40}
W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/lag-probe-XXXXXX")
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
cd "$W"
dd if=/dev/urandom of=img.img bs=1M count=1024 status=none
port=$((20000 + RANDOM % 20000))
"$B/replicator" serve --listen "127.0.0.1:$port" --store store --insecure > rep.log 2>&1 &
sleep 0.3
"$B/nbd-proxy" --disk d=img.img --socket sock --replicate "127.0.0.1:$port" --group g \
  --control ctl --mode async --insecure > proxy.log 2>&1 &
ready='import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["link"]=="connected" and s["lag_seq"]==0 and s["syncs_completed"]>=1 and not s["sync_running"] else 1)'
for _ in $(seq 1200); do
  "$B/nbd-proxy" status --json --control ctl 2>/dev/null | python3 -c "$ready" 2>/dev/null && break
  sleep 0.1
done
# Every server starts from a cold cache (see bench_replication.py).
python3 -c 'import os; fd=os.open("img.img", os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)'
fio --name=b --ioengine=nbd --uri="nbd+unix:///d?socket=$W/sock" --rw=randwrite --bs=4k \
  --iodepth=32 --size=1g --rate_iops="$R" --time_based --runtime="$T" > /dev/null 2>&1 &
python3 - "$B" "$T" <<'PY'
import json, subprocess, sys, time
b, t = sys.argv[1], float(sys.argv[2])
t0, s = time.time(), []
while time.time() - t0 < t:
    o = subprocess.run([f"{b}/nbd-proxy", "status", "--json", "--control", "ctl"], capture_output=True, text=True)
    if o.returncode == 0:
        s.append((time.time() - t0, json.loads(o.stdout)["lag_ms"]))
    time.sleep(0.05)
v = sorted(x[1] for x in s)
p = lambda q: v[int((len(v) - 1) * q)]
print(f"lag_ms: {len(v)} samples, p50 {p(.5):.0f}, p99 {p(.99):.0f}, max {v[-1]:.0f}")
print("above 100 ms at t =", [round(t, 1) for t, l in s if l > 100][:40])
PY
