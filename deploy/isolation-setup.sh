#!/usr/bin/env bash
# Install what the local backend needs to isolate function instances (docs/operations.md, Security):
# `ip` (iproute2: network namespaces and veth pairs), `nsenter` and `setpriv` (util-linux: enter the
# namespace, drop to the instance's uid) and `iptables` (drop connections from instances to the host);
# and `podman` with `runc` for the container runtime (GPUFN_LOCAL_RUNTIME=podman|auto; the worker writes
# its own containers.conf, so podman needs no system-wide settings).
# Checks the commands first and does nothing when all are there.
#
#   bash deploy/isolation-setup.sh
#
# Only root can isolate instances, and only root can apt-get: without root it says so and exits 0
# (the stack then runs instances unisolated, and `make up` prints that too).
set -euo pipefail

log() { printf '[isolation-setup] %s\n' "$*" >&2; }

declare -A PACKAGE_OF=([ip]=iproute2 [nsenter]=util-linux [setpriv]=util-linux [iptables]=iptables
    [podman]=podman [runc]=runc)
missing=()
for tool in "${!PACKAGE_OF[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$tool]}")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [[ $(id -u) -ne 0 ]]; then
    log "not root: local function instances will not be isolated (missing: ${missing[*]})"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
log "apt-get install ${missing[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
