# shellcheck shell=bash
# Sourced by the benchmark scripts: moves to the repository root, brings the
# local stack up (idempotent: a stack that is already up stays as it is) and
# loads its connection settings, unless WORLDLINE__* variables are set already.
# Sets ROOT and STATE.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1

ops/local/stack.sh up >/dev/null
STATE=${WORLDLINE_STATE:-$ROOT/.worldline}
if [[ -f $STATE/env ]]; then
    # shellcheck source=/dev/null
    source "$STATE/env"
fi
