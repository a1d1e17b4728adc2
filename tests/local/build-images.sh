#!/usr/bin/env bash
# Build (once) the container images of the local container backend's tests into an OCI layout:
#
#   hostile:<first 12 hex digits of the sha256 of tests/security/hostile.py>
#               the echo image (tests/cluster/images/build.sh) plus tests/security/hostile.py at /app
#
# The echo image comes from the test cluster's image cache (built there from Debian's archive with
# debootstrap; nothing is pulled from a container registry); this script builds it first when missing.
# Layout: ${GPUFN_LOCAL_IMAGE_CACHE:-$HOME/.cache/gpufn/local-images-r2}/oci. Bump the `-rN` suffix here and
# in tests/local/images.py whenever the build changes (a change of hostile.py changes the tag by itself).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
CLUSTER_LAYOUT="${GPUFN_IMAGE_CACHE:-$HOME/.cache/gpufn/images-r1}/oci"
CACHE="${GPUFN_LOCAL_IMAGE_CACHE:-$HOME/.cache/gpufn/local-images-r2}"
LAYOUT="$CACHE/oci"
HOSTILE="hostile:$(sha256sum "$REPO_ROOT/tests/security/hostile.py" | cut -c1-12)"

log() { printf '[local-image-build] %s\n' "$*" >&2; }

have_image() {
    [[ -f "$2/index.json" ]] && grep -q "\"org.opencontainers.image.ref.name\":\"$1\"" "$2/index.json"
}

have_image echo:1 "$CLUSTER_LAYOUT" || bash "$REPO_ROOT/tests/cluster/images/build.sh"
if have_image "$HOSTILE" "$LAYOUT"; then
    exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9
have_image "$HOSTILE" "$LAYOUT" && exit 0

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpufn-local-image-build.XXXXXX")"
BUILDAH=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
cleanup() {
    "${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

log "building $HOSTILE on echo:1"
# buildah 1.28 cannot name an image it pulls from an OCI layout; skopeo copies it in under a name.
skopeo --insecure-policy copy -q "oci:$CLUSTER_LAYOUT:echo:1" \
    "containers-storage:[vfs@$WORK/storage+$WORK/run]localhost/echo:1"
ctr=$("${BUILDAH[@]}" from -q localhost/echo:1)
"${BUILDAH[@]}" copy -q "$ctr" "$REPO_ROOT/tests/security/hostile.py" /app/hostile.py >/dev/null
"${BUILDAH[@]}" config --cmd '["python3", "-u", "/app/hostile.py"]' "$ctr"
"${BUILDAH[@]}" commit -q "$ctr" "localhost/$HOSTILE" >/dev/null
"${BUILDAH[@]}" push -q "localhost/$HOSTILE" "oci:$LAYOUT:$HOSTILE"
have_image "$HOSTILE" "$LAYOUT"
log "done; images in $LAYOUT"
