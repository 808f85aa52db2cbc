#!/usr/bin/env bash
# Coverage-guided fuzzing of farm's parsers (cargo-fuzz, libFuzzer, nightly): each target of
# `farm::fuzz` for FARM_FUZZ_RUNS inputs (1,000,000 unless set), or only the targets named.
# The limits are `tests/fuzz.rs`'s: an input slower than 1 s or a single allocation over
# 64 MiB is a finding, as is a panic. Findings land in fuzz/artifacts/parsers/ and fail the
# script; libFuzzer's whole log is fuzz/logs/TARGET.log; the corpus it grows is kept in
# fuzz/corpus/TARGET/ for the next run.
#
#   ./scripts/fuzz.sh                    # every target
#   ./scripts/fuzz.sh qcow2_header       # one
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${FARM_FUZZ_RUNS:-1000000}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
targets=${*:-$(cargo run -q --example fuzz_seeds -- --list)}
max_len=$(cargo run -q --example fuzz_seeds -- --max-len)
mkdir -p fuzz/logs
failed=()
for target in $targets; do
    corpus=fuzz/corpus/$target
    dict=fuzz/dict/$target.dict
    log=fuzz/logs/$target.log
    cargo run -q --example fuzz_seeds -- "$target" "$corpus" "$dict"
    started=$(date +%s)
    if FARM_FUZZ_TARGET=$target cargo +nightly fuzz run parsers "$corpus" -- \
        -runs="$runs" -max_len="$max_len" -dict="$dict" -timeout=1 \
        -malloc_limit_mb=64 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        outcome=ok
    else
        outcome=FINDING
        failed+=("$target")
    fi
    stats=$(grep -E '^stat::(number_of_executed_units|peak_rss_mb|new_units_added)' "$log" |
        sed 's/^stat::\([a-z_]*\): *\([0-9]*\)/\1=\2/' | tr '\n' ' ')
    cover=$(grep -oE 'cov: [0-9]+' "$log" | tail -1)
    echo "$target: $outcome in $(($(date +%s) - started)) s; $stats$cover"
done
if ((${#failed[@]})); then
    echo "findings in: ${failed[*]} (see fuzz/logs/ and fuzz/artifacts/parsers/)" >&2
    exit 1
fi
