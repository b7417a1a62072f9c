#!/usr/bin/env bash
# Installs the Debian packages the demo, the tests and the benchmarks use, when any is missing,
# and the one PyPI package the tests use (prometheus-client).
# Idempotent and quiet when everything is already there. Needs root (or sudo) for apt-get.
set -euo pipefail

# Program -> Debian package that provides it.
declare -A want=(
  [qemu-system-x86_64]=qemu-system-x86
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [qemu-nbd]=qemu-utils
  # Shipped by qemu-system-common, which qemu-system-x86 pulls in at its own version.
  [qemu-storage-daemon]=qemu-system-x86
  [nbdkit]=nbdkit
  [nbdinfo]=libnbd-bin
  [nbdcopy]=libnbd-bin
  [fio]=fio
  [mkfs.ext4]=e2fsprogs
  [debugfs]=e2fsprogs
  [cpio]=cpio
  [ip]=iproute2
  [iptables]=iptables
  # scripts/nbd-tester.sh builds the reference implementation's test client from source.
  [curl]=curl
  [xz]=xz-utils
  [cc]=gcc
  [make]=make
  [pkg-config]=pkg-config
)
missing=()
for prog in "${!want[@]}"; do
  command -v "$prog" >/dev/null 2>&1 || missing+=("${want[$prog]}")
done
[ -x /bin/busybox ] || missing+=(busybox-static)
python3_nbd() { /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; }
python3_nbd || missing+=(python3-libnbd)
pkg-config --exists glib-2.0 2>/dev/null || missing+=(libglib2.0-dev)
# scripts/seaweedfs.sh installs the S3 server of the tests into a venv: Debian's python3 has
# no ensurepip (so no venv) without python3-venv.
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)

# QEMU's system emulator and its utilities must come from the same release: Debian 12 ships
# qemu-system-x86 7.2, and a newer qemu-utils (from backports) would otherwise stay installed
# beside it. Check the versions even when every program exists.
qemu_ver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
if [ -n "$(qemu_ver qemu-system-x86)" ] && [ "$(qemu_ver qemu-system-x86)" != "$(qemu_ver qemu-utils)" ]; then
  missing+=(qemu-utils)
fi

# Python packages from PyPI, for the python3 first on PATH (the one the tests run): the
# metrics tests parse /metrics with the Prometheus project's own parser (prometheus-client).
command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
install_pypi() {
  python3 -c 'import prometheus_client' >/dev/null 2>&1 && return 0
  echo "setup: installing prometheus-client from PyPI"
  # Debian's own python3 refuses pip installs outside a venv (PEP 668) unless told otherwise.
  python3 -m pip install -q prometheus-client 2>/dev/null ||
    python3 -m pip install -q --break-system-packages prometheus-client
}

if [ ${#missing[@]} -eq 0 ]; then
  install_pypi
  exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "setup: installing Debian packages: ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1; }
  sudo=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
pkgs=()
for p in "${missing[@]}"; do
  case "$p" in
    qemu-system-x86|qemu-utils) ;;
    *) pkgs+=("$p") ;;
  esac
done
if printf '%s\n' "${missing[@]}" | grep -qE '^qemu-(system-x86|utils)$'; then
  # Pin both to the candidate of qemu-system-x86 so they match (this may downgrade qemu-utils).
  v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  pkgs+=("qemu-system-x86=$v" "qemu-utils=$v")
fi
$sudo apt-get install -y -qq --allow-downgrades --no-install-recommends "${pkgs[@]}"
install_pypi
echo "setup: done"
