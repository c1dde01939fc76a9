#!/usr/bin/env bash
# Append benchmark (issue 3): the appender's throughput per event family at
# realistic sizes, beside Kafka's own ProducerPerformance against the same
# broker, with the same record size, acks, idempotence, compression and linger,
# in the same run. Prints events/s, MB/s, encoded bytes per event and the ratio
# for each family, and the encoded size of a clock tick a year into a world.
# Asserts nothing.
#
#   ops/bench/append.sh
#
# Sizes (environment, optional):
#   BENCH_EVENTS=200000   events per family
#   BENCH_WORLDS=1000     worlds the events are spread over
#   BENCH_CHUNK=5000      events per append_batch call
#   BENCH_IN_FLIGHT=8     append_batch calls awaiting acknowledgement at once
# Connection settings come from WORLDLINE__* variables or .worldline/env; Kafka's
# jars (for ProducerPerformance) from WORLDLINE_KAFKA_LIBS, written there too.
set -euo pipefail

# shellcheck source=ops/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ -n ${WORLDLINE_KAFKA_LIBS:-} && -d ${WORLDLINE_KAFKA_LIBS:-} ]] || {
    printf 'bench: error: WORLDLINE_KAFKA_LIBS does not name the Kafka jar directory\n' >&2
    exit 1
}

# Release build: a debug build would measure the compiler, not the append path.
cargo build --release --quiet -p worldline-tests --bin bench_append

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
exec "$TARGET/release/bench_append"
