#!/usr/bin/env bash
# Build gpufn's own image from deploy/Dockerfile (buildah, on the debootstrap base of images/build.sh) into
# an OCI layout, tagged with a hash of its inputs, unless that tag is there already:
#
#   bash tests/cluster/images/build-gpufn.sh TAG
#
# TAG is what tests/cluster/images.py computes (`gpufn_image_tag()`): a hash of the Dockerfile, pyproject.toml
# and every file the image copies, so any code change builds a new image; unchanged code reuses the cached one.
# The Python packages come from a wheel directory downloaded once from the machine's package index (pip's own
# configuration: the local mirror here) with the running Python (3.11, as Debian bookworm's), mounted into
# the build at /wheels: the build itself needs no network but Debian's mirror (apt-get install python3).
#
# Layout: ${GPUFN_GPUFN_IMAGE_CACHE:-$HOME/.cache/gpufn/gpufn-image-r1}/oci; wheels next to it.
# Knobs: GPUFN_KUBE_PYTHON (the Python whose pip downloads the wheels, default python3; images.py passes
# the test's own), GPUFN_GPUFN_IMAGE_CACHE (cache directory).
set -euo pipefail

TAG="$1"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../../.." && pwd)"
CACHE="${GPUFN_GPUFN_IMAGE_CACHE:-$HOME/.cache/gpufn/gpufn-image-r1}"
BASE_LAYOUT="${GPUFN_IMAGE_CACHE:-$HOME/.cache/gpufn/images-r1}/oci"
LAYOUT="$CACHE/oci"
PYTHON="${GPUFN_KUBE_PYTHON:-python3}"
# The files the Dockerfile copies (the build context is staged from them alone).
CONTEXT_FILES=(pyproject.toml README.md workflows activities api gpufn worker.py examples)

log() { printf '[gpufn-image] %s\n' "$*" >&2; }

have_tag() {
    [[ -f "$LAYOUT/index.json" ]] && grep -q "\"org.opencontainers.image.ref.name\":\"$TAG\"" "$LAYOUT/index.json"
}

if have_tag; then
    log "gpufn:$TAG present in $LAYOUT"
    exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9
if have_tag; then
    log "gpufn:$TAG present in $LAYOUT"
    exit 0
fi
bash "$HERE/build.sh"
START=$SECONDS

# Wheels: keyed by the dependency list, so a code change reuses them.
DEPS_KEY=$("$PYTHON" - "$REPO_ROOT/pyproject.toml" <<'PY'
import hashlib, sys, tomllib
data = tomllib.load(open(sys.argv[1], "rb"))
names = data["project"]["dependencies"] + data["build-system"]["requires"]
print(hashlib.sha256("\n".join(names).encode()).hexdigest()[:16])
PY
)
WHEELS="$CACHE/wheels-$DEPS_KEY"
if [[ ! -f "$WHEELS/.complete" ]]; then
    log "downloading wheels into $WHEELS"
    rm -rf "$WHEELS"
    mkdir -p "$WHEELS"
    "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "the wheels must match the image'"'"'s Python 3.11"'
    "$PYTHON" - "$REPO_ROOT/pyproject.toml" >"$WHEELS/requirements.txt" <<'PY'
import sys, tomllib
data = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join(data["project"]["dependencies"] + data["build-system"]["requires"]))
PY
    "$PYTHON" -m pip wheel -q --wheel-dir "$WHEELS" -r "$WHEELS/requirements.txt"
    touch "$WHEELS/.complete"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpufn-image-build.XXXXXX")"
BUILDAH=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
cleanup() {
    "${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir "$WORK/context"
for f in "${CONTEXT_FILES[@]}"; do
    cp -r "$REPO_ROOT/$f" "$WORK/context/"
done
find "$WORK/context" -name __pycache__ -type d -prune -exec rm -rf {} +
cp "$REPO_ROOT/deploy/Dockerfile" "$WORK/Dockerfile"

# The base goes straight into buildah's storage (a `buildah pull` of an oci: path names the image after it).
skopeo --insecure-policy copy -q "oci:$BASE_LAYOUT:gpufn-base:bookworm" \
    "containers-storage:[vfs@$WORK/storage+$WORK/run]localhost/gpufn-base:bookworm"
log "building gpufn:$TAG from deploy/Dockerfile"
"${BUILDAH[@]}" bud -q --isolation chroot --pull-never \
    --build-arg BASE=localhost/gpufn-base:bookworm \
    --build-arg "PIP_INSTALL_OPTIONS=--no-index --find-links /wheels" \
    --volume "$WHEELS:/wheels:ro" \
    -t "localhost/gpufn:$TAG" -f "$WORK/Dockerfile" "$WORK/context" >"$WORK/build.log" 2>&1 || {
    tail -40 "$WORK/build.log" >&2
    exit 1
}
"${BUILDAH[@]}" push -q "localhost/gpufn:$TAG" "oci:$LAYOUT:$TAG"
have_tag
log "done in $((SECONDS - START)) s; gpufn:$TAG in $LAYOUT"
