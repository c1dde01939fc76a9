#!/usr/bin/env bash
# Replay benchmark (issue 6): appends a mixed workload of 1M and then 10M events,
# measures raw PostgreSQL binary COPY on the same server, then times rebuilding
# every read model from offset zero (each projector alone, then all together),
# and the Avro archive's export and import rates. Prints figures and whether 10M
# events were rebuilt within 60 s; asserts nothing. Databases, topics and the
# archive are dropped at the end, failed or not.
#
#   ops/bench/replay.sh
#
# Sizes (environment, optional):
#   BENCH_EVENTS_LIST=1000000,10000000   backlog sizes, one after the other
#   BENCH_WORLDS=1000                    worlds the events are spread over
#   BENCH_PARTITIONS=8                   partitions per event topic
#   BENCH_ALONE=1                        0: skip the projector-by-projector rebuilds
#   BENCH_PROJECTORS=worlds,clock,...    only these projectors (default all)
#   BENCH_ARCHIVE=first                  archive rates on the first size (all, none)
#   BENCH_COPY_ROWS=1000000              rows in the raw COPY
#   BENCH_DIR=/tmp                       where the archive is written (removed at the end)
# Connection settings come from WORLDLINE__* variables or .worldline/env.
set -euo pipefail

# shellcheck source=ops/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# 10M events take a few GB of log and twice the read models; the benchmark
# refuses to start without room (and says how much it needs).
df -h "$ROOT" /tmp

# Release build: a debug build would measure the compiler, not the rebuild.
cargo build --release --quiet -p worldline-tests --bin bench_replay

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
exec "$TARGET/release/bench_replay"
