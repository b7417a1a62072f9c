#!/usr/bin/env bash
# Boots the test guest (built by build.sh) under qemu-system-x86_64 with its disks on NBD exports.
# The first disk is /dev/vda (the root disk, holding /cdp-guest), the second /dev/vdb (/data).
#
# Usage: vm-images/boot.sh DISK [DISK] [options]
#   DISK:  --nbd-socket SOCK --export NAME [--export NAME2]   (each --export uses the last socket)
#        | --nbd nbd+unix:///NAME?socket=SOCK | --nbd nbd://HOST[:PORT]/NAME
#        | --disk SOCK:NAME
#   --serial-log FILE      the guest's console, as a file (alias --console)
#   --serial-socket PATH   also a unix socket to type commands into (see lib.sh send_cmd)
#   --cmds 'gen 1;poweroff'  commands the guest runs after READY (cdp.cmds= on the kernel cmdline)
#   --pidfile FILE   --qmp PATH   --memory MIB (256)   --accel auto|kvm|tcg (auto)
#   --out OUTDIR (vm-images/out)
# Without --serial-log and --serial-socket the console is on stdio. QEMU runs in the foreground
# (exec): background this script and kill it to stop the VM. Disks attach with reconnect-delay=10,
# so the guest rides over an NBD server restart. --accel auto probes KVM once with a short boot
# (cached in OUTDIR/accel) and falls back to TCG.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
die() { echo "boot.sh: $*" >&2; exit 2; }
out=$here/out sock="" log="" serial="" cmds="" pidfile="" qmp="" memory=256 accel=auto
disks=() # "unix<TAB>PATH<TAB>NAME" or "inet<TAB>HOST<TAB>PORT<TAB>NAME"
T=$'\t'
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  [ "$1" = -h ] || [ "$1" = --help ] && { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; }
  need "$@"
  case "$1" in
    --nbd-socket) sock=$2 ;;
    --export) [ -n "$sock" ] || die "--export $2 comes before any --nbd-socket"; disks+=("unix$T$sock$T$2") ;;
    --disk) disks+=("unix$T${2%:*}$T${2##*:}") ;;
    --nbd)
      case "$2" in
        nbd+unix:///*\?socket=*) n=${2#nbd+unix:///}; disks+=("unix$T${2#*\?socket=}$T${n%%\?*}") ;;
        nbd://*/*) hp=${2#nbd://}; n=${hp#*/}; hp=${hp%%/*}
                   [ "$hp" = "${hp%:*}" ] && hp=$hp:10809; disks+=("inet$T${hp%:*}$T${hp##*:}$T$n") ;;
        *) die "unsupported NBD URI $2" ;;
      esac ;;
    --serial-log|--console) log=$2 ;;
    --serial-socket) serial=$2 ;;
    --cmds) cmds=$2 ;;
    --pidfile) pidfile=$2 ;;
    --qmp) qmp=$2 ;;
    --memory) memory=$2 ;;
    --accel) accel=$2 ;;
    --out) out=$2 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift 2
done
[ ${#disks[@]} -gt 0 ] || die "no disk given (see --help)"
case "$cmds" in *\"*) die "--cmds must not contain double quotes" ;; esac
[ -f "$out/initramfs.gz" ] || die "no $out/initramfs.gz: run vm-images/build.sh"
# shellcheck source=lib.sh
. "$here/lib.sh"
kernel=$(guest_kernel "$out") || exit 2
case "$accel" in
  auto) accel=$(probe_accel "$out") ;;
  kvm|tcg) ;;
  *) die "--accel must be auto, kvm or tcg" ;;
esac

q() { printf %s "${1//,/,,}"; } # QEMU option values escape commas by doubling them
args=(-nodefaults -no-reboot -display none -m "$memory" -accel "$accel"
      -kernel "$kernel" -initrd "$out/initramfs.gz")
[ "$accel" = kvm ] && args+=(-cpu host) # under TCG, -cpu max measured no faster than the default
append="console=ttyS0 quiet panic=-1 no_timer_check"
[ -n "$cmds" ] && append+=" cdp.cmds=\"$cmds\""
args+=(-append "$append")
if [ -n "$serial" ]; then
  args+=(-chardev "socket,id=s0,path=$(q "$serial"),server=on,wait=off${log:+,logfile=$(q "$log")}" -serial chardev:s0)
elif [ -n "$log" ]; then
  args+=(-serial "file:$log")
else
  args+=(-serial stdio)
fi
[ -n "$pidfile" ] && args+=(-pidfile "$pidfile")
[ -n "$qmp" ] && args+=(-qmp "unix:$(q "$qmp"),server=on,wait=off")
n=0
for d in "${disks[@]}"; do
  IFS=$T read -r type a b c <<<"$d"
  if [ "$type" = unix ]; then
    server="server.type=unix,server.path=$(q "$a"),export=$(q "$b")"
  else
    server="server.type=inet,server.host=$(q "$a"),server.port=$b,export=$(q "$c")"
  fi
  args+=(-blockdev "driver=nbd,node-name=d$n,$server,reconnect-delay=10,open-timeout=10"
         -device "virtio-blk-pci,drive=d$n")
  n=$((n + 1))
done
echo "boot.sh: qemu-system-x86_64 ${args[*]}" >&2
exec qemu-system-x86_64 "${args[@]}"
