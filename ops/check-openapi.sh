#!/usr/bin/env bash
# Property-based check of a running query API against its own OpenAPI document,
# with schemathesis (PyPI): every documented operation is called with generated
# valid and invalid inputs, and every response must match the document (status,
# content type, headers, body schema), with no 5xx ever.
#
# Starts nothing itself: point it at a server that is already running, e.g.
#   worldline serve            (settings pointing at a filled database)
#   ops/check-openapi.sh http://127.0.0.1:8080
#
# Usage: ops/check-openapi.sh <base-url | port> [extra schemathesis args...]
# Env:   SCHEMATHESIS   the schemathesis executable (default: the one `ops/dev test`
#                       installs, ~/.cache/worldline/schemathesis-venv, else PATH)
#        SEED           hypothesis seed (default 1, so a run is reproducible)
#        MAX_EXAMPLES   examples per operation in the fuzzing phase (default 50)
set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

target=$1
shift
if [[ $target =~ ^[0-9]+$ ]]; then
    target="http://127.0.0.1:${target}"
fi
target=${target%/}

installed=${HOME:-/root}/.cache/worldline/schemathesis-venv/bin/schemathesis
if [[ -z ${SCHEMATHESIS:-} && -x $installed ]]; then
    SCHEMATHESIS=$installed
fi
schemathesis=${SCHEMATHESIS:-schemathesis}
if ! command -v "$schemathesis" >/dev/null 2>&1; then
    echo "schemathesis not found; 'ops/dev test' installs the pinned one" \
        "(or: pip install -r ops/schemathesis-requirements.txt)" >&2
    exit 2
fi

# --checks all: includes negative_data_rejection (invalid input must be a 4xx)
# and positive_data_acceptance (valid input must not be rejected), which is why
# the document states every parameter's exact pattern and bounds.
exec "$schemathesis" --config-file "$(dirname "$0")/schemathesis.toml" run "${target}/openapi.json" \
    --checks all \
    --seed "${SEED:-1}" \
    --max-examples "${MAX_EXAMPLES:-50}" \
    --no-color \
    "$@"
