#!/usr/bin/env bash
# Freshness A/B: two settings, or two builds, compared at one appended rate.
# Runs alternate A B B A A B ..., each a single 20-s freshness run of the
# projection benchmark on a 20 000-event backlog (BENCH_FRESHNESS_RATE, so no
# search), and print one line each: append -> both p50/p90/p99, the
# acknowledgement's p50/p99 and the machine's CPU; then each side's median p99.
# On two shared cores the p99 of identical runs has varied threefold: compare
# medians of several runs, never two single runs. Asserts nothing.
#
#   ops/bench/freshness-ab.sh RATE RUNS 'A settings' 'B settings'
#   ops/bench/freshness-ab.sh 24000 4 '' 'WORLDLINE__PROJECTOR__BATCH_MAX_WAIT_MS=5'
#
# Settings are space-separated NAME=value pairs for the benchmark process
# (WORLDLINE__* configuration, librdkafka properties as
# WORLDLINE__KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS=5, ...).
# BENCH_A_BIN / BENCH_B_BIN: a bench_project binary per side, e.g. one built
# from another commit (default: this checkout's release build for both).
# BENCH_AB_LOGS: where each run's full output goes (default: a new temporary
# directory, printed).
set -euo pipefail

if (($# != 4)); then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
rate=$1 runs=$2
read -r -a settings_a <<<"$3"
read -r -a settings_b <<<"$4"

# shellcheck source=ops/bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cargo build --release --quiet -p worldline-tests --bin bench_project
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
bin_a=${BENCH_A_BIN:-$TARGET/release/bench_project}
bin_b=${BENCH_B_BIN:-$TARGET/release/bench_project}
logs=${BENCH_AB_LOGS:-$(mktemp -d -t freshness-ab.XXXXXX)}
mkdir -p "$logs"
printf 'freshness A/B at %s events/s, %s runs each; logs in %s\n' "$rate" "$runs" "$logs"

# The figure after `label` on the last line of `file` that has `pattern`.
figure() {
    local file=$1 pattern=$2 label=$3
    grep -E "$pattern" "$file" | tail -1 | sed -E "s/.* $label +([0-9.]+) ms.*/\1/"
}

run() {
    local side=$1 round=$2 bin settings log
    if [[ $side == A ]]; then
        bin=$bin_a settings=("${settings_a[@]}")
    else
        bin=$bin_b settings=("${settings_b[@]}")
    fi
    log=$logs/$side.$round.log
    env ${settings[@]+"${settings[@]}"} BENCH_ONLY=freshness BENCH_EVENTS=20000 \
        BENCH_FRESHNESS_RATE="$rate" BENCH_FRESHNESS_ROUNDS=1 BENCH_FRESHNESS_SECS=20 \
        "$bin" >"$log" 2>&1 || {
        printf '%s #%s failed; see %s\n' "$side" "$round" "$log" >&2
        return 1
    }
    local both='append start -> both \(judged\)' ack='append start -> acknowledged'
    local p99
    p99=$(figure "$log" "$both" p99)
    printf '%s\n' "$p99" >>"$logs/$side.p99"
    printf '%s #%-2s append -> both p50 %6s p90 %6s p99 %7s ms | acknowledged p50 %6s p99 %6s ms | %s\n' \
        "$side" "$round" "$(figure "$log" "$both" p50)" "$(figure "$log" "$both" p90)" "$p99" \
        "$(figure "$log" "$ack" p50)" "$(figure "$log" "$ack" p99)" \
        "$(grep -E 'CPU: machine' "$log" | tail -1 | sed -E 's/.*CPU: machine ([0-9]+% busy).*/machine \1/')"
}

rm -f "$logs/A.p99" "$logs/B.p99"
for ((round = 1; round <= runs; round++)); do
    if ((round % 2)); then order=(A B); else order=(B A); fi
    for side in "${order[@]}"; do
        run "$side" "$round"
    done
done

median() { sort -g "$1" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
printf 'median p99 (append -> both): A %s ms (%s), B %s ms (%s)\n' \
    "$(median "$logs/A.p99")" "$(paste -sd, "$logs/A.p99")" \
    "$(median "$logs/B.p99")" "$(paste -sd, "$logs/B.p99")"
