#!/usr/bin/env bash
# `make demo`: a VM whose disks are served by nbd-proxy writes data; every write is replicated
# to a replicator with a local store; a bookmark is placed; the proxy is restarted under the VM
# (gracefully, then with kill -9) and then the replicator too; at the end the replica equals the
# VM's disks, and the file systems come out clean.
# Booting a past point from the store comes with the restore stage of the product.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/vm-images/lib.sh"
proxy_bin=$root/target/release/nbd-proxy
rep_bin=$root/target/release/replicator
rep_addr=127.0.0.1:${DEMO_PORT:-17070}
work=${DEMO_DIR:-/var/tmp/cdp-demo}
rm -rf "$work"
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
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
start_replicator() {
  "$rep_bin" serve --listen "$rep_addr" --store "$work/store" --retention 24h 2>>"$work/replicator.log" &
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
    --group vm --replicate "$rep_addr" --control "$work/ctl" 2>>"$work/proxy.log" &
  proxy_pid=$!
  pids+=("$proxy_pid")
  for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && return; sleep 0.05; done
  echo "nbd-proxy did not start; see $work/proxy.log" >&2; exit 1
}

step "replicator on $rep_addr with its store in $work/store"
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
"$proxy_bin" bookmark --control "$work/ctl" gen1

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

step "the guest checks every generation, then powers off"
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
same_root=$(cmp -s "$work/root.img" "$work/store/vm/head/root.img" && echo identical || echo DIFFERENT)
same_data=$(cmp -s "$work/data.img" "$work/store/vm/head/data.img" && echo identical || echo DIFFERENT)
journal=$(du -sh "$work/store/vm/journal" | cut -f1)

fsck_root=$(e2fsck -fn "$work/root.img" >/dev/null 2>&1 && echo clean || echo "NOT CLEAN")
fsck_data=$(e2fsck -fn "$work/data.img" >/dev/null 2>&1 && echo clean || echo "NOT CLEAN")
bad=$(grep -c "CDP-GUEST: HAVE GEN .* BAD" "$work/console.log" || true)
ok=$(grep -c "CDP-GUEST: HAVE GEN .* OK" "$work/console.log" || true)
ioerr=$(grep -c "I/O error" "$work/console.log" || true)

row() { printf ' %-40s %s\n' "$1" "$2"; }
echo
echo "======================== demo report ========================"
row "VM booted from nbd-proxy ($accel):" "${boot_ms} ms to READY"
row "generations written and verified:" "$ok OK, $bad BAD (checked inside the guest)"
row "restarts under the running VM:" "proxy SIGTERM, proxy kill -9, replicator kill -9; guest I/O errors: $ioerr"
row "gen 2 completed across the restart in:" "${restart_ms} ms"
row "file systems after power-off:" "root $fsck_root, data $fsck_data (e2fsck -fn)"
row "initial seed of both disks:" "${seed_ms} ms"
row "replication lag (p99 of recent acks):" "${lag_p99} ms"
row "replica vs VM disks (root, data):" "$same_root, $same_data"
row "replicator check:" "$check"
row "journal size / bookmark:" "$journal / gen1"
row "not yet built:" "booting the bookmark (restore)"
row "logs:" "$work"
echo "============================================================="
[ "$bad" = 0 ] && [ "$ioerr" = 0 ] && [ "$fsck_root" = clean ] && [ "$fsck_data" = clean ] \
  && [ "$same_root" = identical ] && [ "$same_data" = identical ] && [ "$check" = "all checksums good" ]
