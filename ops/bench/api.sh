#!/usr/bin/env bash
# Query API benchmark: point lookups through `worldline serve` (HTTP, bearer
# auth, the read-only pool) with wrk, beside `pgbench -S` (PostgreSQL's own
# primary-key lookup rate over TCP) on the same server, same client count and
# duration, in the same run. Prints requests/s and latency percentiles of both,
# the ratio, and PASS/MISS against the goal (API >= 0.35x pgbench's rate with
# API p99 <= 5 ms). Asserts nothing.
#
#   ops/bench/api.sh
#
# The read models are filled through the real pipeline in a fresh database and
# topic prefix (both dropped at the end, failed or not): `worldline topics
# create`, `migrate`, `produce clock --ticks`, `simulate --events`, then
# `worldline project` until every projector's stored offsets reach the log ends.
#
# Knobs (environment, optional):
#   BENCH_WORLDS=1000          worlds (clock rows) the lookups pick from at random
#   BENCH_TICKS=5              clock ticks per world
#   BENCH_EVENTS=20000         simulated story/inference events over those worlds
#   BENCH_ROUTE=/v1/worlds/{world}/clock
#                              the looked-up route; {world} is replaced
#   BENCH_CONNECTIONS=16       concurrent connections (wrk -c, pgbench -c)
#   BENCH_THREADS=2            client threads (wrk -t, pgbench -j)
#   BENCH_DURATION=15          seconds measured per side and round
#   BENCH_WARMUP=3             seconds of unmeasured load per side first
#   BENCH_ROUNDS=1             pgbench/API pairs; the summary takes the medians
#   BENCH_PGBENCH_SCALE=10     pgbench -i -s (100 000 accounts per unit)
#   BENCH_PGBENCH_MODE=prepared
#                              pgbench -M (the API's driver prepares its statements)
#   BENCH_CATCHUP_SECS=300     longest wait for the projectors
#   BENCH_CHILD_ENV="K=V;K=V"  extra environment for `worldline serve`, e.g.
#                              WORLDLINE__DATABASE__READER_CONNECTIONS=16
#   BENCH_KEEP=1               keep the databases and topics for inspection
#   BENCH_WORLDLINE_BIN        measure this (release) binary instead of building
#                              one into $CARGO_TARGET_DIR (default: the repo's target)
# Connection settings come from WORLDLINE__* variables or .worldline/env; Kafka's
# jars (for the log ends and deleting topics) from WORLDLINE_KAFKA_LIBS.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

say() { printf '%s\n' "$*"; }
die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}

WORLDS=${BENCH_WORLDS:-1000}
TICKS=${BENCH_TICKS:-5}
EVENTS=${BENCH_EVENTS:-20000}
ROUTE=${BENCH_ROUTE:-'/v1/worlds/{world}/clock'}
CONNECTIONS=${BENCH_CONNECTIONS:-16}
THREADS=${BENCH_THREADS:-2}
DURATION=${BENCH_DURATION:-15}
WARMUP=${BENCH_WARMUP:-3}
ROUNDS=${BENCH_ROUNDS:-1}
PG_SCALE=${BENCH_PGBENCH_SCALE:-10}
PG_MODE=${BENCH_PGBENCH_MODE:-prepared}
CATCHUP_SECS=${BENCH_CATCHUP_SECS:-300}
KEEP=${BENCH_KEEP:-}
GOAL_RATIO=0.35
GOAL_P99_MS=5

for knob in WORLDS TICKS EVENTS CONNECTIONS THREADS DURATION WARMUP ROUNDS PG_SCALE CATCHUP_SECS; do
    [[ ${!knob} =~ ^[0-9]+$ ]] || die "BENCH_$knob must be a whole number, not '${!knob}'"
done
((WORLDS > 0 && TICKS > 0 && CONNECTIONS > 0 && THREADS > 0 && DURATION > 0 && ROUNDS > 0 && PG_SCALE > 0)) ||
    die "BENCH_WORLDS, _TICKS, _CONNECTIONS, _THREADS, _DURATION, _ROUNDS and _PGBENCH_SCALE must be positive"
((THREADS <= CONNECTIONS)) || die "BENCH_THREADS ($THREADS) must not exceed BENCH_CONNECTIONS ($CONNECTIONS)"
[[ $ROUTE == /* && $ROUTE == *'{world}'* ]] || die "BENCH_ROUTE must be a path holding {world}, not '$ROUTE'"
[[ $PG_MODE =~ ^(simple|extended|prepared)$ ]] || die "BENCH_PGBENCH_MODE must be simple, extended or prepared"

# Load generators: installed on demand where that is possible.
need_tool() {
    local tool=$1 package=$2
    command -v "$tool" >/dev/null && return
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        say "installing $package (for $tool)"
        apt-get install -y -qq "$package" >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$package" >/dev/null 2>&1; } || true
    fi
    command -v "$tool" >/dev/null || die "$tool is missing (package $package)"
}
need_tool wrk wrk
need_tool pgbench postgresql-client
need_tool psql postgresql-client
need_tool curl curl

# The stack script is idempotent: a stack that is already up stays as it is.
ops/local/stack.sh up >/dev/null
STATE=${WORLDLINE_STATE:-$ROOT/.worldline}
if [[ -f $STATE/env ]]; then
    # shellcheck source=/dev/null
    source "$STATE/env"
fi
[[ -n ${WORLDLINE_KAFKA_LIBS:-} && -d ${WORLDLINE_KAFKA_LIBS:-} ]] ||
    die "WORLDLINE_KAFKA_LIBS does not name the Kafka jar directory"
JAVA=${WORLDLINE_JAVA:-java}
BOOTSTRAP=${WORLDLINE__KAFKA__BOOTSTRAP_SERVERS:-127.0.0.1:59092}
MAIN_URL=${WORLDLINE__DATABASE__URL:-postgres://worldline@127.0.0.1:55432/worldline}

# Release build: a debug build would measure the compiler, not the API.
if [[ -n ${BENCH_WORLDLINE_BIN:-} ]]; then
    BIN=$BENCH_WORLDLINE_BIN
else
    cargo build --release --quiet -p worldline --bin worldline
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/worldline
fi
[[ -x $BIN ]] || die "no worldline binary at $BIN"

# `postgres://u@h:p/db?x` with another database name.
with_database() {
    local url=$1 database=$2 query=""
    if [[ $url == *\?* ]]; then
        query="?${url#*\?}"
        url=${url%%\?*}
    fi
    local rest=${url#*://}
    [[ $rest == */* ]] && url=${url%/*}
    printf '%s/%s%s' "$url" "$database" "$query"
}

ID=$(od -An -tx1 -N6 /dev/urandom | tr -d ' \n')
PREFIX="bapi$ID."
DB="bench_api_$ID"
PG_DB="bench_pgbench_$ID"
TOKEN="bench-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
ADMIN_URL=${WORLDLINE_TEST_ADMIN_DATABASE_URL:-$(with_database "$MAIN_URL" postgres)}
DB_URL=$(with_database "$MAIN_URL" "$DB")
PG_URL=$(with_database "$MAIN_URL" "$PG_DB")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/worldline-bench-api.XXXXXX")
LUA=$ROOT/ops/bench/api-lookup.lua

SERVE_PID=""
PROJECT_PID=""
CLIENT_PID=""
FILL_PIDS=()
CREATED_DBS=()
TOPICS_CREATED=""

kafka_tool() {
    "$JAVA" -cp "$WORLDLINE_KAFKA_LIBS/*" "$@"
}

# Stops a child this script started: SIGTERM, then SIGKILL after 30 s.
stop_child() {
    local pid=$1
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local waited=0
        while kill -0 "$pid" 2>/dev/null && ((waited < 300)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_child "$CLIENT_PID"
    stop_child "$SERVE_PID"
    stop_child "$PROJECT_PID"
    local pid
    for pid in "${FILL_PIDS[@]}"; do
        stop_child "$pid"
    done
    if [[ -n $KEEP ]]; then
        say "kept (BENCH_KEEP): databases ${CREATED_DBS[*]:-none}, topics ${PREFIX}*, files $WORK"
    else
        local database
        for database in "${CREATED_DBS[@]}"; do
            psql -q -X "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null 2>&1 ||
                say "bench: could not drop database $database" >&2
        done
        if [[ -n $TOPICS_CREATED ]]; then
            kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" \
                --delete --topic "${PREFIX//./\\.}.*" >/dev/null 2>&1 ||
                say "bench: could not delete the topics ${PREFIX}*" >&2
        fi
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ CPU figures

TCK=$(getconf CLK_TCK)
CORES=$(nproc)
load_average() { cut -d' ' -f1-3 /proc/loadavg; }
now() { date +%s.%N; }
# Busy and total ticks of the machine (/proc/stat's aggregate line).
machine_ticks() { awk '$1 == "cpu" { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6; exit }' /proc/stat; }
# user + system ticks of one process (0 once it is gone).
process_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# CPU ticks of the local PostgreSQL cluster: every live `postgres` process, plus
# what the postmaster collected from backends that already exited (-1: none
# here, the server runs elsewhere).
postgres_ticks() {
    # Processes come and go while they are read; cat carries on past the gone.
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk '
        $2 == "(postgres)" { pg[$1] = 1; parent[$1] = $4; own[$1] = $14 + $15; reaped[$1] = $16 + $17 }
        END {
            total = 0; found = 0
            for (pid in pg) { found = 1; total += own[pid]; if (!(parent[pid] in pg)) total += reaped[pid] }
            print found ? total : -1
        }'
}

# cpu_mark; <measured phase>; cpu_end; ...; cpu_line <client's directory> <client
# name> <lookups> [with serve]: the cores each used over the phase, and the CPU
# each spent per lookup.
cpu_mark() {
    read -r MARK_BUSY MARK_TOTAL < <(machine_ticks)
    MARK_PG=$(postgres_ticks)
    MARK_SERVE=$(process_ticks "${SERVE_PID:-0}")
    MARK_T=$(now)
}
cpu_end() {
    read -r END_BUSY END_TOTAL < <(machine_ticks)
    END_PG=$(postgres_ticks)
    END_SERVE=$(process_ticks "${SERVE_PID:-0}")
    END_T=$(now)
}
cpu_line() {
    local client_dir=$1 client=$2 lookups=$3 with_serve=${4:-} client_cpu
    # The client's user and system seconds: the growth of the children's line
    # (the second) of `times`, whose figures read like 1m2.345s.
    client_cpu=$(awk 'FNR == 2 { for (i = 1; i <= 2; i++) { split($i, t, "m"); sum += (FILENAME ~ /after$/ ? 1 : -1) * (t[1] * 60 + t[2]) } }
                      END { print sum + 0 }' "$client_dir/times.before" "$client_dir/times.after")
    awk -v b="$((END_BUSY - MARK_BUSY))" -v tt="$((END_TOTAL - MARK_TOTAL))" -v pg="$((END_PG - MARK_PG))" \
        -v pg_here="$((END_PG >= 0 && MARK_PG >= 0))" -v serve="$((END_SERVE - MARK_SERVE))" \
        -v with_serve="$with_serve" -v t0="$MARK_T" -v t1="$END_T" -v tck="$TCK" -v cores="$CORES" \
        -v client="$client" -v client_cpu="${client_cpu:-0}" -v n="$lookups" 'BEGIN {
            wall = t1 - t0; if (n < 1) n = 1
            cpu = sprintf("machine %.2f of %d busy", tt > 0 ? cores * b / tt : 0, cores)
            per = ""
            if (pg_here) { cpu = cpu sprintf(", postgres %.2f", pg / tck / wall); per = sprintf("postgres %.0f", pg / tck / n * 1e6) }
            if (with_serve) { cpu = cpu sprintf(", worldline serve %.2f", serve / tck / wall); per = per sprintf(", serve %.0f", serve / tck / n * 1e6) }
            cpu = cpu sprintf(", %s %.2f", client, client_cpu / wall)
            per = per sprintf(", %s %.0f", client, client_cpu / n * 1e6)
            sub(/^, /, "", per)
            printf "      cpu (cores): %s; per lookup (us): %s\n", cpu, per
        }'
}

# ------------------------------------------------------------------ helpers

# Nearest-rank percentiles, mean and count of microsecond latencies on stdin.
latency_stats() {
    sort -n | awk '
        { v[NR] = $1; sum += $1 }
        function rank(p) { i = int(p / 100 * NR); if (i < p / 100 * NR) i++; if (i < 1) i = 1; return v[i] }
        END {
            if (NR == 0) { print "count 0"; exit }
            printf "count %d\nmean_us %.1f\np50_us %d\np90_us %d\np99_us %d\nmax_us %d\n",
                NR, sum / NR, rank(50), rank(90), rank(99), v[NR]
        }'
}
field() { awk -v k="$1" '$1 == k { print $2; exit }' "$2"; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }
psql_db() { psql -X -q -v ON_ERROR_STOP=1 "$DB_URL" "$@"; }

# Every projector schema is caught up when, for each topic it has stored a
# position or a log end of, every non-empty partition is applied to the end.
catchup_query() {
    local schemas values first=1 schema
    schemas=$(psql_db -At -c "SELECT table_schema FROM information_schema.tables
                               WHERE table_name = 'projector_offsets' ORDER BY 1")
    values=$(awk -F: 'NF == 3 { printf "%s(%c%s%c, %d, %d)", sep, 39, $1, 39, $2, $3; sep = ", " }' "$WORK/log-ends")
    printf 'WITH ends (topic, partition, end_offset) AS (VALUES %s)\n' "$values"
    for schema in $schemas; do
        [[ -n $first ]] || printf 'UNION ALL\n'
        first=""
        printf "SELECT '%s', count(*) FILTER (WHERE coalesce(o.next_offset, 0) < e.end_offset),
                       coalesce(sum(greatest(e.end_offset - coalesce(o.next_offset, 0), 0)), 0), count(*)
                  FROM ends e LEFT JOIN %s.projector_offsets o USING (topic, partition)
                 WHERE e.topic IN (SELECT topic FROM %s.projector_log_ends
                                   UNION SELECT topic FROM %s.projector_offsets)\n" \
            "$schema" "$schema" "$schema" "$schema"
    done
}

# ------------------------------------------------------------------ the run

RUN_T0=$(now)
say "query API point lookups vs pgbench -S, same run"
say "  worldline $BIN ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git head'))"
pg_server=$(sed -E 's#^[a-z]+://([^@/]*@)?##; s#[/?].*$##' <<<"$MAIN_URL")
say "  PostgreSQL $(psql -X -At "$ADMIN_URL" -c 'SHOW server_version') at $pg_server, Kafka $BOOTSTRAP"
say "  $CORES cores; load average before the run: $(load_average) (the stack, the clients and anything else share the cores)"
say "  clients: $CONNECTIONS connections on $THREADS threads, ${DURATION}s per side and round, $ROUNDS round(s), ${WARMUP}s warm-up"

# Fresh databases; the API's read-only role reads the projector schemas
# (granted by `migrate`).
for database in "$DB" "$PG_DB"; do
    psql -X -q -v ON_ERROR_STOP=1 "$ADMIN_URL" -c "CREATE DATABASE $database" >/dev/null
    CREATED_DBS+=("$database")
done

# Configuration of every `worldline` process of the run.
export WORLDLINE__DATABASE__URL=$DB_URL
if [[ -n ${WORLDLINE__DATABASE__READER_URL:-} ]]; then
    WORLDLINE__DATABASE__READER_URL=$(with_database "$WORLDLINE__DATABASE__READER_URL" "$DB")
    export WORLDLINE__DATABASE__READER_URL
fi
export WORLDLINE__TOPICS__PREFIX=$PREFIX
export WORLDLINE__PROJECTOR__GROUP_PREFIX="${PREFIX}projector."
export WORLDLINE__OPS__LISTEN=127.0.0.1:0
export WORLDLINE_CONFIG=$WORK/worldline.toml
export NO_COLOR=1
seq -f "bench-%05.0f" 1 "$WORLDS" >"$WORK/worlds"
# The limiter stays in the path but never refuses: the goal is about the API's
# cost, not the configured per-token quota.
cat >"$WORK/worldline.toml" <<EOF
[auth]
rate_limit_per_second = 1000000000.0
rate_limit_burst = 1000000000

[[auth.tokens]]
name = "bench"
token = "$TOKEN"
scopes = ["read"]
EOF

# The clock and the simulator first look up each world's last tick in the log,
# one round trip after another; shards of 50 worlds in parallel processes keep
# that from dominating the run.
SHARDS=$(((WORLDS + 49) / 50))
((SHARDS <= 20)) || SHARDS=20
for shard in $(seq 0 $((SHARDS - 1))); do
    list=$(awk -v n="$SHARDS" -v s="$shard" '(NR - 1) % n == s { printf "%s\"%s\"", sep, $1; sep = ", " }' "$WORK/worlds")
    printf '%s\n' $((EVENTS / SHARDS + (shard < EVENTS % SHARDS ? 1 : 0))) >"$WORK/shard-$shard.events"
    # Per shard: its worlds, its share of the rate (5000 events/s in all) and
    # its own seed, so that no two shards draw the same events.
    {
        cat "$WORK/worldline.toml"
        printf '\n[clock]\nworlds = [%s]\ntick_interval_ms = 1\n' "$list"
        printf '\n[simulate]\nworlds = [%s]\nseed = %d\n' "$list" $((11 + shard))
        awk -v n="$SHARDS" 'BEGIN { printf "choices_per_second = %.3f\ninferences_per_second = %.3f\n", 4000 / n, 1000 / n }'
    } >"$WORK/shard-$shard.toml"
done
# Every shard's clock and simulator at once, as parallel processes; fails if any does.
fill() {
    local shard pid i=0 failed=""
    local logs=()
    FILL_PIDS=()
    for shard in $(seq 0 $((SHARDS - 1))); do
        WORLDLINE_CONFIG=$WORK/shard-$shard.toml "$BIN" produce clock --ticks "$TICKS" \
            >"$WORK/clock-$shard.log" 2>&1 &
        FILL_PIDS+=("$!")
        logs+=("$WORK/clock-$shard.log")
        ((EVENTS == 0)) && continue
        WORLDLINE_CONFIG=$WORK/shard-$shard.toml "$BIN" simulate --events "$(cat "$WORK/shard-$shard.events")" \
            >"$WORK/simulate-$shard.log" 2>&1 &
        FILL_PIDS+=("$!")
        logs+=("$WORK/simulate-$shard.log")
    done
    for pid in "${FILL_PIDS[@]}"; do
        wait "$pid" || { failed=1; tail -n 20 "${logs[$i]}" >&2; }
        i=$((i + 1))
    done
    FILL_PIDS=()
    [[ -z $failed ]] || die "a clock or simulator process failed"
}

say ""
say "filling the read models (topic prefix $PREFIX, database $DB)"
t0=$(now)
"$BIN" topics create >"$WORK/topics.log" 2>&1 || { cat "$WORK/topics.log" >&2; die "topics create failed"; }
TOPICS_CREATED=1
"$BIN" migrate >"$WORK/migrate.log" 2>&1 || { cat "$WORK/migrate.log" >&2; die "migrate failed"; }
fill
say "  appended $((WORLDS * TICKS)) clock ticks and $EVENTS simulated events over $WORLDS worlds" \
    "($SHARDS clocks and $([[ $EVENTS -gt 0 ]] && echo "$SHARDS" || echo 0) simulators) in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"

# The projectors start while the log ends are read; nothing appends any more.
t0=$(now)
"$BIN" project >"$WORK/project.log" 2>&1 &
PROJECT_PID=$!
kafka_tool org.apache.kafka.tools.GetOffsetShell --bootstrap-server "$BOOTSTRAP" \
    --topic "${PREFIX//./\\.}.*" >"$WORK/log-ends" 2>"$WORK/log-ends.err" ||
    { cat "$WORK/log-ends.err" >&2; die "could not read the log ends"; }
records=$(awk -F: 'NF == 3 { n += $3 } END { print n + 0 }' "$WORK/log-ends")
catchup_sql=""
waited=0
while :; do
    kill -0 "$PROJECT_PID" 2>/dev/null || { tail -n 20 "$WORK/project.log" >&2; die "worldline project exited early"; }
    # The schemas exist from `migrate` on; the query is built once.
    [[ -n $catchup_sql ]] || catchup_sql=$(catchup_query)
    status=$(psql_db -At -F ' ' -c "$catchup_sql")
    if awk '$4 == 0 || $2 > 0 { behind = 1 } END { exit behind ? 1 : 0 }' <<<"$status"; then
        break
    fi
    if ((waited >= CATCHUP_SECS * 2)); then
        say "$status" >&2
        die "the projectors did not catch up within ${CATCHUP_SECS}s (BENCH_CATCHUP_SECS)"
    fi
    if ((waited > 0 && waited % 20 == 0)); then
        say "  waiting for the projectors: $(awk '{ printf "%s%s %d left", sep, $1, $3; sep = ", " }' <<<"$status")"
    fi
    sleep 0.5
    waited=$((waited + 1))
done
say "  $records records in the log, projected into $(wc -l <<<"$status") schemas in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"
stop_child "$PROJECT_PID"
PROJECT_PID=""
psql_db -c "SET client_min_messages = error" -c "VACUUM ANALYZE" >/dev/null

say ""
say "starting worldline serve (release) and pgbench -i -s $PG_SCALE"
SERVE_ENV=()
if [[ -n ${BENCH_CHILD_ENV:-} ]]; then
    IFS=';' read -r -a SERVE_ENV <<<"$BENCH_CHILD_ENV"
    say "  serve environment: ${SERVE_ENV[*]}"
fi
env WORLDLINE__HTTP__LISTEN=127.0.0.1:0 "${SERVE_ENV[@]}" "$BIN" serve >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
pgbench -i -q -s "$PG_SCALE" "$PG_URL" >"$WORK/pgbench-init.log" 2>&1 ||
    { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
BASE=""
for _ in $(seq 1 600); do
    kill -0 "$SERVE_PID" 2>/dev/null || { tail -n 20 "$WORK/serve.log" >&2; die "worldline serve exited"; }
    BASE=$(grep -o 'query API at http://[0-9.]*:[0-9]*' "$WORK/serve.log" | head -n 1 | sed 's/^query API at //') || true
    [[ -n $BASE ]] && curl -fsS -o /dev/null "$BASE/readyz" 2>/dev/null && break
    sleep 0.1
done
[[ -n $BASE ]] || { tail -n 20 "$WORK/serve.log" >&2; die "worldline serve did not start listening"; }
curl -fsS -o /dev/null "$BASE/readyz" || say "  warning: $BASE/readyz does not answer 200"
first_world=$(head -n 1 "$WORK/worlds")
sample_path=${ROUTE//\{world\}/$first_world}
code=$(curl -sS -o "$WORK/sample.json" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$BASE$sample_path")
[[ $code == 200 ]] || { cat "$WORK/sample.json" >&2; echo >&2; die "GET $sample_path answered $code, not 200"; }
say "  $BASE; GET $sample_path -> 200 $(head -c 200 "$WORK/sample.json")"
pool=${WORLDLINE__DATABASE__MAX_CONNECTIONS:-}
readers=${WORLDLINE__DATABASE__READER_CONNECTIONS:-}
for setting in "${SERVE_ENV[@]}"; do
    [[ $setting == WORLDLINE__DATABASE__MAX_CONNECTIONS=* ]] && pool=${setting#*=}
    [[ $setting == WORLDLINE__DATABASE__READER_CONNECTIONS=* ]] && readers=${setting#*=}
done
say "  serve's connections: ${readers:-the default} database.reader_connections (the lookups)," \
    "pool of ${pool:-the default} database.max_connections; pgbench: $((PG_SCALE * 100000)) accounts, -M $PG_MODE"

# Runs a load generator as a background child, so that a signal to this script
# is handled at once, not when the client is done. The shell's `times` before
# and after its wait give the client's CPU (no other child ends meanwhile).
run_client() { # <dir> <command...>
    local dir=$1 status=0
    shift
    mkdir -p "$dir"
    times >"$dir/times.before"
    "$@" >"$dir/out" 2>&1 &
    CLIENT_PID=$!
    wait "$CLIENT_PID" || status=$?
    CLIENT_PID=""
    times >"$dir/times.after"
    ((status == 0)) || { cat "$dir/out" >&2; die "$1 failed (exit $status)"; }
}
run_pgbench() { # <seconds> <dir>
    run_client "$2" pgbench -n -S -M "$PG_MODE" -c "$CONNECTIONS" -j "$THREADS" -T "$1" \
        --log --log-prefix="$2/txn" "$PG_URL"
}
run_wrk() { # <seconds> <dir>
    run_client "$2" wrk -t "$THREADS" -c "$CONNECTIONS" -d "$1s" --timeout 10s -s "$LUA" "$BASE" \
        -- "$WORK/worlds" "$TOKEN" "$ROUTE"
}

if ((WARMUP > 0)); then
    run_pgbench "$WARMUP" "$WORK/warmup-pgbench"
    run_wrk "$WARMUP" "$WORK/warmup-api"
fi

say ""
say "measuring: pgbench -S, then GET $ROUTE, per round"
for round in $(seq 1 "$ROUNDS"); do
    dir=$WORK/round-$round

    cpu_mark
    run_pgbench "$DURATION" "$dir/pgbench"
    cpu_end
    cat "$dir"/pgbench/txn* | awk '{ print $3 }' | latency_stats >"$dir/pgbench/stats"
    rm -f "$dir"/pgbench/txn*
    tps=$(awk '/^tps = / { print $3; exit }' "$dir/pgbench/out")
    [[ -n $tps ]] || { cat "$dir/pgbench/out" >&2; die "no tps in pgbench's output"; }
    failed=$(awk '/number of failed transactions/ { print $5; exit }' "$dir/pgbench/out")
    s=$dir/pgbench/stats
    printf '  round %d  pgbench -S    %9.0f tps    p50 %s ms  p90 %s ms  p99 %s ms  max %s ms  (%s transactions, %s failed)\n' \
        "$round" "$tps" "$(ms "$(field p50_us "$s")")" "$(ms "$(field p90_us "$s")")" \
        "$(ms "$(field p99_us "$s")")" "$(ms "$(field max_us "$s")")" "$(field count "$s")" "${failed:-0}"
    cpu_line "$dir/pgbench" pgbench "$(field count "$s")"
    say "$tps" >>"$WORK/pg-rate"
    field p50_us "$s" >>"$WORK/pg-p50"
    field p99_us "$s" >>"$WORK/pg-p99"

    cpu_mark
    run_wrk "$DURATION" "$dir/api"
    cpu_end
    s=$dir/api/out
    rate=$(field rate "$s")
    [[ -n $rate ]] || { cat "$s" >&2; die "no figures in wrk's output"; }
    printf '  round %d  API lookups   %9.0f req/s  p50 %s ms  p90 %s ms  p99 %s ms  max %s ms  (%s requests, %s not 2xx, %s socket errors)\n' \
        "$round" "$rate" "$(ms "$(field p50_us "$s")")" "$(ms "$(field p90_us "$s")")" \
        "$(ms "$(field p99_us "$s")")" "$(ms "$(field max_us "$s")")" "$(field requests "$s")" \
        "$(field non_2xx "$s")" "$(field socket_errors "$s")"
    cpu_line "$dir/api" wrk "$(field requests "$s")" 1
    say "$rate" >>"$WORK/api-rate"
    field p50_us "$s" >>"$WORK/api-p50"
    field p99_us "$s" >>"$WORK/api-p99"
    awk -v a="$rate" -v b="$tps" 'BEGIN { print (b > 0 ? a / b : 0) }' >>"$WORK/ratio"
    bad=$(($(field non_2xx "$s") + $(field socket_errors "$s")))
    BAD_TOTAL=$((${BAD_TOTAL:-0} + bad))
done

api_rate=$(median <"$WORK/api-rate")
api_p50=$(median <"$WORK/api-p50")
api_p99=$(median <"$WORK/api-p99")
pg_rate=$(median <"$WORK/pg-rate")
pg_p50=$(median <"$WORK/pg-p50")
pg_p99=$(median <"$WORK/pg-p99")
ratio=$(median <"$WORK/ratio")
ratio_verdict=$(awk -v r="$ratio" -v g="$GOAL_RATIO" 'BEGIN { print (r >= g ? "PASS" : "MISS") }')
p99_verdict=$(awk -v p="$api_p99" -v g="$GOAL_P99_MS" 'BEGIN { print (p / 1000 <= g ? "PASS" : "MISS") }')
if ((BAD_TOTAL > 0)); then
    ratio_verdict=MISS
    p99_verdict=MISS
fi
of_rounds=""
((ROUNDS > 1)) && of_rounds=" (medians of $ROUNDS rounds)"

say ""
say "summary$of_rounds: $CONNECTIONS connections, $THREADS client threads, ${DURATION}s each"
printf '  %-44s %10s  %-26s %s\n' "figure" "value" "goal" "verdict"
printf '  %-44s %10.0f  %-26s %s\n' "API GET ${ROUTE} req/s" "$api_rate" "" ""
printf '  %-44s %10.0f  %-26s %s\n' "pgbench -S -M $PG_MODE tps (TCP)" "$pg_rate" "" ""
printf '  %-44s %10.2f  %-26s %s\n' "API / pgbench rate" "$ratio" ">= $GOAL_RATIO" "$ratio_verdict"
printf '  %-44s %10s  %-26s %s\n' "API p99 latency (ms)" "$(ms "$api_p99")" "<= $GOAL_P99_MS ms" "$p99_verdict"
printf '  %-44s %10s  %-26s %s\n' "API p50 latency (ms)" "$(ms "$api_p50")" "" "(info)"
printf '  %-44s %10s  %-26s %s\n' "pgbench p99 / p50 latency (ms)" "$(ms "$pg_p99") / $(ms "$pg_p50")" "" "(info)"
if ((BAD_TOTAL > 0)); then
    say "  $BAD_TOTAL API requests failed (not 2xx or socket errors): the figures do not count"
fi
if [[ $ratio_verdict == PASS && $p99_verdict == PASS ]]; then
    say "  goal met"
else
    say "  goal not met"
fi
say ""
say "  run took $(awk -v a="$RUN_T0" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s; load average at the end: $(load_average)"
