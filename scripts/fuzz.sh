#!/usr/bin/env bash
# Fuzzes every parser for a bounded time: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Each target (default: all of fuzz/fuzz_targets) runs SECONDS (default 60) under libFuzzer,
# one after another, over a copy of its seed corpus (fuzz/corpus/TARGET, so the checked-in
# corpus is never written) plus the inputs that once crashed it (fuzz/crashes/TARGET, as
# regressions). Prints runs, coverage and the verdict per target; exits 1 if any target crashed,
# with the artifact and the command that replays it.
#
# Runs on stable Rust: `--sanitizer none` needs no -Z flag. The libFuzzer instrumentation
# (sancov, trace-compares), debug assertions and overflow checks are all stable codegen flags.
# FUZZ_SANITIZER=address adds ASan, which needs -Zsanitizer, so it sets RUSTC_BOOTSTRAP=1.
#
# Needs cargo and a C++ compiler (libfuzzer-sys builds libFuzzer); as root on Debian it installs
# g++ when missing, and cargo-fuzz (crates.io, --locked) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=${1:-60}
shift || true
case $SECONDS_PER_TARGET in
'' | *[!0-9]*)
	echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
	exit 2
	;;
esac
SANITIZER=${FUZZ_SANITIZER:-none}
CARGO_FUZZ_VERSION=${CARGO_FUZZ_VERSION:-0.13.2}
CARGO=${CARGO:-cargo}
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if ! command -v c++ >/dev/null; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
		echo "fuzz: installing g++ (libfuzzer-sys compiles libFuzzer)"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
	else
		echo "fuzz: a C++ compiler is needed (apt-get install g++)" >&2
		exit 1
	fi
fi
if ! "$CARGO" fuzz --version >/dev/null 2>&1; then
	echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
	"$CARGO" install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

fuzz_flags=(--sanitizer "$SANITIZER")
if [ "$SANITIZER" != none ]; then
	export RUSTC_BOOTSTRAP=1
fi

if [ $# -gt 0 ]; then
	targets=("$@")
else
	mapfile -t targets < <("$CARGO" fuzz list)
fi

echo "fuzz: building the fuzz targets (sanitizer: $SANITIZER); will run: ${targets[*]}"
build_start=$(date +%s)
"$CARGO" fuzz build "${fuzz_flags[@]}"
echo "fuzz: built in $(($(date +%s) - build_start)) s; ${SECONDS_PER_TARGET} s per target"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failed=()
summary=()
for target in "${targets[@]}"; do
	corpus="$work/corpus/$target"
	mkdir -p "$corpus"
	if [ -d "fuzz/corpus/$target" ]; then
		cp -R "fuzz/corpus/$target/." "$corpus/"
	fi
	dirs=("$corpus")
	if [ -d "fuzz/crashes/$target" ]; then
		dirs+=("fuzz/crashes/$target")
	fi
	log="$work/$target.log"
	echo "fuzz: $target for ${SECONDS_PER_TARGET} s over $(find "${dirs[@]}" -type f | wc -l) inputs"
	status=0
	# -timeout: an input taking over 10 s is a hang, reported like a crash.
	"$CARGO" fuzz run "${fuzz_flags[@]}" "$target" "${dirs[@]}" -- \
		-max_total_time="$SECONDS_PER_TARGET" -timeout=10 -print_final_stats=1 \
		>"$log" 2>&1 || status=$?

	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
	[ -n "$runs" ] || runs=$(sed -n 's/^#\([0-9]*\).*/\1/p' "$log" | tail -1)
	stats=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' || true)
	rate=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE 'exec/s: [0-9]+' || true)
	if [ "$status" = 0 ]; then
		verdict=ok
	else
		artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
		verdict="CRASHED (exit $status)"
		failed+=("$target")
		echo "---- $target: what failed"
		{
			grep -A1 "panicked at" "$log" | head -4
			grep -E "^==[0-9]+== ERROR: libFuzzer|^SUMMARY: " "$log"
			grep -A2 "^MS: " "$log" | tail -2 | cut -c1-300
		} || true
		if [ -n "$artifact" ]; then
			echo "---- $target: crash input saved as $artifact; replay it with:"
			echo "     cargo fuzz run ${fuzz_flags[*]} $target $artifact"
			echo "     (keep it as a regression: mkdir -p fuzz/crashes/$target && cp $artifact fuzz/crashes/$target/)"
		fi
	fi
	line=$(printf '%-14s %-24s runs: %-11s %s %s' "$target" "$verdict" "${runs:-?}" "$rate" "$stats")
	summary+=("$line")
	echo "fuzz: $line"
done

echo
echo "fuzz summary (${SECONDS_PER_TARGET} s per target, sanitizer: $SANITIZER)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz: ${#failed[@]} target(s) crashed: ${failed[*]}" >&2
	exit 1
fi
echo "fuzz: ${#targets[@]} targets, 0 crashes"
