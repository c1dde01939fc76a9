#!/usr/bin/env bash
# Projection benchmark (issue 4): raw PostgreSQL limits, projection throughput per
# read model and for the mixed workload, end-to-end freshness at half load, and
# the projector's resident memory, all measured in one run on the local stack.
# Prints figures and a PASS/MISS table against the issue's goals; asserts nothing.
#
#   ops/bench/project.sh
#
# Sizes (environment, optional):
#   BENCH_EVENTS=200000        events per family, and in the mixed backlog
#   BENCH_WORLDS=1000          worlds the events are spread over
#   BENCH_BATCH_SIZES=2000,500,5000
#                              batch_max_records values; the first is judged
#                              (default: the configured value, a quarter of it, 2.5x it)
#   BENCH_FRESHNESS_SECS=20    length of the steady-rate freshness run
# Connection settings come from WORLDLINE__* variables or .worldline/env.
set -euo pipefail

# shellcheck source=ops/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Release builds: debug builds would measure the compiler, not the design.
cargo build --release --quiet -p worldline --bin worldline
cargo build --release --quiet -p worldline-tests --bin bench_project

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
export BENCH_WORLDLINE_BIN=${BENCH_WORLDLINE_BIN:-$TARGET/release/worldline}
exec "$TARGET/release/bench_project"
