#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets of fuzz/ (docs/fuzzing.md) on stable Rust.
#
#   scripts/fuzz.sh [--seconds N] [--no-build] [--log-dir DIR] [TARGET…]
#
# Installs cargo-fuzz when missing (cargo install --locked, into ~/.cargo/bin), builds every
# target instrumented (libFuzzer, `--sanitizer none`: AddressSanitizer needs nightly, and our
# code has no `unsafe` of its own to check; debug assertions on, so overflows panic), then runs
# each target (all, or those named) for N seconds (default 60) and prints per target the
# executions, coverage and whether a crash was found. New inputs go to fuzz/work/<target>
# (not committed), seeded from fuzz/corpus/<target>; logs to fuzz/work/<target>.log (or DIR).
# Exits non-zero when a target crashed, naming the crash file and how to reproduce it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=60
build=1
log_dir=
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --seconds=*) seconds=${1#--seconds=}; shift ;;
    --no-build) build=0; shift ;;
    --log-dir) log_dir=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
case "$seconds" in ''|*[!0-9]*) echo "fuzz.sh: --seconds wants a number" >&2; exit 2 ;; esac

all=()
for f in fuzz/fuzz_targets/*.rs; do all+=("$(basename "$f" .rs)"); done
if [ ${#targets[@]} -eq 0 ]; then targets=("${all[@]}"); fi
for t in "${targets[@]}"; do
  if [ ! -f "fuzz/fuzz_targets/$t.rs" ]; then
    echo "fuzz.sh: no target $t (targets: ${all[*]})" >&2
    exit 2
  fi
done

# The version scripts and docs were checked with; any later 0.13 works the same.
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
  cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

# The fuzz crate has its own target dir (fuzz/target): instrumented artifacts never mix with
# the ordinary build's.
unset CARGO_TARGET_DIR
flags=(--sanitizer none --debug-assertions --release)
if [ "$build" = 1 ]; then
  # All targets in one cargo invocation: they share every instrumented dependency.
  (cd fuzz && cargo fuzz build "${flags[@]}")
fi
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=$root/fuzz/target/$triple/release

crashed=0
printf '%-10s %8s %12s %8s %8s  %s\n' target seconds executions cov corpus result
for t in "${targets[@]}"; do
  work=$root/fuzz/work/$t
  artifacts=$root/fuzz/artifacts/$t/
  log=${log_dir:-$root/fuzz/work}/$t.log
  mkdir -p "$work" "$artifacts" "$(dirname "$log")"
  rc=0
  "$bin_dir/$t" "$work" "$root/fuzz/corpus/$t" \
    -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
  corpus=$(find "$work" -type f | wc -l)
  crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
  if [ "$rc" -ne 0 ] || [ -n "$crash" ]; then
    crashed=1
    printf '%-10s %8s %12s %8s %8s  %s\n' "$t" "$seconds" "${execs:-?}" "${cov:-?}" "$corpus" "CRASH"
    echo "  input: ${crash:-see $log}" >&2
    echo "  reproduce: $bin_dir/$t ${crash:-<input>}" >&2
    echo "         or: (cd fuzz && cargo fuzz run ${flags[*]} $t ${crash:-<input>})" >&2
    grep -m 3 -E "panicked at|ERROR:" "$log" | sed 's/^/  /' >&2 || true
  else
    printf '%-10s %8s %12s %8s %8s  %s\n' "$t" "$seconds" "${execs:-?}" "${cov:-?}" "$corpus" "ok"
  fi
done
exit "$crashed"
