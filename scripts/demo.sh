#!/usr/bin/env bash
# `make demo`: the main job end to end. A VM whose two disks are served by nbd-proxy writes
# generations of checksummed files; every write is replicated to a replicator whose store is an
# S3 bucket (SeaweedFS on 127.0.0.1, started here) with a local staging store that acknowledges;
# a bookmark marks generation 1; the proxy (SIGTERM, kill -9) and the replicator (kill -9) are
# restarted under the running VM. Then, once the bucket holds the bookmark and while the first
# VM keeps writing, the bookmark is exported from the bucket and a second VM boots from it and
# finds generation 1 and not generation 2; a file is pulled out of the point materialized from
# the bucket with debugfs; the latest point of the group is boot-verified from the staging store.
# A short report closes it. DEMO_DIR (work dir) and DEMO_PORT (replicator) override defaults.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/vm-images/lib.sh"
proxy_bin=$root/target/release/nbd-proxy
rep_bin=$root/target/release/replicator
restore_bin=$root/target/release/restore
weed_bin=${CDP_WEED:-$root/target/seaweedfs/venv/bin/weed}
rep_addr=127.0.0.1:${DEMO_PORT:-17070}
work=${DEMO_DIR:-/var/tmp/cdp-demo}
bucket=cdp-demo
s3_store=s3://$bucket/demo
# The lab identity SeaweedFS is started with; replicator and restore read these variables
# (AWS_ENDPOINT_URL is set once SeaweedFS has its port).
export AWS_ACCESS_KEY_ID=cdpdemo AWS_SECRET_ACCESS_KEY=cdpdemosecret0123456789 AWS_REGION=us-east-1
rm -rf "$work"
mkdir -p "$work"
pids=()
weed_pid=
cur_step="setting up"
stop_weed() {
  [ -n "$weed_pid" ] || return 0
  kill -TERM "$weed_pid" 2>/dev/null || true
  # weed takes a few seconds (up to ~30) to stop on SIGTERM: wait 5 s, then kill it.
  for _ in $(seq 25); do kill -0 "$weed_pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$weed_pid" 2>/dev/null || true
  wait "$weed_pid" 2>/dev/null || true
  weed_pid=
}
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  stop_weed
  if [ "$rc" != 0 ]; then
    echo "demo FAILED (exit $rc) in step: $cur_step" >&2
    echo "logs: $work (replicator.log, proxy.log, console.log, export.log, s3/weed.log, ...)" >&2
  fi
}
trap cleanup EXIT
step() { cur_step=$*; printf '\n== %s\n' "$*"; }
# cmd LINE REGEX TIMEOUT_S: types LINE into the guest and waits for REGEX among the lines after it.
cmd() {
  local after
  after=$(line_count "$work/console.log")
  send_cmd "$work/serial.sock" "$1"
  wait_for_line "$work/console.log" "$2" "$3" "" "$after"
}
ms() { date +%s%3N; }

cp "$root/vm-images/out/disk.img" "$work/root.img"
cp "$root/vm-images/out/data.img" "$work/data.img"

# free_ports N: N free ports p on 127.0.0.1 with p+10000 free too (SeaweedFS opens its gRPC
# port there).
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
def free(p):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
            return True
        except OSError:
            return False
taken = []
for _ in range(500):
    if len(taken) == int(sys.argv[1]):
        break
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
    if p <= 55000 and not {p, p + 10000, p - 10000} & set(taken) and free(p + 10000):
        taken.append(p)
print(*taken)
PY
}
# s3_curl ARGS: curl signed with the lab identity (SigV4).
s3_curl() {
  curl -s --max-time 10 --aws-sigv4 "aws:amz:$AWS_REGION:s3" \
    --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$@"
}
# SeaweedFS (`weed mini`: master, volume, filer, S3) with its data in $work/s3, the bucket
# created at start; up when a signed PUT into the bucket succeeds. Other ports on a failed start.
start_weed() {
  [ -x "$weed_bin" ] || { echo "SeaweedFS is missing ($weed_bin): run make setup" >&2; exit 1; }
  mkdir -p "$work/s3/data" "$work/s3/logs"
  printf '{"identities": [{"name": "cdp", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],
    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}\n' \
    "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$work/s3/s3.json"
  local ok_sum s3_port master_port volume_port filer_port admin_port
  ok_sum=$(printf ok | sha256sum | cut -d' ' -f1)
  for attempt in 1 2 3; do
    read -r s3_port master_port volume_port filer_port admin_port < <(free_ports 5)
    [ -n "$admin_port" ] || { echo "no free ports for SeaweedFS on 127.0.0.1" >&2; exit 1; }
    # Its heap otherwise grows to ~900 MB.
    GOMEMLIMIT=256MiB "$weed_bin" -logdir="$work/s3/logs" mini -dir="$work/s3/data" \
      -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$s3_port" -master.port="$master_port" \
      -volume.port="$volume_port" -filer.port="$filer_port" -admin.port="$admin_port" \
      -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
      -s3.autoCreateBucket=false -bucket="$bucket" -s3.config="$work/s3/s3.json" \
      </dev/null >>"$work/s3/weed.log" 2>&1 &
    weed_pid=$!
    export AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port
    for _ in $(seq 300); do # 60 s
      kill -0 "$weed_pid" 2>/dev/null || break
      s3_curl -f -o /dev/null -X PUT -H "x-amz-content-sha256: $ok_sum" --data-binary ok \
        "$AWS_ENDPOINT_URL/$bucket/.ready" && return
      sleep 0.2
    done
    stop_weed
    echo "SeaweedFS did not take a PUT on $AWS_ENDPOINT_URL (attempt $attempt of 3)" >&2
  done
  echo "SeaweedFS did not start; see $work/s3/weed.log" >&2; exit 1
}
# bucket_usage: "OBJECTS SEGMENTS SEGMENT_BYTES BYTES" of what the bucket holds under the prefix.
bucket_usage() {
  s3_curl -f "$AWS_ENDPOINT_URL/$bucket?list-type=2&prefix=${s3_store#s3://"$bucket"/}%2F" | python3 -c '
import sys, xml.etree.ElementTree as ET
ns = {"s": "http://s3.amazonaws.com/doc/2006-03-01/"}
root = ET.parse(sys.stdin).getroot()
objs = [(c.find("s:Key", ns).text, int(c.find("s:Size", ns).text)) for c in root.findall("s:Contents", ns)]
segs = [n for k, n in objs if k.endswith(".seg")]
more = "+" if root.findtext("s:IsTruncated", "false", ns) == "true" else ""
print(f"{len(objs)}{more}", len(segs), sum(segs), sum(n for _, n in objs))'
}
# rep_json EXPR: a Python expression (a tuple prints space-separated) of group vm (g) and its
# upload (u) in `replicator status --json` of the staging store, e.g. "u['uploaded_seq']";
# empty when there is none yet.
rep_json() {
  "$rep_bin" status --store "$work/store" --json 2>/dev/null | python3 -c "
import json, sys
try:
    g = next(g for g in json.load(sys.stdin) if g['group'] == 'vm')
    u = g['upload']
    v = ($1)
    print(*v) if isinstance(v, tuple) else print(v)
except Exception:
    print('')" || true
}
mib() { python3 -c "print(f'{$1 / 1048576:.1f}')"; }

start_replicator() {
  "$rep_bin" serve --listen "$rep_addr" --store "$s3_store" --staging "$work/store" \
    --segment-size 1MiB --upload-interval 1s --retention 24h \
    --tls-cert "$work/pki/server-cert.pem" --tls-key "$work/pki/server-key.pem" \
    --tls-ca "$work/pki/ca-cert.pem" 2>>"$work/replicator.log" &
  rep_pid=$!
  pids+=("$rep_pid")
  for _ in $(seq 100); do
    kill -0 "$rep_pid" 2>/dev/null || break
    (exec 3<>"/dev/tcp/${rep_addr%:*}/${rep_addr#*:}") 2>/dev/null && return
    sleep 0.05
  done
  echo "replicator did not start (is $rep_addr in use? set DEMO_PORT); see $work/replicator.log" >&2; exit 1
}
start_proxy() {
  "$proxy_bin" --disk "root=$work/root.img" --disk "data=$work/data.img" --socket "$work/nbd.sock" \
    --group vm --replicate "$rep_addr" --control "$work/ctl" \
    --tls-cert "$work/pki/vm/client-cert.pem" --tls-key "$work/pki/vm/client-key.pem" \
    --tls-ca "$work/pki/vm/ca-cert.pem" 2>>"$work/proxy.log" &
  proxy_pid=$!
  pids+=("$proxy_pid")
  for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && return; sleep 0.05; done
  echo "nbd-proxy did not start; see $work/proxy.log" >&2; exit 1
}

step "a lab CA for mutual TLS on the replication link, and a certificate for group vm ($work/pki)"
"$rep_bin" tls init "$work/pki" >/dev/null
"$rep_bin" tls issue --dir "$work/pki" --group vm >/dev/null
ls "$work/pki" "$work/pki/vm"

step "SeaweedFS (S3) on 127.0.0.1 with bucket $bucket, its data in $work/s3"
t0=$(ms)
start_weed
echo "S3 endpoint $AWS_ENDPOINT_URL ready in $(($(ms) - t0)) ms"

step "replicator on $rep_addr (TLS): store $s3_store, staging store $work/store, 1 MiB segments"
start_replicator

step "nbd-proxy serves the VM's two disks at $work/nbd.sock and replicates them (group vm)"
start_proxy
# json_field KEY: one field of `nbd-proxy status --json`.
json_field() { "$proxy_bin" status --control "$work/ctl" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
caught_up() {
  for _ in $(seq 1200); do
    [ "$(json_field lag_seq)" = 0 ] && [ "$(json_field sync_running)" = False ] \
      && [ "$(json_field link)" = connected ] && return
    sleep 0.1
  done
  echo "replication did not catch up; see $work/proxy.log" >&2; exit 1
}
t0=$(ms)
caught_up
seed_ms=$(($(ms) - t0))
echo "initial seed of both disks done in ${seed_ms} ms"
accel=$(probe_accel "$root/vm-images/out")

step "booting the VM ($accel) with its disks on nbd-proxy"
t0=$(ms)
"$root/vm-images/boot.sh" --disk "$work/nbd.sock:root" --disk "$work/nbd.sock:data" \
  --console "$work/console.log" --serial-socket "$work/serial.sock" >"$work/qemu.log" 2>&1 &
pids+=($!)
wait_for_line "$work/console.log" "CDP-GUEST: READY" 120
boot_ms=$(($(ms) - t0))
echo "guest ready in ${boot_ms} ms"

step "the guest writes generation 1, then a bookmark marks it"
cmd "gen 1" "GEN 1 WRITTEN" 60
gen1_sum=$(grep -a "GEN 1 WRITTEN" "$work/console.log" | tail -n 1 | awk '{print $NF}' | tr -d '\r')
bm_out=$("$proxy_bin" bookmark --control "$work/ctl" gen1)
echo "$bm_out"
bm_seq=$(echo "$bm_out" | sed -n 's/.* at seq \([0-9]*\).*/\1/p')
[ -n "$bm_seq" ] || { echo "no seq in the bookmark's reply" >&2; exit 1; }

step "the guest writes generation 2 while nbd-proxy restarts (SIGTERM)"
after=$(line_count "$work/console.log")
send_cmd "$work/serial.sock" "gen 2"
t0=$(ms)
kill -TERM "$proxy_pid"; wait "$proxy_pid" || true
start_proxy
wait_for_line "$work/console.log" "GEN 2 WRITTEN" 60 "" "$after"
restart_ms=$(($(ms) - t0))

step "the guest writes to its data disk while nbd-proxy is killed with -9 and restarted"
after=$(line_count "$work/console.log")
send_cmd "$work/serial.sock" "data-gen 3"
send_cmd "$work/serial.sock" "random-writes 100"
kill -KILL "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true
start_proxy
wait_for_line "$work/console.log" "RANDOM DONE 100" 120 "" "$after"

step "the replicator is killed with -9 and restarted while the guest writes"
after=$(line_count "$work/console.log")
send_cmd "$work/serial.sock" "random-writes 100"
kill -KILL "$rep_pid"; wait "$rep_pid" 2>/dev/null || true
sleep 1
start_replicator
wait_for_line "$work/console.log" "RANDOM DONE 100" 120 "" "$after"

step "the bucket catches up to the bookmark (seq $bm_seq): its segment sealed and uploaded"
# The bucket lags the staging store by the open segment: the bookmark is there once the segment
# holding it is sealed (1 MiB) and uploaded. The writes since usually did that; if not, the
# guest writes 1 MiB more (once), and after 120 s this gives up.
t0=$(ms)
nudged=no
while [ "$(($(ms) - t0))" -lt 120000 ]; do
  up_seq=$(rep_json "u['uploaded_seq']")
  [ -n "$up_seq" ] && [ "$up_seq" -ge "$bm_seq" ] && break
  if [ "$(($(ms) - t0))" -ge 20000 ] && [ "$nudged" = no ]; then
    echo "the bucket holds seq ${up_seq:-none} after 20 s: the guest writes 1 MiB more to seal a segment"
    send_cmd "$work/serial.sock" "random-writes 256"
    nudged=yes
  fi
  sleep 0.2
done
if [ -z "$up_seq" ] || [ "$up_seq" -lt "$bm_seq" ]; then
  echo "the bucket did not reach the bookmark's seq $bm_seq within 120 s (uploaded seq ${up_seq:-none};" \
    "upload error: $(rep_json "u['error']")); see $work/replicator.log" >&2
  exit 1
fi
bucket_wait_ms=$(($(ms) - t0))
echo "the bucket holds seq $up_seq ($(rep_json "u['uploaded_segments']") segments) after ${bucket_wait_ms} ms of waiting"

step "while the first VM keeps writing, the bookmark is exported from the bucket and a second VM boots from it"
after1=$(line_count "$work/console.log")
send_cmd "$work/serial.sock" "random-writes 300"
t0=$(ms)
"$restore_bin" export --store "$s3_store" --cache "$work/cache" --group vm --at bookmark:gen1 \
  --socket "$work/past.sock" --writable >"$work/export.out" 2>"$work/export.log" &
export_pid=$!
pids+=("$export_pid")
# It fetches what the manifest names into --cache (checked) before it listens: up to 120 s.
for _ in $(seq 2400); do
  [ -S "$work/past.sock" ] && break
  kill -0 "$export_pid" 2>/dev/null || break
  sleep 0.05
done
[ -S "$work/past.sock" ] || {
  echo "restore export from $s3_store did not listen within 120 s; see $work/export.log:" >&2
  tail -n 20 "$work/export.log" >&2; exit 1
}
export_ms=$(($(ms) - t0))
# Time to the first byte: the first 4 KiB of the root disk read through the export.
timeout 60 /usr/bin/python3 -c '
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert len(h.pread(4096, 0)) == 4096
h.shutdown()' "nbd+unix:///root?socket=$work/past.sock" \
  || { echo "the first read from the export failed; see $work/export.log" >&2; exit 1; }
ttfb_ms=$(($(ms) - t0))
cache_bytes=$(du -s -B1 "$work/cache" | cut -f1) # allocated: base images there are sparse
cat "$work/export.out"
echo "export from the bucket: listening after ${export_ms} ms, first 4 KiB read after ${ttfb_ms} ms;" \
  "$work/cache holds $(mib "$cache_bytes") MiB"
t0=$(ms)
"$root/vm-images/boot.sh" --disk "$work/past.sock:root" --disk "$work/past.sock:data" \
  --console "$work/console2.log" --serial-socket "$work/serial2.sock" >"$work/qemu2.log" 2>&1 &
pids+=($!)
wait_for_line "$work/console2.log" "CDP-GUEST: READY" 120
past_boot_ms=$(($(ms) - t0))
past_gens=$(grep -a "CHECK DONE base=/mnt" "$work/console2.log" | tail -n 1 | sed 's/.*gens=//' | tr -d '\r')
past_bad=$(grep -ac "HAVE GEN .* BAD" "$work/console2.log" || true)
echo "the second VM finds generation(s) on its root disk: ${past_gens:-none}"
send_cmd "$work/serial2.sock" "poweroff"
wait_for_line "$work/console2.log" "Power down|POWEROFF" 60
kill -TERM "$export_pid"; wait "$export_pid" || true
wait_for_line "$work/console.log" "RANDOM DONE 300" 300 "" "$after1"

step "file-level recovery from the bucket: materialize the bookmark, check it, pull generation 1 out with debugfs"
"$restore_bin" materialize --store "$s3_store" --cache "$work/cache" --group vm --disk root --at bookmark:gen1 \
  --output "$work/gen1-root.img"
fsck_past=$(e2fsck -fn "$work/gen1-root.img" >/dev/null 2>&1 && echo clean || echo "NOT CLEAN")
mkdir -p "$work/pulled"
for i in 0 1 2 3 4 5 6 7; do debugfs -R "dump /gen-1/f$i $work/pulled/f$i" "$work/gen1-root.img" >/dev/null 2>&1; done
pulled_sum=$( (cd "$work/pulled" && cat f0 f1 f2 f3 f4 f5 f6 f7 2>/dev/null) | sha256sum | cut -d' ' -f1)
pulled=$([ "$pulled_sum" = "$gen1_sum" ] && echo "matches the guest's checksum" || echo "DIFFERS from the guest's checksum")
echo "gen-1 files pulled with debugfs: $pulled"

step "the latest point of the group (root and data disks) is boot-verified from the staging store (the bucket lags it by the open segment)"
verify=$("$restore_bin" verify --store "$work/store" --group vm --at latest --boot \
  --kernel "$root/vm-images/out/vmlinux" --initrd "$root/vm-images/out/initramfs.gz" \
  --append "console=ttyS0 quiet panic=-1 no_timer_check" --accel "$accel" \
  --expect "CHECK DONE base=/data gens=3" --timeout 120s --console-log "$work/verify-console.log" || true)
echo "$verify"
verified=$(echo "$verify" | grep -q '^PASS' && echo "PASS (data disk's generation 3 checked inside the guest)" || echo FAIL)

step "the first VM checks every generation, then powers off"
cmd "check" "CHECK DONE base=/data" 60
cmd "poweroff" "Power down" 60
caught_up
echo
"$proxy_bin" status --control "$work/ctl"
lag_p99=$(json_field lag_p99_ms)
kill -TERM "$proxy_pid"; wait "$proxy_pid" || true
echo
"$rep_bin" status --store "$work/store"
check=$("$rep_bin" check --store "$work/store" >"$work/check.txt" 2>&1 && echo "all checksums good" || echo "FAILED (see $work/check.txt)")
# The replica's latest point (base + journal, as restore reads it) against the VM's disks.
same() {
  "$restore_bin" materialize --store "$work/store" --group vm --disk "$1" --at latest \
    --output "$work/latest-$1.img" >/dev/null 2>&1 &&
    cmp -s "$work/$1.img" "$work/latest-$1.img" && echo identical || echo DIFFERENT
  rm -f "$work/latest-$1.img"
}
same_root=$(same root)
same_data=$(same data)
journal=$(du -sh "$work/store/vm/journal" | cut -f1)
read -r up_seq up_segs local_recs local_bytes rpo_s <<<"$(rep_json "u['uploaded_seq'], \
  u['uploaded_segments'], u['local_only_seq'], u['local_only_bytes'], \
  round(max(0, g['newest_time_ns'] - u['uploaded_time_ns']) / 1e9, 1)")"
upload_error=$(rep_json "u['error'] or 'none'")
read -r b_objects b_segs b_seg_bytes b_bytes <<<"$(bucket_usage || echo "? ? 0 0")"

fsck_root=$(e2fsck -fn "$work/root.img" >/dev/null 2>&1 && echo clean || echo "NOT CLEAN")
fsck_data=$(e2fsck -fn "$work/data.img" >/dev/null 2>&1 && echo clean || echo "NOT CLEAN")
bad=$(grep -c "CDP-GUEST: HAVE GEN .* BAD" "$work/console.log" || true)
ok=$(grep -c "CDP-GUEST: HAVE GEN .* OK" "$work/console.log" || true)
ioerr=$(grep -c "I/O error" "$work/console.log" || true)

cur_step="the report's checks (the rows above say which failed)"
row() { printf ' %-44s %s\n' "$1" "$2"; }
echo
echo "======================== demo report ========================"
row "VM booted from nbd-proxy ($accel):" "${boot_ms} ms to READY"
row "generations written and verified:" "$ok OK, $bad BAD (checked inside the guest)"
link=$(grep -o 'connected to replicator [^ ]* ([^)]*)' "$work/proxy.log" | tail -n 1 | sed 's/.*(\(.*\))/\1/')
row "replication link:" "mutual TLS, ${link:-?}, certificate for group vm"
row "restarts under the running VM:" "proxy SIGTERM, proxy kill -9, replicator kill -9; guest I/O errors: $ioerr"
row "gen 2 completed across the restart in:" "${restart_ms} ms"
row "file systems after power-off:" "root $fsck_root, data $fsck_data (e2fsck -fn)"
row "initial seed of both disks:" "${seed_ms} ms"
row "replication lag = RPO (p99 of recent acks):" "${lag_p99} ms"
row "bucket held the bookmark after:" "${bucket_wait_ms} ms of waiting (extra writes: $nudged)"
row "bookmark exported from the bucket (RTO 1):" "listening in ${export_ms} ms, first 4 KiB read in ${ttfb_ms} ms (cache $(mib "$cache_bytes") MiB)"
row "second VM booted from the bookmark in:" "${past_boot_ms} ms to READY ($accel)"
row "generations the second VM finds:" "root: ${past_gens:-none} (want 1), BAD: $past_bad"
row "bookmark materialized from the bucket:" "e2fsck $fsck_past; gen-1 $pulled"
row "restore verify --boot of latest (staging):" "$verified"
row "replica vs VM disks (root, data):" "$same_root, $same_data"
row "replicator check:" "$check"
row "journal size / bookmark:" "$journal / gen1"
row "S3 bucket (SeaweedFS):" "$s3_store at $AWS_ENDPOINT_URL"
row "uploaded to the bucket:" "seq ${up_seq:-?}: ${up_segs:-?} segments, $(mib "$b_seg_bytes") MiB of journal; $(mib "$b_bytes") MiB in $b_objects objects"
row "RPO to the bucket at the end:" "${rpo_s:-?} s (${local_recs:-?} records, $(( ${local_bytes:-0} / 1024 )) KiB local only: the open segment)"
row "upload errors at the end:" "$upload_error"
row "logs:" "$work"
echo "============================================================="
[ "$bad" = 0 ] && [ "$ioerr" = 0 ] && [ "$fsck_root" = clean ] && [ "$fsck_data" = clean ] \
  && [ "$same_root" = identical ] && [ "$same_data" = identical ] && [ "$check" = "all checksums good" ] \
  && [ "$past_gens" = 1 ] && [ "$past_bad" = 0 ] && [ "$fsck_past" = clean ] \
  && [ "$pulled" = "matches the guest's checksum" ] && [ "${verified%% *}" = PASS ] \
  && [ "$upload_error" = none ]
