#!/usr/bin/env bash
# Build (once) the container images of the test cluster into an OCI layout in a cache directory:
#
#   gpufn-base:bookworm   Debian bookworm made with `debootstrap --variant=minbase` from Debian's mirror
#   echo:1                examples/echo/Containerfile on that base (python3 + aiohttp from Debian); it also
#                         streams (server-sent events), so it is the streaming example too
#
# Nothing is pulled from a container registry: the base comes from Debian's package archive. The harness
# copies the images it needs from the layout into the cluster's own local registry (skopeo) at boot.
# Layout: ${GPUFN_IMAGE_CACHE:-$HOME/.cache/gpufn/images-r1}/oci (tags as above). The `-rN` suffix is the cache
# version: bump it here and in tests/cluster/images.py whenever an image changes.
#
# Knobs: GPUFN_IMAGE_CACHE (cache directory), GPUFN_DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

CACHE="${GPUFN_IMAGE_CACHE:-$HOME/.cache/gpufn/images-r1}"
MIRROR="${GPUFN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
LAYOUT="$CACHE/oci"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../../.." && pwd)"
IMAGES=(gpufn-base:bookworm echo:1)

log() { printf '[image-build] %s\n' "$*" >&2; }

# have_image TAG: whether the OCI layout holds an image tagged TAG.
have_image() {
    [[ -f "$LAYOUT/index.json" ]] && grep -q "\"org.opencontainers.image.ref.name\":\"$1\"" "$LAYOUT/index.json"
}

have_all_images() {
    local i
    for i in "${IMAGES[@]}"; do have_image "$i" || return 1; done
}

apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) -ne 0 ]]; then
        log "missing Debian packages: ${missing[*]} (run as root or install them first)"
        exit 1
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# skopeo copies the images into the cluster's registry at every boot.
apt_install skopeo
if have_all_images; then
    log "images present in $LAYOUT"
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9
if have_all_images; then
    log "images present in $LAYOUT"
    exit 0
fi
apt_install debootstrap buildah
START=$SECONDS
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpufn-image-build.XXXXXX")"
# buildah's own storage lives in the scratch directory (vfs: no overlay mounts to leave behind).
BUILDAH=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
cleanup() {
    "${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if ! have_image gpufn-base:bookworm; then
    log "debootstrap --variant=minbase bookworm from $MIRROR"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
        tail -30 "$WORK/debootstrap.log" >&2
        exit 1
    }
    # Package caches are dead weight in every image built on the base.
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -cf "$WORK/rootfs.tar" .
    rm -rf "$WORK/rootfs"
    ctr=$("${BUILDAH[@]}" from scratch)
    # buildah add unpacks a local tar archive at the destination.
    "${BUILDAH[@]}" add "$ctr" "$WORK/rootfs.tar" / >/dev/null
    rm -f "$WORK/rootfs.tar"
    # Without PATH, containers fail with "executable file not found in $PATH".
    "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash "$ctr"
    "${BUILDAH[@]}" commit -q "$ctr" localhost/gpufn-base:bookworm >/dev/null
    "${BUILDAH[@]}" push -q localhost/gpufn-base:bookworm "oci:$LAYOUT:gpufn-base:bookworm"
else
    "${BUILDAH[@]}" pull -q "oci:$LAYOUT:gpufn-base:bookworm" >/dev/null
    "${BUILDAH[@]}" tag "$("${BUILDAH[@]}" images -q | head -1)" localhost/gpufn-base:bookworm
fi

if ! have_image echo:1; then
    log "building echo:1 from examples/echo/Containerfile"
    "${BUILDAH[@]}" bud -q --isolation chroot --pull-never -t localhost/echo:1 \
        -f "$REPO_ROOT/examples/echo/Containerfile" "$REPO_ROOT/examples/echo" >/dev/null
    "${BUILDAH[@]}" push -q localhost/echo:1 "oci:$LAYOUT:echo:1"
fi

have_all_images
log "done in $((SECONDS - START)) s; images in $LAYOUT"
