#!/usr/bin/env bash
# The README's test command and CI's (`.ci/run`): installs what farm and its tests need
# (`scripts/setup.sh`), checks the test store kept from earlier runs on this machine, runs
# every test with cargo-nextest (`.config/nextest.toml`), and ends with what the run cost:
# the slowest tests, the skipped ones, and the time of each phase.
#
# Arguments go to `cargo nextest run` (a filter, `--no-capture`, …).
# Environment: FARM_TEST_HOME (default /var/tmp/farm-tests) holds the kept test store, image
# fixtures and labs (tests/it/support/test_home.rs), and cargo's build directory
# (CARGO_TARGET_DIR, default $FARM_TEST_HOME/target: a clean clone on a machine that ran the
# tests before compiles only what changed); FARM_TEST_STORE_CAP_GIB (default 60) and
# FARM_TEST_TARGET_CAP_GIB (default 20): a kept store or build directory larger than this is
# emptied first, so a machine's disk is never filled by them.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
./scripts/setup.sh
setup_done=$(date +%s)

home=${FARM_TEST_HOME:-/var/tmp/farm-tests}
store=${FARM_TEST_STORE:-$home/store}
cap_gib=${FARM_TEST_STORE_CAP_GIB:-60}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$home/target}
target_cap_gib=${FARM_TEST_TARGET_CAP_GIB:-20}
export FARM_TEST_SKIPS=$PWD/target/skipped-tests
# Each test's CPU seconds, with the qemus it started (scripts/test-cpu-runner).
export FARM_TEST_CPU_LOG=$PWD/target/test-cpu
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/scripts/test-cpu-runner
# Empty cgroups an earlier run's runner could not remove (a qemu still ran in them).
rmdir /sys/fs/cgroup/cpuacct/farm-tests/*/ 2>/dev/null || true
mkdir -p target
rm -f "$FARM_TEST_SKIPS" "$FARM_TEST_CPU_LOG"

# Build first, so the store check below runs this tree's farm. Cargo's fingerprints decide
# what of a kept build directory is reused; old builds pile up in it, hence the cap.
if [ -d "$CARGO_TARGET_DIR" ] &&
  [ $(( $(du -sk "$CARGO_TARGET_DIR" | cut -f1) / 1024 / 1024 )) -gt "$target_cap_gib" ]; then
  echo "test: the kept build directory $CARGO_TARGET_DIR is over ${target_cap_gib} GiB; starting it empty" >&2
  rm -rf --one-file-system "$CARGO_TARGET_DIR"
fi
cargo nextest run --no-run >/dev/null 2>target/test-build.log || {
  cat target/test-build.log >&2
  exit 1
}
built=$(date +%s)

# What the tests keep (not the build directory, which holds this run's binaries).
empty_test_home() {
  rm -rf --one-file-system "$store" "$home/fixtures" "$home/labs" "$home/keys"
}

# The kept store: only content-addressed entries are trusted from an earlier run, and only
# after their hashes are checked; damaged ones are moved aside (the tests build them again).
# Build-step checkpoints are not hashed by `verify`, so they do not outlive a run.
if [ -d "$store/store" ]; then
  size_gib=$(( $(du -sk "$store" | cut -f1) / 1024 / 1024 ))
  if [ "$size_gib" -gt "$cap_gib" ]; then
    echo "test: the kept test store $store is ${size_gib} GiB (cap ${cap_gib} GiB); starting it empty" >&2
    empty_test_home
  else
    rm -rf --one-file-system "$store/steps"
    echo "test: verifying the kept test store $store (${size_gib} GiB)" >&2
    "$CARGO_TARGET_DIR/debug/farm" store verify --repair --store "$store" >target/test-store-verify.log 2>&1 || {
      tail -n 20 target/test-store-verify.log >&2
      echo "test: the kept test store could not be repaired; starting it empty" >&2
      empty_test_home
    }
  fi
fi
verified=$(date +%s)

status=0
cargo nextest run "$@" || status=$?
finished=$(date +%s)

python3 scripts/test-report.py target/nextest/default/junit.xml \
  --skips "$FARM_TEST_SKIPS" \
  --cpu "$FARM_TEST_CPU_LOG" \
  --phase "setup=$((setup_done - started))" \
  --phase "build=$((built - setup_done))" \
  --phase "store check=$((verified - built))" \
  --phase "tests=$((finished - verified))" \
  --phase "total=$((finished - started))" || true
exit "$status"
