#!/usr/bin/env bash
# Archive benchmark (issue 6): appends a mixed workload to a fresh topic prefix,
# then times `archive export` (every topic to Avro object container files, zstd)
# and `archive import` (into a second fresh prefix), and prints records/s, MB/s,
# file sizes and the compression ratio. Asserts nothing.
#
#   ops/bench/archive.sh
#
# Sizes (environment, optional):
#   BENCH_EVENTS=1000000   mixed events in the backlog
#   BENCH_WORLDS=1000      worlds the events are spread over
#   BENCH_PARTITIONS=8     partitions per event topic
#   BENCH_DIR=/tmp         where the archive is written (removed at the end)
# Connection settings come from WORLDLINE__* variables or .worldline/env.
set -euo pipefail

# shellcheck source=ops/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Release build: a debug build would measure the compiler, not the archive.
cargo build --release --quiet -p worldline-tests --bin bench_archive

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
exec "$TARGET/release/bench_archive"
