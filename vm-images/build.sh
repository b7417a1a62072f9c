#!/usr/bin/env bash
# Builds the test guest from Debian packages, without installing anything or touching /boot:
#   OUTDIR/vmlinuz        Debian's linux-image-6.1.*-amd64 kernel (apt-get download + dpkg -x)
#   OUTDIR/vmlinux        the same kernel uncompressed (ELF): boot.sh boots it through its PVH
#                         entry, which spares the guest ~3 s of xz decompression under TCG
#   OUTDIR/initramfs.gz   newc cpio: busybox-static, the virtio-blk + ext4 modules, guest/init
#   OUTDIR/disk.img       64 MiB raw ext4 root disk holding guest/cdp-guest (mkfs.ext4 -d)
#   OUTDIR/data.img       32 MiB raw ext4 data disk holding a MARKER file
# Cached: does nothing when the outputs exist and are newer than this script, guest/ and busybox.
# Usage: vm-images/build.sh [OUTDIR]      (default: vm-images/out)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
say() { echo "vm-images: $*"; }
die() { echo "vm-images: ERROR: $*" >&2; exit 1; }
start=$SECONDS

outputs=(vmlinuz vmlinux initramfs.gz disk.img data.img)
inputs=("$here/build.sh" "$here/guest" /bin/busybox)
stamp=$out/.built
fresh=yes
for f in "${outputs[@]}"; do [ -f "$out/$f" ] || fresh=no; done
[ -f "$stamp" ] || fresh=no
if [ $fresh = yes ] && [ -z "$(find "${inputs[@]}" -newer "$stamp" | head -n 1)" ]; then
  say "up to date in $out ($(cat "$out/kernel-package" 2>/dev/null)); nothing to do"
  exit 0
fi

for p in apt-get apt-cache dpkg mkfs.ext4 cpio gzip xz find; do
  command -v "$p" >/dev/null || die "$p is missing"
done
[ -x /bin/busybox ] || die "/bin/busybox missing (apt-get install busybox-static)"

work=$(mktemp -d /tmp/vm-images.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
say "building in $out (scratch $work)"

# The kernel: the versioned package linux-image-amd64 depends on.
kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
kpkg=$(kernel_pkg)
if [ -z "$kpkg" ]; then
  say "no apt lists for linux-image-amd64: running apt-get update once"
  apt-get update -qq || die "apt-get update failed"
  kpkg=$(kernel_pkg)
fi
case "$kpkg" in
  linux-image-6.1.*-amd64) ;;
  *) die "linux-image-amd64 depends on '${kpkg:-nothing}', expected linux-image-6.1.*-amd64" ;;
esac
kver=${kpkg#linux-image-}
say "kernel package $kpkg: apt-get download"
mkdir -m 0777 "$work/deb" # apt-get download writes into the cwd, as the _apt user
(cd "$work/deb" && apt-get download -q "$kpkg" >/dev/null) || die "apt-get download $kpkg failed"
deb=$(ls "$work"/deb/"$kpkg"_*.deb)
dpkg -x "$deb" "$work/kernel"
modules=$work/kernel/lib/modules/$kver
[ -f "$work/kernel/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $deb"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
xz_at=$(LC_ALL=C grep -m1 -obUaP '\xfd7zXZ\x00' "$out/vmlinuz.tmp" | awk -F: 'NR == 1 {print $1}')
[ -n "$xz_at" ] && xz -dc --single-stream < <(tail -c "+$((xz_at + 1))" "$out/vmlinuz.tmp") > "$out/vmlinux.tmp" \
  && [ "$(head -c 4 "$out/vmlinux.tmp")" = $'\x7fELF' ] || die "cannot unpack the xz-compressed vmlinux from vmlinuz-$kver"

# The initramfs. Module load order (they have no modules.dep) is the one guest/init uses.
say "initramfs: busybox, virtio-blk + ext4 modules, guest/init"
root=$work/initramfs
mkdir -p "$root"/{bin,dev,proc,sys,mnt,data,tmp,lib/modules}
cp /bin/busybox "$root/bin/busybox"
install -m 0755 "$here/guest/init" "$root/init"
mknod -m 0600 "$root/dev/console" c 5 1
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
         crc16 crc32c_generic mbcache jbd2 ext4; do
  f=$(find "$modules/kernel" -name "$m.ko*" | head -n 1)
  case "$f" in
    "") die "module $m is not in $kpkg" ;;
    *.ko.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
    *.ko) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
done
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -9) > "$out/initramfs.gz.tmp"

# The disks, populated without mounting; inode tables and journal zeroed now, so the guest's
# kernel starts no lazy-init writes of its own in the background.
say "disk.img (64 MiB) and data.img (32 MiB): mkfs.ext4 -d"
mkfs() { # DIR IMAGE SIZE LABEL
  rm -f "$2"
  mkfs.ext4 -q -F -L "$4" -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 -d "$1" "$2" "$3" >/dev/null \
    || die "mkfs.ext4 $2 failed"
}
mkdir -p "$work/disk" "$work/data"
install -m 0755 "$here/guest/cdp-guest" "$work/disk/cdp-guest"
echo "cdp test data disk" > "$work/data/MARKER"
mkfs "$work/disk" "$out/disk.img.tmp" 64M cdp-root
mkfs "$work/data" "$out/data.img.tmp" 32M cdp-data

for f in "${outputs[@]}"; do mv "$out/$f.tmp" "$out/$f"; done
echo "$kpkg" > "$out/kernel-package"
touch "$stamp"
say "done in $((SECONDS - start)) s: $(cd "$out" && du -h --apparent-size "${outputs[@]}" | awk '{printf " %s %s", $2, $1}')"
