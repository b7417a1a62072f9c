#!/usr/bin/env bash
# End-to-end check of the test guest with nothing of the project's own: builds it (cached), serves
# copies of disk.img and data.img with qemu-nbd, boots them (boot.sh --accel auto), drives
# gen 1, gen 2, data-gen 3, random-writes, check and poweroff through the serial socket, checks
# the images with e2fsck -fn and debugfs, then boots the same disks again non-interactively
# (--cmds 'check;poweroff') and expects every generation back with an OK checksum.
# Usage: vm-images/selftest.sh [WORKDIR]     (default: a fresh /tmp/vm-selftest.XXXXXX, removed on success)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
work=${1:-$(mktemp -d /tmp/vm-selftest.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
step() { echo "== $* ($((SECONDS - t0)) s)"; }
ms() { date +%s%3N; }
t0=$SECONDS

t=$(ms); bash "$here/build.sh"; echo "build: $(($(ms) - t)) ms"
cp "$here/out/disk.img" "$work/disk.img"
cp "$here/out/data.img" "$work/data.img"
rm -f "$work"/*.sock "$work"/console*.log
qemu-nbd -f raw -k "$work/root.sock" -x root --persistent "$work/disk.img" & pids+=($!)
qemu-nbd -f raw -k "$work/data.sock" -x data --persistent "$work/data.img" & pids+=($!)
for s in root data; do
  for _ in $(seq 100); do [ -S "$work/$s.sock" ] && break; sleep 0.05; done
  [ -S "$work/$s.sock" ] || { echo "qemu-nbd for $s did not start" >&2; exit 1; }
done
nbd=(--nbd-socket "$work/root.sock" --export root --nbd-socket "$work/data.sock" --export data)

step "boot 1: interactive, through $work/serial.sock"
t=$(ms)
"$here/boot.sh" "${nbd[@]}" --serial-log "$work/console1.log" --serial-socket "$work/serial.sock" \
  --pidfile "$work/qemu.pid" > "$work/qemu1.log" 2>&1 & vm=$!; pids+=($vm)
log=$work/console1.log
wait_for_line "$log" "CDP-GUEST: READY" 180 $vm
echo "boot to READY: $(($(ms) - t)) ms ($(cat "$here/out/accel"))"
for cmd in "gen 1" "gen 2" "data-gen 3" "random-writes 20" check; do
  t=$(ms) seen=$(line_count "$log")
  send_cmd "$work/serial.sock" "$cmd"
  case "$cmd" in
    gen*|data-gen*) want="GEN ${cmd##* } WRITTEN" ;;
    random*) want="RANDOM DONE 20" ;;
    check) want="CHECK DONE base=/data" ;;
  esac
  wait_for_line "$log" "CDP-GUEST: $want" 120 $vm "$seen"
  echo "$cmd: $(($(ms) - t)) ms"
done
grep -q "CHECK DONE base=/mnt gens=1 2$" "$log" || { echo "unexpected CHECK DONE line" >&2; exit 1; }
send_cmd "$work/serial.sock" poweroff
wait_for_line "$log" "CDP-GUEST: POWEROFF" 60 $vm
wait $vm || { echo "QEMU exited with $?" >&2; exit 1; }

step "the images: e2fsck -fn, debugfs"
e2fsck -fn "$work/disk.img"
e2fsck -fn "$work/data.img"
debugfs -R 'ls -l /' "$work/disk.img" 2>/dev/null
debugfs -R 'cat /generations.log' "$work/disk.img" 2>/dev/null
for n in 1 2; do
  sum=$(grep -o "GEN $n WRITTEN [0-9a-f]*" "$log" | cut -d' ' -f4)
  [ "$(debugfs -R 'cat /generations.log' "$work/disk.img" 2>/dev/null | grep "^GEN $n ")" = "GEN $n WRITTEN $sum" ] \
    || { echo "generation $n is not in the image's generations.log" >&2; exit 1; }
done

step "boot 2: the same disks, with --cmds 'check;poweroff' and no serial socket"
t=$(ms)
"$here/boot.sh" "${nbd[@]}" --serial-log "$work/console2.log" --cmds 'check;poweroff' \
  > "$work/qemu2.log" 2>&1 & vm=$!; pids+=($vm)
log=$work/console2.log
wait_for_line "$log" "CDP-GUEST: POWEROFF" 180 $vm
wait $vm || { echo "QEMU exited with $?" >&2; exit 1; }
echo "boot 2, check and power-off: $(($(ms) - t)) ms"
for n in 1 2 3; do
  sum=$(grep -o "GEN $n WRITTEN [0-9a-f]*" "$work/console1.log" | cut -d' ' -f4)
  grep -q "CDP-GUEST: HAVE GEN $n $sum OK" "$log" || { echo "boot 2 lacks HAVE GEN $n $sum OK" >&2; exit 1; }
done
! grep -E "CDP-GUEST: (ERROR|HAVE GEN .* BAD)|I/O error" "$work"/console*.log || exit 1
grep "CDP-GUEST" "$log"
e2fsck -fn "$work/disk.img" >/dev/null && e2fsck -fn "$work/data.img" >/dev/null
cleanup; pids=()
[ $# -gt 0 ] || rm -rf "$work"
echo "selftest: PASSED in $((SECONDS - t0)) s"
