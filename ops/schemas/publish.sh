#!/usr/bin/env bash
# Refreshes the published baseline of the event contract,
# schemas/published/worldline-v1.binpb: a buf image of schemas/proto as released.
#
#   ops/schemas/publish.sh           rebuild the image (after checking lint and breaking)
#   ops/schemas/publish.sh --check   only say whether the image is up to date (exit 1 if not)
#
# CI runs `buf breaking schemas --against schemas/published/worldline-v1.binpb`, so
# the image is what "compatible" is measured against, independent of git history.
# Run this on a deliberate release of the schemas, never to make a failing
# `buf breaking` pass: it refuses when the current schemas break the published
# ones. A truly incompatible contract is a new package (worldline.v2) with its
# own image.
#
# buf comes from npm (@bufbuild/buf, pinned below; keep it equal to the version
# in .ci/run). --prefer-offline uses the npm cache when it has that version, so
# the script also works without network once buf has been fetched.
set -euo pipefail

BUF_VERSION=${BUF_VERSION:-1.75.0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=schemas/published/worldline-v1.binpb

buf() { npx --yes --prefer-offline "@bufbuild/buf@$BUF_VERSION" "$@"; }

die() {
    printf 'publish: error: %s\n' "$*" >&2
    exit 1
}

command -v npx >/dev/null 2>&1 || die "npx (Node.js) is needed to run buf"
cd "$ROOT"

buf lint schemas || die "buf lint failed; fix the schemas first"

fresh=$(mktemp --suffix=.binpb)
trap 'rm -f "$fresh"' EXIT
buf build schemas -o "$fresh"

if [[ ${1:-} == --check ]]; then
    if [[ -f $IMAGE ]] && cmp -s "$fresh" "$IMAGE"; then
        printf 'publish: %s is up to date\n' "$IMAGE"
        exit 0
    fi
    printf 'publish: %s differs from schemas/proto (run ops/schemas/publish.sh to release)\n' "$IMAGE"
    exit 1
fi

if [[ -f $IMAGE ]]; then
    buf breaking schemas --against "$IMAGE" ||
        die "the current schemas break the published ones; make the change compatible instead of publishing it"
fi
mkdir -p "$(dirname "$IMAGE")"
cp "$fresh" "$IMAGE"
printf 'publish: wrote %s (%s bytes); commit it with the schema change it releases\n' \
    "$IMAGE" "$(wc -c <"$IMAGE")"
