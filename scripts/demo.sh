#!/usr/bin/env bash
# `make demo`: the main job end to end. A VM whose two disks are served by nbd-proxy writes
# generations of checksummed files; every write is replicated to a replicator with a local
# store; a bookmark marks generation 1; the proxy (SIGTERM, kill -9) and the replicator
# (kill -9) are restarted under the running VM. Then, while the first VM keeps writing, the
# bookmark is exported from the store and a second VM boots from it and finds generation 1 and
# not generation 2; a file is pulled out of the materialized point with debugfs; the latest point
# of the group is boot-verified. A short report closes it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/vm-images/lib.sh"
proxy_bin=$root/target/release/nbd-proxy
rep_bin=$root/target/release/replicator
restore_bin=$root/target/release/restore
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
  "$rep_bin" serve --listen "$rep_addr" --store "$work/store" --retention 24h \
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

step "replicator on $rep_addr (TLS) with its store in $work/store"
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

step "while the first VM keeps writing, the bookmark is exported and a second VM boots from it"
after1=$(line_count "$work/console.log")
send_cmd "$work/serial.sock" "random-writes 300"
t0=$(ms)
"$restore_bin" export --store "$work/store" --group vm --at bookmark:gen1 --socket "$work/past.sock" \
  --writable >"$work/export.out" 2>"$work/export.log" &
export_pid=$!
pids+=("$export_pid")
for _ in $(seq 200); do [ -S "$work/past.sock" ] && break; sleep 0.02; done
[ -S "$work/past.sock" ] || { echo "restore export did not start; see $work/export.log" >&2; exit 1; }
export_ms=$(($(ms) - t0))
cat "$work/export.out"
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

step "file-level recovery: materialize the bookmark, check it, pull generation 1 out with debugfs"
"$restore_bin" materialize --store "$work/store" --group vm --disk root --at bookmark:gen1 --output "$work/gen1-root.img"
fsck_past=$(e2fsck -fn "$work/gen1-root.img" >/dev/null 2>&1 && echo clean || echo "NOT CLEAN")
mkdir -p "$work/pulled"
for i in 0 1 2 3 4 5 6 7; do debugfs -R "dump /gen-1/f$i $work/pulled/f$i" "$work/gen1-root.img" >/dev/null 2>&1; done
pulled_sum=$( (cd "$work/pulled" && cat f0 f1 f2 f3 f4 f5 f6 f7 2>/dev/null) | sha256sum | cut -d' ' -f1)
pulled=$([ "$pulled_sum" = "$gen1_sum" ] && echo "matches the guest's checksum" || echo "DIFFERS from the guest's checksum")
echo "gen-1 files pulled with debugfs: $pulled"

step "the latest point of the group (root and data disks) is boot-verified"
verify=$("$restore_bin" verify --store "$work/store" --group vm --at latest --boot \
  --kernel "$root/vm-images/out/vmlinux" --initrd "$root/vm-images/out/initramfs.gz" \
  --append "console=ttyS0 quiet panic=-1" --accel "$accel" \
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
same_root=$(cmp -s "$work/root.img" "$work/store/vm/head/root.img" && echo identical || echo DIFFERENT)
same_data=$(cmp -s "$work/data.img" "$work/store/vm/head/data.img" && echo identical || echo DIFFERENT)
journal=$(du -sh "$work/store/vm/journal" | cut -f1)

fsck_root=$(e2fsck -fn "$work/root.img" >/dev/null 2>&1 && echo clean || echo "NOT CLEAN")
fsck_data=$(e2fsck -fn "$work/data.img" >/dev/null 2>&1 && echo clean || echo "NOT CLEAN")
bad=$(grep -c "CDP-GUEST: HAVE GEN .* BAD" "$work/console.log" || true)
ok=$(grep -c "CDP-GUEST: HAVE GEN .* OK" "$work/console.log" || true)
ioerr=$(grep -c "I/O error" "$work/console.log" || true)

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
row "time to export the bookmark (RTO part 1):" "${export_ms} ms"
row "second VM booted from the bookmark in:" "${past_boot_ms} ms to READY ($accel)"
row "generations the second VM finds:" "root: ${past_gens:-none} (want 1), BAD: $past_bad"
row "materialized bookmark:" "e2fsck $fsck_past; gen-1 $pulled"
row "restore verify --boot of latest:" "$verified"
row "replica vs VM disks (root, data):" "$same_root, $same_data"
row "replicator check:" "$check"
row "journal size / bookmark:" "$journal / gen1"
row "logs:" "$work"
echo "============================================================="
[ "$bad" = 0 ] && [ "$ioerr" = 0 ] && [ "$fsck_root" = clean ] && [ "$fsck_data" = clean ] \
  && [ "$same_root" = identical ] && [ "$same_data" = identical ] && [ "$check" = "all checksums good" ] \
  && [ "$past_gens" = 1 ] && [ "$past_bad" = 0 ] && [ "$fsck_past" = clean ] \
  && [ "$pulled" = "matches the guest's checksum" ] && [ "${verified%% *}" = PASS ]
