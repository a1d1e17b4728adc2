#!/usr/bin/env bash
# Install what the registry tests need: Debian's `docker-registry` (the CNCF distribution registry, v2 API),
# `skopeo` (pushes the test images) and `apache2-utils` (`htpasswd` writes the registry's bcrypt password
# file). Does nothing when all are installed.
#
#   bash tests/registry/setup.sh
#
# Needs root for apt-get; without root it only reports what is missing (the tests then skip).
set -euo pipefail

log() { printf '[registry-setup] %s\n' "$*" >&2; }

PACKAGES=(docker-registry skopeo apache2-utils)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    log "present: ${PACKAGES[*]}"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    log "missing Debian packages: ${missing[*]} (run as root, or install them first)"
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists may be stale or absent (fresh containers): refresh them only when something is missing.
log "apt-get update"
apt-get update -qq
log "apt-get install ${missing[*]}"
# policy-rc.d: the docker-registry package ships a service; the tests run their own registry, so the
# package's post-install must not start one on port 5000.
POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 0755 "$POLICY"
    created_policy=1
fi
trap 'if ((created_policy)); then rm -f "$POLICY"; fi' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
log "installed: ${missing[*]}"
