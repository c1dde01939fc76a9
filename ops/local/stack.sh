#!/usr/bin/env bash
# worldline local stack: a single-node Kafka (KRaft, run from the official
# Apache Kafka jars) and a PostgreSQL cluster of its own, both bound to
# 127.0.0.1 only, with all state under one directory.
#
#   ops/local/stack.sh up                      install what is missing, start, write <state>/env
#   ops/local/stack.sh down [kafka|postgres]   stop what `up` started
#   ops/local/stack.sh status                  running/stopped, pid, port, answers? (exit 3 if not all up)
#   ops/local/stack.sh env                     print <state>/env
#   ops/local/stack.sh logs [kafka|postgres] [-f] [-n LINES]
#   ops/local/stack.sh clean [ID...]           drop what interrupted tests and benchmarks left behind
#
# Settings (environment):
#   WORLDLINE_STATE                   state dir            (default: <repo>/.worldline)
#   WORLDLINE_CACHE                   jar cache            (default: ~/.cache/worldline)
#   WORLDLINE_KAFKA_PORT              broker port          (default: 59092)
#   WORLDLINE_KAFKA_CONTROLLER_PORT   controller port      (default: 59093)
#   WORLDLINE_PG_PORT                 PostgreSQL port      (default: 55432)
#   WORLDLINE_EXTERNAL_DATABASE_URL   superuser URL of a PostgreSQL server to use instead of a local one
#   WORLDLINE_KAFKA_START_TIMEOUT     seconds to wait for the broker (default: 60)
#   WORLDLINE_KAFKA_CDS=0             do not use a class-data archive to start the broker faster
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

KAFKA_VERSION=4.3.1
CACHE=${WORLDLINE_CACHE:-${HOME:-/root}/.cache/worldline}
LIBS=$CACHE/kafka-$KAFKA_VERSION/libs
CDS_DIR=$CACHE/kafka-$KAFKA_VERSION/cds
KAFKA_PORT=${WORLDLINE_KAFKA_PORT:-59092}
KAFKA_CONTROLLER_PORT=${WORLDLINE_KAFKA_CONTROLLER_PORT:-59093}
PG_PORT=${WORLDLINE_PG_PORT:-55432}
# Ports not set explicitly follow what is already running (or formatted).
KAFKA_PORT_SET=${WORLDLINE_KAFKA_PORT:+1}
KAFKA_CONTROLLER_PORT_SET=${WORLDLINE_KAFKA_CONTROLLER_PORT:+1}
PG_PORT_SET=${WORLDLINE_PG_PORT:+1}
EXTERNAL_DB=${WORLDLINE_EXTERNAL_DATABASE_URL:-}
KAFKA_START_TIMEOUT=${WORLDLINE_KAFKA_START_TIMEOUT:-60}
PG_START_TIMEOUT=60
KAFKA_STOP_TIMEOUT=30

STATE=${WORLDLINE_STATE:-$REPO_ROOT/.worldline}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
RUN=$STATE/run
LOGS=$STATE/logs
ENV_FILE=$STATE/env

KAFKA_DIR=$STATE/kafka
KAFKA_DATA=$KAFKA_DIR/data
KAFKA_PROPS=$KAFKA_DIR/server.properties
KAFKA_LOG4J=$KAFKA_DIR/log4j2.properties
KAFKA_PIDFILE=$RUN/kafka.pid
KAFKA_LOG=$LOGS/kafka.log

PG_LOG=$LOGS/postgres.log
PG_MARKER=$RUN/postgres.managed
# PG_DIR, PG_DATA, PG_SOCK, PG_BIN are set by pg_locate.

JAVA=""
JAVA_VERSION_TEXT=""
STARTED=()
KAFKA_LAUNCHED_PID=""
KAFKA_LAUNCHED_T0=0
KAFKA_CDS_OPTS=()
KAFKA_CDS_MODE=off
KAFKA_CDS_FILE=""
KAFKA_CDS_DISABLED=""

# Remembers what this invocation of `up` started, also in <state>/run/last-up
# (read by ops/dev to stop only that afterwards).
mark_started() {
    STARTED+=("$1")
    printf '%s\n' "$1" >>"$RUN/last-up"
}

# ---------------------------------------------------------------- helpers

say() { printf '%s\n' "$*"; }
warn() { printf 'stack: %s\n' "$*" >&2; }
die() {
    printf 'stack: error: %s\n' "$*" >&2
    exit 1
}

# Milliseconds since the epoch, from bash's own clock (no fork).
now_ms() {
    local t=${EPOCHREALTIME/[.,]/}
    printf '%s' "$((t / 1000))"
}

# "6.4" from a duration in milliseconds.
secs() { printf '%d.%d' "$(($1 / 1000))" "$((($1 % 1000) / 100))"; }

is_port() { [[ $1 =~ ^[0-9]+$ ]] && (($1 > 0 && $1 < 65536)); }

# Succeeds when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    # shellcheck disable=SC2016 # expanded by the inner shell
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# Succeeds while process $1 exists and is not a zombie (an exited child that
# init has not reaped yet still answers kill -0).
alive() {
    local pid=$1 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r /proc/$pid/stat ]]; then
        stat=$(<"/proc/$pid/stat") 2>/dev/null || return 1
        stat=${stat##*) }
        [[ ${stat:0:1} != Z ]]
    fi
}

# Command line of a live process, or failure.
proc_cmdline() {
    local pid=$1
    alive "$pid" || return 1
    if [[ -r /proc/$pid/cmdline ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline"
    else
        ps -o args= -p "$pid" 2>/dev/null
    fi
}

tail_log() {
    local file=$1 n=${2:-40}
    if [[ -s $file ]]; then
        printf -- '----- last %d lines of %s -----\n' "$n" "$file" >&2
        tail -n "$n" "$file" >&2
        printf -- '-----\n' >&2
    else
        printf 'stack: %s is empty\n' "$file" >&2
    fi
}

# Serialise up/down so that two callers never start the same component twice.
take_lock() {
    mkdir -p "$RUN" "$LOGS"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$RUN/lock"
        if ! flock -w 300 9; then
            die "another 'stack.sh up/down' holds $RUN/lock"
        fi
    fi
}

# ---------------------------------------------------------------- prerequisites

java_major() {
    local line
    line=$("$1" -version 2>&1 | head -n 1) || return 1
    [[ $line =~ \"([0-9]+)(\.([0-9]+))? ]] || return 1
    if [[ ${BASH_REMATCH[1]} == 1 ]]; then
        printf '%s' "${BASH_REMATCH[3]:-1}"
    else
        printf '%s' "${BASH_REMATCH[1]}"
    fi
}

# Sets JAVA to a Java 17+ binary, or fails.
find_java() {
    local c major
    local -a candidates=()
    [[ -n ${WORLDLINE_JAVA:-} ]] && candidates+=("$WORLDLINE_JAVA")
    [[ -n ${JAVA_HOME:-} ]] && candidates+=("$JAVA_HOME/bin/java")
    c=$(command -v java 2>/dev/null) && candidates+=("$c")
    for c in /usr/lib/jvm/*/bin/java; do
        [[ -x $c ]] && candidates+=("$c")
    done
    for c in "${candidates[@]}"; do
        [[ -x $c ]] || continue
        major=$(java_major "$c") || continue
        if ((major >= 17)); then
            JAVA=$c
            JAVA_VERSION_TEXT=$("$c" -version 2>&1 || true)
            return 0
        fi
    done
    return 1
}

libs_ready() {
    [[ -f $LIBS/kafka_2.13-$KAFKA_VERSION.jar && -f $LIBS/kafka-tools-$KAFKA_VERSION.jar ]] &&
        compgen -G "$LIBS/log4j-slf4j*-impl-*.jar" >/dev/null
}

# Sets PG_BIN to the bin dir of the newest installed PostgreSQL server
# (or of the version the existing data dir was made with), or fails.
find_pg_bin() {
    local want="" d
    if [[ -n ${PG_DATA:-} && -f ${PG_DATA}/PG_VERSION ]]; then
        want=$(<"$PG_DATA/PG_VERSION")
    fi
    if [[ -n ${WORLDLINE_PG_BIN:-} ]]; then
        PG_BIN=$WORLDLINE_PG_BIN
        [[ -x $PG_BIN/initdb ]]
        return
    fi
    if [[ -n $want && -x /usr/lib/postgresql/$want/bin/initdb ]]; then
        PG_BIN=/usr/lib/postgresql/$want/bin
        return 0
    fi
    d=$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb 2>/dev/null | grep -v '\*' | sort -V | tail -n 1 || true)
    if [[ -n $d && -x $d ]]; then
        PG_BIN=$(dirname "$d")
        return 0
    fi
    if d=$(command -v pg_config 2>/dev/null) && d=$("$d" --bindir 2>/dev/null) && [[ -x $d/initdb ]]; then
        PG_BIN=$d
        return 0
    fi
    if d=$(command -v initdb 2>/dev/null); then
        PG_BIN=$(dirname "$(readlink -f "$d")")
        return 0
    fi
    return 1
}

find_psql() {
    if [[ -n ${PG_BIN:-} && -x $PG_BIN/psql ]]; then
        PSQL=$PG_BIN/psql
    elif PSQL=$(command -v psql 2>/dev/null); then
        :
    else
        return 1
    fi
}

apt_install() {
    local -a pkgs=("$@") sudo=()
    if ((EUID != 0)); then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            die "missing packages: ${pkgs[*]}; run as root, or: sudo apt-get install ${pkgs[*]}"
        fi
    fi
    say "installing with apt: ${pkgs[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
        die "apt-get update failed"
    local i
    for i in "${!pkgs[@]}"; do
        # Java 17 where the distribution has it; otherwise its newer LTS.
        if [[ ${pkgs[$i]} == openjdk-17-jre-headless ]] &&
            ! apt-cache show openjdk-17-jre-headless >/dev/null 2>&1; then
            if apt-cache show openjdk-21-jre-headless >/dev/null 2>&1; then
                pkgs[i]=openjdk-21-jre-headless
            else
                pkgs[i]=default-jre-headless
            fi
        fi
    done
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" ||
        die "apt-get install ${pkgs[*]} failed"
}

ensure_prereqs() {
    local -a pkgs=() what=()
    find_java || {
        pkgs+=(openjdk-17-jre-headless)
        what+=("a Java 17 (or newer) runtime")
    }
    if ! libs_ready && ! command -v mvn >/dev/null 2>&1; then
        pkgs+=(maven)
        what+=("Apache Maven (to fetch the Kafka jars once)")
    fi
    if [[ -z $EXTERNAL_DB ]]; then
        find_pg_bin || {
            pkgs+=(postgresql)
            what+=("the PostgreSQL server (14 or newer)")
        }
    else
        find_pg_bin || true
        find_psql || {
            pkgs+=(postgresql-client)
            what+=("the PostgreSQL client (psql)")
        }
    fi
    ((${#pkgs[@]} == 0)) && return 0

    if ! command -v apt-get >/dev/null 2>&1; then
        printf 'stack: error: missing prerequisites:\n' >&2
        printf '  - %s\n' "${what[@]}" >&2
        printf 'This machine has no apt-get: install them with its package manager, put them on PATH\n' >&2
        printf '(or set WORLDLINE_JAVA / WORLDLINE_PG_BIN), and run again.\n' >&2
        exit 1
    fi
    apt_install "${pkgs[@]}"
    find_java || die "no Java 17+ runtime found after installing"
    if [[ -z $EXTERNAL_DB ]]; then
        find_pg_bin || die "no PostgreSQL server binaries found after installing"
    else
        find_pg_bin || true
        find_psql || die "no psql found after installing"
    fi
}

ensure_libs() {
    libs_ready && return 0
    command -v mvn >/dev/null 2>&1 || die "mvn is needed to fetch the Kafka jars"
    say "kafka: fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $LIBS"
    local tmp=$LIBS.tmp.$$
    rm -rf "$tmp"
    mkdir -p "$tmp"
    mkdir -p "$LOGS"
    if ! mvn -q -B -Dstyle.color=never -f "$SCRIPT_DIR/kafka-pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" >"$LOGS/maven.log" 2>&1; then
        rm -rf "$tmp"
        tail_log "$LOGS/maven.log"
        die "fetching the Kafka jars failed (log: $LOGS/maven.log)"
    fi
    rm -rf "$LIBS" "$CDS_DIR"
    mv "$tmp" "$LIBS"
    libs_ready || die "the jar cache $LIBS is incomplete after fetching"
}

# ---------------------------------------------------------------- kafka

# A Metadata (v4) request over plain TCP; succeeds when the broker answers
# with at least one live broker, i.e. it has joined its own cluster and can
# serve clients. Costs a few milliseconds, no JVM.
kafka_answers() {
    local port=${1:-$KAFKA_PORT} out
    local -a b
    # shellcheck disable=SC2016 # expanded by the inner shell
    out=$(timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "\x00\x00\x00\x11\x00\x03\x00\x04\x00\x00\x00\x07\x00\x02wl\xff\xff\xff\xff\x00" >&3
        head -c 16 <&3 | od -An -v -tu1
    ' _ "$port" 2>/dev/null) || return 1
    read -r -a b <<<"$out"
    ((${#b[@]} == 16)) || return 1
    # bytes 4..7 correlation id (7), 12..15 number of brokers
    ((b[4] == 0 && b[5] == 0 && b[6] == 0 && b[7] == 7)) || return 1
    (((b[12] << 24 | b[13] << 16 | b[14] << 8 | b[15]) >= 1))
}

# Prints the pid of the broker that `up` started from this state dir.
kafka_pid() {
    local pid cmd
    [[ -f $KAFKA_PIDFILE ]] || return 1
    pid=$(<"$KAFKA_PIDFILE")
    cmd=$(proc_cmdline "$pid") || return 1
    [[ $cmd == *kafka.Kafka* && $cmd == *"$KAFKA_PROPS"* ]] || return 1
    printf '%s' "$pid"
}

recorded_port() { # component
    local f=$RUN/$1.port
    [[ -f $f ]] && cat "$f"
}

kafka_java_opts() {
    printf '%s\n' -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        "-XX:ErrorFile=$LOGS/kafka-hs_err_pid%p.log" \
        "-Dlog4j2.configurationFile=$KAFKA_LOG4J" "-Dkafka.logs.dir=$LOGS"
}

# Class-data sharing: the broker's first clean stop (per JDK build) dumps the
# classes it loaded into an archive in the jar cache; later starts map it and
# come up about 40% faster. The dump goes to a temporary name and becomes the
# archive only after a clean stop (a torn archive would crash the JVM), and a
# start that fails while using an archive drops it and retries without.
# Sets KAFKA_CDS_OPTS and KAFKA_CDS_MODE (use, dump or off).
kafka_cds_choose() {
    KAFKA_CDS_OPTS=()
    KAFKA_CDS_MODE=off
    [[ ${WORLDLINE_KAFKA_CDS:-1} != 0 && -z ${KAFKA_CDS_DISABLED:-} ]] || return 0
    mkdir -p "$CDS_DIR" 2>/dev/null && [[ -w $CDS_DIR ]] || return 0
    local id
    id=$(printf '%s\n%s\n' "$JAVA" "$JAVA_VERSION_TEXT" | cksum | cut -d' ' -f1)
    KAFKA_CDS_FILE=$CDS_DIR/kafka-$id.jsa
    KAFKA_CDS_OPTS=(-Xlog:cds=off -Xlog:cds+dynamic=off)
    if [[ -s $KAFKA_CDS_FILE ]]; then
        KAFKA_CDS_MODE=use
        KAFKA_CDS_OPTS+=("-XX:SharedArchiveFile=$KAFKA_CDS_FILE")
    else
        KAFKA_CDS_MODE=dump
        local new=$KAFKA_CDS_FILE.new.$$
        printf '%s\n' "$new" >"$RUN/kafka.cds-pending"
        KAFKA_CDS_OPTS+=("-XX:ArchiveClassesAtExit=$new")
    fi
}

# After the broker stopped: keep its archive dump if the stop was clean.
kafka_cds_finish() { # clean(0|1)
    local marker=$RUN/kafka.cds-pending new
    [[ -f $marker ]] || return 0
    new=$(<"$marker")
    rm -f "$marker"
    if [[ $1 == 1 && -s $new ]]; then
        mv -f "$new" "${new%.new.*}"
    else
        rm -f "$new"
    fi
}

write_kafka_config() {
    mkdir -p "$KAFKA_DATA"
    cat >"$KAFKA_PROPS.tmp" <<EOF
# Written by ops/local/stack.sh on every start; edits here are overwritten.
# Single node, broker and controller in one process, loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DATA

# Topics are created on purpose (worldline topics ...), never by a typo.
auto.create.topics.enable=false
num.partitions=4
default.replication.factor=1
min.insync.replicas=1

# Internal topics: one replica on one node; few partitions start faster.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=4
group.initial.rebalance.delay.ms=0
EOF
    mv "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"

    cat >"$KAFKA_LOG4J.tmp" <<'EOF'
# Written by ops/local/stack.sh. Warnings and errors, plus start-up lines.
name=worldline-local-kafka
appender.console.type=Console
appender.console.name=STDOUT
appender.console.layout.type=PatternLayout
appender.console.layout.pattern=[%d{ISO8601}] %p %m (%c)%n
rootLogger.level=WARN
rootLogger.appenderRef.stdout.ref=STDOUT
logger.raftserver.name=kafka.server.KafkaRaftServer
logger.raftserver.level=INFO
logger.appinfo.name=org.apache.kafka.common.utils.AppInfoParser
logger.appinfo.level=INFO
EOF
    mv "$KAFKA_LOG4J.tmp" "$KAFKA_LOG4J"
}

format_kafka_storage() {
    [[ -f $KAFKA_DATA/meta.properties ]] && return 0
    local id
    if [[ -s $KAFKA_DIR/cluster.id ]]; then
        id=$(<"$KAFKA_DIR/cluster.id")
    else
        id=$("$JAVA" -cp "$LIBS/*" kafka.tools.StorageTool random-uuid 2>>"$KAFKA_LOG" | tail -n 1) ||
            {
                tail_log "$KAFKA_LOG"
                die "kafka: StorageTool random-uuid failed"
            }
        printf '%s\n' "$id" >"$KAFKA_DIR/cluster.id"
    fi
    say "kafka: formatting storage in $KAFKA_DATA (cluster id $id)"
    if ! "$JAVA" -cp "$LIBS/*" "-Dlog4j2.configurationFile=$KAFKA_LOG4J" kafka.tools.StorageTool format \
        --standalone -t "$id" -c "$KAFKA_PROPS" --ignore-formatted >>"$KAFKA_LOG" 2>&1; then
        tail_log "$KAFKA_LOG"
        die "kafka: formatting the storage failed"
    fi
    # The standalone quorum stores the controller's address in the log.
    printf '%s\n' "$KAFKA_CONTROLLER_PORT" >"$KAFKA_DIR/formatted.controller-port"
}

kafka_up() {
    local pid port
    if pid=$(kafka_pid); then
        port=$(recorded_port kafka || true)
        if [[ -n $port && $port != "$KAFKA_PORT" ]]; then
            [[ -z $KAFKA_PORT_SET ]] ||
                die "kafka is running on port $port (pid $pid); run 'stack.sh down kafka' before changing WORLDLINE_KAFKA_PORT"
            KAFKA_PORT=$port
        fi
        if kafka_answers; then
            say "kafka: already running (pid $pid, 127.0.0.1:$KAFKA_PORT)"
            return 0
        fi
        say "kafka: running (pid $pid) but not answering yet; waiting"
        kafka_wait_ready "$pid" "$(now_ms)" || {
            tail_log "$KAFKA_LOG"
            die "kafka (pid $pid) does not answer on 127.0.0.1:$KAFKA_PORT; try 'stack.sh down kafka' then 'up'"
        }
        say "kafka: ready (pid $pid, 127.0.0.1:$KAFKA_PORT)"
        return 0
    fi
    rm -f "$KAFKA_PIDFILE" # stale (reboot, kill -9) or absent

    if [[ -f $KAFKA_DIR/formatted.controller-port ]] &&
        [[ $(<"$KAFKA_DIR/formatted.controller-port") != "$KAFKA_CONTROLLER_PORT" ]]; then
        [[ -z $KAFKA_CONTROLLER_PORT_SET ]] ||
            die "kafka: the storage in $KAFKA_DATA was formatted for controller port $(<"$KAFKA_DIR/formatted.controller-port"); use that port or delete $KAFKA_DIR"
        KAFKA_CONTROLLER_PORT=$(<"$KAFKA_DIR/formatted.controller-port")
    fi
    local p
    for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
        if port_open "$p"; then
            die "kafka: port 127.0.0.1:$p is already in use by a process this stack did not start; stop it or set WORLDLINE_KAFKA_PORT / WORLDLINE_KAFKA_CONTROLLER_PORT"
        fi
    done

    write_kafka_config
    printf '\n===== %s stack.sh: starting kafka %s =====\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$KAFKA_VERSION" >>"$KAFKA_LOG"
    format_kafka_storage

    kafka_cds_finish 0 # a dump left by a broker that did not stop cleanly
    kafka_launch
    mark_started kafka
}

# Starts the broker process in the background; sets KAFKA_LAUNCHED_PID/_T0.
kafka_launch() {
    local -a opts
    mapfile -t opts < <(kafka_java_opts)
    kafka_cds_choose
    local t0 tmp_pid=$KAFKA_PIDFILE.new
    rm -f "$tmp_pid"
    t0=$(now_ms)
    # setsid: detached from the terminal, so a Ctrl-C in the terminal that ran `up` does not reach it.
    # The inner shell writes its own pid, which exec hands on to java.
    # shellcheck disable=SC2016 # expanded by the inner shell
    nohup setsid bash -c 'printf "%s\n" "$$" >"$1"; cd "$2" || exit 1; shift 2; exec "$@"' _ "$tmp_pid" "$KAFKA_DIR" \
        "$JAVA" "${opts[@]}" "${KAFKA_CDS_OPTS[@]}" -cp "$LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
        </dev/null >>"$KAFKA_LOG" 2>&1 9>&- &
    disown "$!" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $tmp_pid ]] && break
        sleep 0.05
    done
    [[ -s $tmp_pid ]] || {
        tail_log "$KAFKA_LOG"
        die "kafka: the broker process did not start"
    }
    mv "$tmp_pid" "$KAFKA_PIDFILE"
    printf '%s\n' "$KAFKA_PORT" >"$RUN/kafka.port"
    KAFKA_LAUNCHED_PID=$(<"$KAFKA_PIDFILE")
    KAFKA_LAUNCHED_T0=$t0
}

# Waits for the broker that kafka_up launched (PostgreSQL starts meanwhile).
kafka_await() {
    [[ -n $KAFKA_LAUNCHED_PID ]] || return 0
    local pid=$KAFKA_LAUNCHED_PID ok=0
    kafka_wait_ready "$pid" "$KAFKA_LAUNCHED_T0" && ok=1
    if ((!ok)) && [[ $KAFKA_CDS_MODE == use ]]; then
        warn "kafka: did not start with the class-data archive $KAFKA_CDS_FILE; dropping it and retrying without"
        if alive "$pid"; then kafka_stop_pid "$pid" >/dev/null || true; fi
        rm -f "$KAFKA_CDS_FILE"
        KAFKA_CDS_DISABLED=1
        kafka_launch
        pid=$KAFKA_LAUNCHED_PID
        kafka_wait_ready "$pid" "$KAFKA_LAUNCHED_T0" && ok=1
    fi
    if ((!ok)); then
        if alive "$pid"; then
            warn "kafka: not ready after ${KAFKA_START_TIMEOUT}s; stopping it"
            kafka_stop_pid "$pid" >/dev/null || true
        fi
        rm -f "$KAFKA_PIDFILE" "$RUN/kafka.port"
        kafka_cds_finish 0
        tail_log "$KAFKA_LOG"
        die "kafka failed to start (log: $KAFKA_LOG)"
    fi
    say "kafka: started in $(secs "$(($(now_ms) - KAFKA_LAUNCHED_T0))") s (pid $pid, 127.0.0.1:$KAFKA_PORT)"
}

kafka_wait_ready() {
    local pid=$1 t0=$2 deadline
    deadline=$((t0 + KAFKA_START_TIMEOUT * 1000))
    while :; do
        alive "$pid" || {
            warn "kafka: the broker process (pid $pid) exited"
            return 1
        }
        kafka_answers && return 0
        (($(now_ms) >= deadline)) && return 1
        sleep 0.1
    done
}

# SIGTERM, then SIGKILL after KAFKA_STOP_TIMEOUT; fails if it took SIGKILL.
kafka_stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < KAFKA_STOP_TIMEOUT * 10; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    warn "kafka: still running after ${KAFKA_STOP_TIMEOUT}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || return 1
        sleep 0.1
    done
    return 1
}

kafka_down() {
    local pid t0
    if ! pid=$(kafka_pid); then
        rm -f "$KAFKA_PIDFILE" "$RUN/kafka.port"
        say "kafka: not running (nothing to stop)"
        return 0
    fi
    t0=$(now_ms)
    local clean=1
    kafka_stop_pid "$pid" || clean=0
    kafka_cds_finish "$clean"
    rm -f "$KAFKA_PIDFILE" "$RUN/kafka.port"
    say "kafka: stopped (pid $pid) in $(secs "$(($(now_ms) - t0))") s"
}

# ---------------------------------------------------------------- postgresql

# Runs a command as the OS user that owns the cluster: postgres when we are
# root (initdb refuses root), ourselves otherwise.
pg_as() {
    if ((EUID == 0)); then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Chooses PG_DIR (the cluster's home) and friends. Root runs the server as the
# postgres user, which must be able to reach the state dir; when it cannot
# (say, a checkout under /root), the cluster lives in /var/tmp instead.
pg_locate() {
    PG_DIR=$STATE/postgres
    if ((EUID == 0)) && id postgres >/dev/null 2>&1; then
        if ! runuser -u postgres -- test -x "$STATE"; then
            local sum
            sum=$(printf '%s' "$STATE" | cksum | cut -d' ' -f1)
            PG_DIR=/var/tmp/worldline-postgres-$sum
        fi
    fi
    PG_DATA=$PG_DIR/data
    PG_SOCK=$PG_DIR/run
    # A unix socket path must fit in 107 bytes; without one, TCP still works.
    if ((${#PG_SOCK} + 20 > 107)); then
        PG_SOCK=""
    fi
}

pg_write() { # path mode < content
    local path=$1 mode=$2
    cat >"$path.tmp"
    chmod "$mode" "$path.tmp"
    if ((EUID == 0)); then chown postgres:postgres "$path.tmp"; fi
    mv "$path.tmp" "$path"
}

pg_ready() { # port
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "${1:-$PG_PORT}" -U postgres -d postgres -t 2 >/dev/null 2>&1
}

# Prints the postmaster's pid when our cluster's server is alive.
pg_pid() {
    local pid cmd
    [[ -n ${PG_DATA:-} && -f $PG_DATA/postmaster.pid ]] || return 1
    pid=$(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null) || return 1
    cmd=$(proc_cmdline "$pid") || return 1
    [[ $cmd == *postgres* || $cmd == *postmaster* ]] || return 1
    printf '%s' "$pid"
}

pg_init() {
    [[ -f $PG_DATA/PG_VERSION ]] && return 0
    say "postgres: creating a cluster in $PG_DATA"
    mkdir -p "$PG_DIR"
    if ((EUID == 0)); then chown postgres:postgres "$PG_DIR"; fi
    chmod 700 "$PG_DIR"
    if ! pg_as "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8 \
        >>"$PG_LOG" 2>&1; then
        tail_log "$PG_LOG"
        die "postgres: initdb failed"
    fi
    if ! grep -q "^include_if_exists = 'worldline.conf'" "$PG_DATA/postgresql.conf"; then
        printf "\n# Settings of the worldline local stack.\ninclude_if_exists = 'worldline.conf'\n" |
            pg_as tee -a "$PG_DATA/postgresql.conf" >/dev/null
    fi
}

write_pg_config() {
    local sockdirs="''"
    if [[ -n $PG_SOCK ]]; then
        mkdir -p "$PG_SOCK"
        if ((EUID == 0)); then chown postgres:postgres "$PG_SOCK"; fi
        chmod 700 "$PG_SOCK"
        sockdirs="'$PG_SOCK'"
    fi
    pg_write "$PG_DATA/worldline.conf" 600 <<EOF
# Written by ops/local/stack.sh on every start; edits here are overwritten.
# A real database (fsync and synchronous commit on), sized for a small
# developer machine or CI box (2 cores, some GiB of RAM) shared with Kafka
# and the build.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = $sockdirs
max_connections = 200

fsync = on
synchronous_commit = on
full_page_writes = on

shared_buffers = 256MB
effective_cache_size = 4GB
work_mem = 8MB
maintenance_work_mem = 256MB
wal_buffers = 16MB
min_wal_size = 256MB
max_wal_size = 2GB
checkpoint_completion_target = 0.9
random_page_cost = 1.1
effective_io_concurrency = 100
max_worker_processes = 4
max_parallel_workers = 2
max_parallel_workers_per_gather = 1
max_parallel_maintenance_workers = 1

timezone = 'UTC'
log_timezone = 'UTC'
log_destination = 'stderr'
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
log_min_duration_statement = 1000
log_lock_waits = on
log_checkpoints = off

# The commit time of every transaction (pg_xact_commit_timestamp): the
# projection benchmark stamps when a batch became visible with it.
track_commit_timestamp = on
EOF
    pg_write "$PG_DATA/pg_hba.conf" 600 <<'EOF'
# Written by ops/local/stack.sh: trust on the unix socket and on loopback only.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 trust
host    all       all   127.0.0.1/32  trust
EOF
}

pg_up() {
    pg_locate
    if ((EUID == 0)) && ! id postgres >/dev/null 2>&1; then
        die "there is no 'postgres' OS user to run the server as (is the postgresql package installed?)"
    fi
    if [[ ! -f $PG_DATA/PG_VERSION ]]; then
        : # new cluster: PG_BIN is the newest server
    else
        find_pg_bin || die "postgres: no server binaries for version $(<"$PG_DATA/PG_VERSION") (data in $PG_DATA)"
    fi
    mkdir -p "$LOGS"
    touch "$PG_LOG"
    local pid port
    if pid=$(pg_pid); then
        port=$(recorded_port postgres || true)
        if [[ -n $port && $port != "$PG_PORT" ]]; then
            [[ -z $PG_PORT_SET ]] ||
                die "postgres is running on port $port (pid $pid); run 'stack.sh down postgres' before changing WORLDLINE_PG_PORT"
            PG_PORT=$port
        fi
        if pg_ready; then
            say "postgres: already running (pid $pid, 127.0.0.1:$PG_PORT)"
            printf '%s\n' "$PG_DATA" >"$PG_MARKER"
            return 0
        fi
    fi
    if [[ -z ${pid:-} && -f $PG_DATA/postmaster.pid ]]; then
        # The pid in it is dead or belongs to some other program now (reboot).
        warn "postgres: removing stale $PG_DATA/postmaster.pid"
        rm -f "$PG_DATA/postmaster.pid"
    fi
    if [[ -z ${pid:-} ]] && port_open "$PG_PORT"; then
        die "postgres: port 127.0.0.1:$PG_PORT is already in use by a process this stack did not start; stop it or set WORLDLINE_PG_PORT"
    fi

    pg_init
    write_pg_config
    local t0
    t0=$(now_ms)
    if [[ -n ${pid:-} ]]; then
        say "postgres: running (pid $pid) but not answering yet; waiting"
    else
        printf '\n===== %s stack.sh: starting postgres =====\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" >>"$PG_LOG"
        # Without -l the server writes to pg_ctl's stdout, this log file (opened
        # here, so the postgres user needs no access to the state dir).
        if ! pg_as "$PG_BIN/pg_ctl" start -D "$PG_DATA" -w -t "$PG_START_TIMEOUT" -s </dev/null >>"$PG_LOG" 2>&1 9>&-; then
            tail_log "$PG_LOG"
            die "postgres failed to start (log: $PG_LOG)"
        fi
        mark_started postgres
    fi
    local i
    for ((i = 0; i < PG_START_TIMEOUT * 10; i++)); do
        pg_ready && break
        sleep 0.1
    done
    pg_ready || {
        tail_log "$PG_LOG"
        die "postgres does not answer on 127.0.0.1:$PG_PORT"
    }
    printf '%s\n' "$PG_DATA" >"$PG_MARKER"
    printf '%s\n' "$PG_PORT" >"$RUN/postgres.port"
    pid=$(pg_pid || true)
    if [[ " ${STARTED[*]} " == *" postgres "* ]]; then
        say "postgres: started in $(secs "$(($(now_ms) - t0))") s (pid $pid, 127.0.0.1:$PG_PORT, $("$PG_BIN/postgres" --version))"
    fi
}

pg_down() {
    if [[ -n $EXTERNAL_DB && ! -f $PG_MARKER ]]; then
        say "postgres: external server, nothing to stop"
        return 0
    fi
    if [[ ! -f $PG_MARKER ]]; then
        say "postgres: not running (nothing to stop)"
        return 0
    fi
    PG_DATA=$(<"$PG_MARKER")
    PG_DIR=$(dirname "$PG_DATA")
    find_pg_bin || die "postgres: no server binaries found to stop $PG_DATA"
    local pid t0
    if ! pid=$(pg_pid); then
        rm -f "$PG_MARKER" "$RUN/postgres.port"
        say "postgres: not running (nothing to stop)"
        return 0
    fi
    t0=$(now_ms)
    if ! pg_as "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 60 -s >>"$PG_LOG" 2>&1; then
        tail_log "$PG_LOG"
        die "postgres: pg_ctl stop failed"
    fi
    rm -f "$PG_MARKER" "$RUN/postgres.port"
    say "postgres: stopped (pid $pid) in $(secs "$(($(now_ms) - t0))") s"
}

# ---------------------------------------------------------------- roles, database, env

# Pieces of WORLDLINE_EXTERNAL_DATABASE_URL: EXT_HOSTPORT, EXT_QUERY.
parse_external_url() {
    local re='^(postgres|postgresql)://([^@/?]*@)?([^/?]+)(/[^?]*)?(\?.*)?$'
    [[ $EXTERNAL_DB =~ $re ]] ||
        die "WORLDLINE_EXTERNAL_DATABASE_URL must look like postgres://user[:password]@host[:port]/db[?params]"
    EXT_HOSTPORT=${BASH_REMATCH[3]}
    EXT_QUERY=${BASH_REMATCH[5]}
}

# A password for the worldline roles, only for external servers (the local
# cluster trusts loopback). Kept in the state dir, mode 600.
external_password() {
    local f=$STATE/db-password
    if [[ ! -s $f ]]; then
        (
            umask 077
            head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$f"
        )
    fi
    cat "$f"
}

bootstrap_sql() {
    cat <<'EOF'
\set ON_ERROR_STOP on
SET client_min_messages = warning;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'worldline') THEN
        CREATE ROLE worldline LOGIN CREATEDB;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'worldline_reader') THEN
        CREATE ROLE worldline_reader LOGIN;
    END IF;
END
$$;
-- The writer creates a fresh database per test; the reader never writes.
SELECT 'ALTER ROLE worldline LOGIN CREATEDB'
    WHERE NOT (SELECT rolcanlogin AND rolcreatedb FROM pg_roles WHERE rolname = 'worldline') \gexec
SELECT 'ALTER ROLE worldline_reader LOGIN NOCREATEDB NOCREATEROLE'
    WHERE NOT (SELECT rolcanlogin AND NOT rolcreatedb AND NOT rolcreaterole FROM pg_roles WHERE rolname = 'worldline_reader') \gexec
SELECT 'ALTER ROLE worldline_reader SET default_transaction_read_only = on'
    WHERE NOT EXISTS (SELECT FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
                      WHERE r.rolname = 'worldline_reader' AND s.setdatabase = 0
                        AND 'default_transaction_read_only=on' = ANY (s.setconfig)) \gexec
\if :{?pw}
ALTER ROLE worldline PASSWORD :'pw';
ALTER ROLE worldline_reader PASSWORD :'pw';
\endif
SELECT 'CREATE DATABASE worldline OWNER worldline'
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'worldline') \gexec
\connect worldline
SET client_min_messages = warning;
-- Whatever worldline creates here (one schema per projector) is readable by the reader.
SELECT 'ALTER DEFAULT PRIVILEGES FOR ROLE worldline GRANT USAGE ON SCHEMAS TO worldline_reader'
    WHERE NOT EXISTS (SELECT FROM pg_default_acl WHERE defaclrole = 'worldline'::regrole
                      AND defaclobjtype = 'n' AND defaclnamespace = 0
                      AND array_to_string(defaclacl, ',') LIKE '%worldline_reader=U/%') \gexec
SELECT 'ALTER DEFAULT PRIVILEGES FOR ROLE worldline GRANT SELECT ON TABLES TO worldline_reader'
    WHERE NOT EXISTS (SELECT FROM pg_default_acl WHERE defaclrole = 'worldline'::regrole
                      AND defaclobjtype = 'r' AND defaclnamespace = 0
                      AND array_to_string(defaclacl, ',') LIKE '%worldline_reader=r/%') \gexec
SELECT 'ALTER DEFAULT PRIVILEGES FOR ROLE worldline GRANT SELECT ON SEQUENCES TO worldline_reader'
    WHERE NOT EXISTS (SELECT FROM pg_default_acl WHERE defaclrole = 'worldline'::regrole
                      AND defaclobjtype = 'S' AND defaclnamespace = 0
                      AND array_to_string(defaclacl, ',') LIKE '%worldline_reader=r/%') \gexec
EOF
}

bootstrap_database() {
    find_psql || die "psql not found"
    local -a conn args=()
    if [[ -n $EXTERNAL_DB ]]; then
        conn=("$EXTERNAL_DB")
        args=(-v "pw=$(external_password)")
    else
        conn=(-h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres)
    fi
    local out
    if ! out=$(bootstrap_sql | "$PSQL" -X -q "${conn[@]}" "${args[@]}" -f - 2>&1); then
        printf '%s\n' "$out" >&2
        die "creating the worldline roles and database failed"
    fi
    [[ -z $out ]] || printf '%s\n' "$out"
}

# export NAME=value lines: plain when the value needs no quoting, else in
# single quotes, so both shells and simple dotenv readers understand them.
env_line() {
    while (($# >= 2)); do
        if [[ $2 =~ ^[A-Za-z0-9_./:@%+=,-]*$ ]]; then
            printf 'export %s=%s\n' "$1" "$2"
        else
            printf "export %s='%s'\n" "$1" "${2//\'/\'\\\'\'}"
        fi
        shift 2
    done
}

write_env() {
    local db_base pw=""
    if [[ -n $EXTERNAL_DB ]]; then
        parse_external_url
        pw=":$(external_password)"
        db_base=$EXT_HOSTPORT
    else
        db_base=127.0.0.1:$PG_PORT
        EXT_QUERY=""
    fi
    local tmp=$ENV_FILE.tmp
    (
        umask 077
        {
            printf '# Written by ops/local/stack.sh up. Use: source %s\n' "$ENV_FILE"
            env_line \
                WORLDLINE__KAFKA__BOOTSTRAP_SERVERS "127.0.0.1:$KAFKA_PORT" \
                WORLDLINE__DATABASE__URL "postgres://worldline$pw@$db_base/worldline$EXT_QUERY" \
                WORLDLINE__DATABASE__READER_URL "postgres://worldline_reader$pw@$db_base/worldline$EXT_QUERY" \
                WORLDLINE_TEST_ADMIN_DATABASE_URL "postgres://worldline$pw@$db_base/postgres$EXT_QUERY" \
                WORLDLINE_KAFKA_LIBS "$LIBS" \
                WORLDLINE_JAVA "$JAVA" \
                WORLDLINE_STATE "$STATE"
        } >"$tmp"
    )
    mv "$tmp" "$ENV_FILE"
}

# ---------------------------------------------------------------- commands

cmd_up() {
    local p
    for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$PG_PORT"; do
        is_port "$p" || die "ports must be numbers between 1 and 65535 (got '$p')"
    done
    [[ $KAFKA_PORT != "$KAFKA_CONTROLLER_PORT" ]] || die "the Kafka broker and controller ports must differ"
    local t0
    t0=$(now_ms)
    take_lock
    if [[ -n $EXTERNAL_DB ]]; then
        parse_external_url
    else
        pg_locate
    fi
    ensure_prereqs
    ensure_libs
    : >"$RUN/last-up"

    kafka_up # launches the broker without waiting for it
    if [[ -n $EXTERNAL_DB ]]; then
        rm -f "$PG_MARKER"
        say "postgres: using the external server of WORLDLINE_EXTERNAL_DATABASE_URL"
    else
        pg_up
    fi
    bootstrap_database
    kafka_await
    write_env
    say "stack: up in $(secs "$(($(now_ms) - t0))") s; environment: source $ENV_FILE"
}

cmd_down() {
    local -a which=("$@")
    ((${#which[@]})) || which=(kafka postgres)
    take_lock
    local c
    for c in "${which[@]}"; do
        case $c in
        kafka) kafka_down ;;
        postgres) pg_down ;;
        *) die "unknown component '$c' (kafka, postgres)" ;;
        esac
    done
}

cmd_status() {
    local all=0 pid port ans
    # kafka
    port=$(recorded_port kafka || printf '%s' "$KAFKA_PORT")
    if pid=$(kafka_pid); then
        if kafka_answers "$port"; then ans="answers (metadata ok)"; else
            ans="NOT answering"
            all=1
        fi
        printf '%-9s %-8s pid %-8s 127.0.0.1:%-6s %s\n' kafka running "$pid" "$port" "$ans"
    else
        all=1
        ans=""
        if port_open "$port"; then ans="(port in use by a process this stack did not start)"; fi
        printf '%-9s %-8s pid %-8s 127.0.0.1:%-6s %s\n' kafka stopped - "$port" "$ans"
    fi
    # postgres
    if [[ -n $EXTERNAL_DB ]]; then
        find_pg_bin || true
        ans="NOT answering"
        if find_psql && "$PSQL" -X -q -t -c 'select 1' "$EXTERNAL_DB" >/dev/null 2>&1; then
            ans="answers"
        else all=1; fi
        local hp=""
        [[ $EXTERNAL_DB =~ ://([^@/?]*@)?([^/?]+) ]] && hp=${BASH_REMATCH[2]}
        printf '%-9s %-8s pid %-8s %-16s %s\n' postgres external - "$hp" "$ans"
    else
        pg_locate
        port=$(recorded_port postgres || printf '%s' "$PG_PORT")
        if pid=$(pg_pid) && find_pg_bin; then
            if pg_ready "$port"; then ans="answers (accepting connections)"; else
                ans="NOT answering"
                all=1
            fi
            printf '%-9s %-8s pid %-8s 127.0.0.1:%-6s %s\n' postgres running "$pid" "$port" "$ans"
        else
            all=1
            ans=""
            if port_open "$port"; then ans="(port in use by a process this stack did not start)"; fi
            printf '%-9s %-8s pid %-8s 127.0.0.1:%-6s %s\n' postgres stopped - "$port" "$ans"
        fi
    fi
    printf 'state: %s\n' "$STATE"
    return $((all ? 3 : 0))
}

cmd_env() {
    [[ -f $ENV_FILE ]] || die "$ENV_FILE does not exist yet; run 'ops/local/stack.sh up'"
    cat "$ENV_FILE"
}

cmd_logs() {
    local -a comps=() tail_args=()
    local n=100 follow=0
    while (($#)); do
        case $1 in
        kafka | postgres) comps+=("$1") ;;
        -f | --follow) follow=1 ;;
        -n)
            n=${2:?-n needs a number}
            shift
            ;;
        *) die "usage: stack.sh logs [kafka|postgres] [-f] [-n LINES]" ;;
        esac
        shift
    done
    ((${#comps[@]})) || comps=(kafka postgres)
    local -a files=()
    local c
    for c in "${comps[@]}"; do
        files+=("$LOGS/$c.log")
    done
    tail_args=(-n "$n")
    ((follow)) && tail_args+=(-F)
    if ((${#files[@]} == 1)); then
        [[ -e ${files[0]} ]] || die "${files[0]} does not exist yet"
        exec tail "${tail_args[@]}" "${files[0]}"
    fi
    exec tail "${tail_args[@]}" "${files[@]}"
}

# Tests and benchmarks (tests/src/lib.rs, TestEnv) make a database
# wl_test_<id> first and topics t<id>.* after it, and drop both at the end of
# a passing run; a failed or interrupted run leaves them (gigabytes, after a
# benchmark). They slow the broker and PostgreSQL for every later run, so
# benchmark figures taken beside them are not comparable. A database that
# has a session is a run still going: it and its topics are kept.
cmd_clean() {
    # Ids given: only those runs' leftovers (a test of this command must not
    # drop what other failed tests left for inspection).
    local only='[0-9a-f]{12}' arg
    for arg in "$@"; do
        [[ $arg =~ ^[0-9a-f]{12}$ ]] || die "usage: stack.sh clean [ID...] (ID: the 12 hex digits of wl_test_ID)"
    done
    (($#)) && only="($(IFS='|'; printf '%s' "$*"))"
    [[ -f $ENV_FILE ]] || die "$ENV_FILE does not exist yet; run 'ops/local/stack.sh up'"
    find_psql || die "psql not found"
    find_java || die "no Java 17+ runtime found"
    local admin bootstrap
    admin=$(sed -n "s/^export WORLDLINE_TEST_ADMIN_DATABASE_URL=//p" "$ENV_FILE" | tr -d "'")
    bootstrap=$(sed -n "s/^export WORLDLINE__KAFKA__BOOTSTRAP_SERVERS=//p" "$ENV_FILE" | tr -d "'")
    [[ -n $admin && -n $bootstrap ]] || die "$ENV_FILE names no admin database or Kafka; run 'ops/local/stack.sh up'"
    # Each test database and whether a session uses it ("t" or "f").
    local out db used dropped=0
    local -a idle=() busy=()
    out=$("$PSQL" -X -q -A -t -F ' ' -d "$admin" -c "
        SELECT datname, EXISTS (SELECT FROM pg_stat_activity a WHERE a.datname = d.datname)
          FROM pg_database d WHERE datname ~ '^wl_test_$only\$' ORDER BY 1") ||
        die "PostgreSQL did not answer (is the stack up?)"
    while read -r db used; do
        [[ -n $db ]] || continue
        if [[ $used == t ]]; then busy+=("$db"); else idle+=("$db"); fi
    done <<<"$out"
    for db in "${idle[@]}"; do
        # No FORCE: a run that connected since the listing keeps its database.
        if "$PSQL" -X -q -d "$admin" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1; then
            dropped=$((dropped + 1))
        else
            busy+=("$db")
        fi
    done
    local -a leftover=()
    out=$("$JAVA" -cp "$LIBS/*" org.apache.kafka.tools.TopicCommand \
        --bootstrap-server "$bootstrap" --list 2>>"$LOGS/clean.log") ||
        die "listing the topics failed (is the stack up? see $LOGS/clean.log)"
    local topic id keep
    while read -r topic; do
        [[ $topic =~ ^t([0-9a-f]{12})\. ]] || continue
        id=${BASH_REMATCH[1]}
        [[ $id =~ ^$only$ ]] || continue
        keep=0
        for db in "${busy[@]}"; do
            [[ $db == "wl_test_$id" ]] && keep=1
        done
        ((keep)) || leftover+=("$topic")
    done <<<"$out"
    local i
    for ((i = 0; i < ${#leftover[@]}; i += 200)); do
        local pattern
        pattern=$(printf '%s|' "${leftover[@]:i:200}" | sed 's/\./\\./g; s/|$//')
        "$JAVA" -cp "$LIBS/*" org.apache.kafka.tools.TopicCommand \
            --bootstrap-server "$bootstrap" --delete --topic "^($pattern)\$" \
            >>"$LOGS/clean.log" 2>&1 || die "deleting topics failed (see $LOGS/clean.log)"
    done
    say "clean: dropped $dropped test database(s) and ${#leftover[@]} test topic(s); kept ${#busy[@]} database(s) in use${busy:+ (${busy[*]})}"
}

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

main() {
    local cmd=${1:-}
    (($#)) && shift
    case $cmd in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    env) cmd_env "$@" ;;
    logs) cmd_logs "$@" ;;
    clean) cmd_clean "$@" ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
