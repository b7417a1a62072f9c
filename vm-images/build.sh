#!/usr/bin/env bash
# Builds the test guest from Debian packages only, without touching the host's /boot:
#   OUT/vmlinuz        Debian's 6.1 kernel (apt-get download + dpkg -x)
#   OUT/initramfs.gz   busybox-static, the virtio/ext4 modules, and guest/init
#   OUT/disk.img       64 MiB raw ext4 root disk holding guest/cdp-guest (mkfs.ext4 -d)
#   OUT/data.img       32 MiB raw ext4 data disk with a marker file
# Cached: does nothing when the outputs are newer than this script and the guest files.
# Usage: vm-images/build.sh [OUT]   (default: vm-images/out)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/out}
mkdir -p "$out"
out=$(cd "$out" && pwd)

stamp=$out/.built
if [ -f "$stamp" ] && [ -z "$(find "$here/build.sh" "$here/guest" -newer "$stamp" 2>/dev/null)" ]; then
  echo "vm-image: up to date in $out"
  exit 0
fi
for p in mkfs.ext4 cpio gzip dpkg apt-get; do
  command -v "$p" >/dev/null || { echo "vm-image: $p is missing (run make setup)" >&2; exit 1; }
done
[ -x /bin/busybox ] || { echo "vm-image: /bin/busybox is missing (apt-get install busybox-static)" >&2; exit 1; }

work=$(mktemp -d)
chmod 0755 "$work"
trap 'rm -rf "$work"' EXIT
echo "vm-image: building in $out"

# The kernel: the versioned package that linux-image-amd64 depends on.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$kpkg" ] || { echo "vm-image: cannot find the Debian kernel package" >&2; exit 1; }
echo "vm-image: kernel package $kpkg"
mkdir -m 0777 "$work/deb" # apt-get download runs as the _apt user where it can
(cd "$work/deb" && apt-get download -q "$kpkg" >/dev/null)
dpkg -x "$work"/deb/"$kpkg"_*.deb "$work/kernel"
kver=${kpkg#linux-image-}
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"

# The initramfs: busybox, the modules a virtio disk with ext4 needs, and /init.
root=$work/initramfs
mkdir -p "$root"/{bin,dev,proc,sys,mnt,data,lib/modules}
cp /bin/busybox "$root/bin/busybox"
cp "$here/guest/init" "$root/init"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
         crc16 crc32c_generic mbcache jbd2 ext4; do
  f=$(find "$work/kernel/lib/modules/$kver" -name "$m.ko*" | head -n 1)
  [ -n "$f" ] || { echo "vm-image: module $m not in $kpkg" >&2; exit 1; }
  case "$f" in
    *.ko.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
done
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.gz.tmp"

# The disks, populated without mounting.
disk=$work/disk
mkdir -p "$disk"
cp "$here/guest/cdp-guest" "$disk/cdp-guest"
rm -f "$out/disk.img.tmp" "$out/data.img.tmp"
mkfs.ext4 -q -F -L cdp-root -d "$disk" "$out/disk.img.tmp" 64M >/dev/null
data=$work/data
mkdir -p "$data"
echo "cdp test data disk" > "$data/MARKER"
mkfs.ext4 -q -F -L cdp-data -d "$data" "$out/data.img.tmp" 32M >/dev/null

for f in vmlinuz initramfs.gz disk.img data.img; do mv "$out/$f.tmp" "$out/$f"; done
echo "$kpkg" > "$out/kernel-package"
touch "$stamp"
echo "vm-image: done ($(du -sh "$out" | cut -f1))"
