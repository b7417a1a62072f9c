#!/usr/bin/env bash
# Builds nbd-tester-client, the reference NBD implementation's own test client, from Debian's
# source tarball of nbd into target/nbd-tester/ (with the trace files its integrity tests
# replay, and nbd-client, whose `-l` its list test uses). Nothing of it is committed: tests/tests/nbd_tester.rs runs the binary built here.
# Idempotent: does nothing when the binary is already there. Needs a C compiler, make,
# pkg-config and libglib2.0-dev (scripts/setup.sh installs them).
set -euo pipefail

version=3.26.1
sha256=f0cf509fa5b20b1a07f7904eb637e9b47d3e30b6ed6f00075af5d8b701c78fef
url="http://deb.debian.org/debian/pool/main/n/nbd/nbd_${version}.orig.tar.xz"

root=$(cd "$(dirname "$0")/.." && pwd)
out="${CARGO_TARGET_DIR:-$root/target}/nbd-tester"
bin="$out/nbd-tester-client"
if [ -x "$bin" ] && [ -x "$out/nbd-client" ] && [ -f "$out/integrityhuge-test.tr" ]; then
  exit 0
fi
mkdir -p "$out"

tarball="$out/nbd_${version}.orig.tar.xz"
verified() { echo "$sha256  $1" | sha256sum --check --quiet --status; }
if ! { [ -f "$tarball" ] && verified "$tarball"; }; then
  echo "nbd-tester: downloading $url"
  curl --fail --silent --show-error --location --retry 3 -o "$tarball.part" "$url"
  if ! verified "$tarball.part"; then
    echo "nbd-tester: $url does not have sha256 $sha256" >&2
    rm -f "$tarball.part"
    exit 1
  fi
  mv "$tarball.part" "$tarball"
fi

src="$out/nbd-$version"
rm -rf "$src"
tar -xJf "$tarball" -C "$out"
echo "nbd-tester: building nbd-tester-client and nbd-client (log: $out/build.log)"
# Only the two clients are built, so neither bison (the tarball ships the generated parser) nor
# docbook2man (man pages) runs; configure insists on both, and these two variables answer it.
if ! (
  cd "$src" &&
    ./configure --without-gnutls --without-libnl ax_cv_prog_bison=yes DB2M=true &&
    make -C tests/run nbd-tester-client &&
    make nbd-client
) >"$out/build.log" 2>&1; then
  tail -n 30 "$out/build.log" >&2
  echo "nbd-tester: the build failed; see $out/build.log" >&2
  exit 1
fi
cp "$src/tests/run/integrity-test.tr" "$src/tests/run/integrityhuge-test.tr" "$out/"
cp "$src/nbd-client" "$out/"
# The binary last: its presence means the whole build is there.
cp "$src/tests/run/nbd-tester-client" "$bin.part"
mv "$bin.part" "$bin"
rm -rf "$src"
echo "nbd-tester: built $bin"
