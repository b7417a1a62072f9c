#!/usr/bin/env bash
# Boots the test guest under QEMU with its disks served over NBD (e.g. by nbd-proxy).
#
# Usage: vm-images/boot.sh --disk SOCK:EXPORT [--disk SOCK:EXPORT]   (first = /dev/vda, root)
#          [--console FILE] [--serial-socket PATH] [--cmds gen:1,check,poweroff]
#          [--accel auto|kvm|tcg] [--memory MIB] [--out DIR]
#
# QEMU runs in the foreground (exec), so callers can background it and kill it. Disks attach with
# reconnect-delay, so the guest rides over an NBD server restart. The console goes to --console
# (a log file); with --serial-socket a host program can also type commands into the guest.
# --accel auto probes KVM once with a short boot (cached in OUT/accel) and falls back to TCG.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/out
disks=() console="" serial="" cmds="" accel=auto memory=256
while [ $# -gt 0 ]; do
  case "$1" in
    --disk) disks+=("$2"); shift 2 ;;
    --console) console=$2; shift 2 ;;
    --serial-socket) serial=$2; shift 2 ;;
    --cmds) cmds=$2; shift 2 ;;
    --accel) accel=$2; shift 2 ;;
    --memory) memory=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "boot.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -f "$out/vmlinuz" ] || { echo "boot.sh: no guest in $out: run make vm-image" >&2; exit 1; }
# shellcheck source=lib.sh
. "$here/lib.sh"
[ "$accel" = auto ] && accel=$(probe_accel "$out")

args=(-nodefaults -no-reboot -display none -m "$memory" -accel "$accel"
      -kernel "$out/vmlinuz" -initrd "$out/initramfs.gz")
[ "$accel" = tcg ] && args+=(-cpu max)
append="console=ttyS0 quiet panic=-1"
[ -n "$cmds" ] && append="$append cdp.cmds=$cmds"
args+=(-append "$append")
if [ -n "$serial" ]; then
  args+=(-chardev "socket,id=s0,path=$serial,server=on,wait=off${console:+,logfile=$console}" -serial chardev:s0)
elif [ -n "$console" ]; then
  args+=(-serial "file:$console")
else
  args+=(-serial stdio)
fi
n=0
for d in "${disks[@]}"; do
  sock=${d%%:*} export=${d#*:}
  args+=(-blockdev "driver=nbd,node-name=d$n,server.type=unix,server.path=$sock,export=$export,reconnect-delay=10,open-timeout=10"
         -device "virtio-blk-pci,drive=d$n")
  n=$((n + 1))
done
exec qemu-system-x86_64 "${args[@]}"
