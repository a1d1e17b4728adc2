"""A real node for the test cluster: containerd and a kubelet running real containers on this machine.

``RealNode`` sets up, in this order (settings measured in ``real-cluster.md`` of the project's references):

- a Linux bridge on a private /24 chosen at random; it carries the node IP (``.1``) and is the CNI bridge
  the pods' veths attach to (host-local IPAM, the bridge as gateway, no masquerading: pod traffic never
  leaves the bridge);
- a cgroup ``/<name>`` in every cgroup v1 hierarchy (the kubelet's ``--cgroup-root``); containerd, its shims
  and the kubelet run in ``/<name>/node`` and the pods under ``/<name>/kubepods``, so killing every process
  of that subtree kills everything the node started;
- containerd in a private mount namespace, with scratch directories bound over ``/run/containerd``,
  ``/var/log``, ``/var/lib/kubelet`` and ``/var/lib/cni``, and files bound over the three ``/proc/sys``
  entries the kubelet would otherwise change on the host;
- the kubelet joining that mount namespace, registered with the GPU feature-discovery labels; once the
  node is Ready, its ``nvidia.com/gpu`` capacity is advertised by patching the node status (what the NVIDIA
  device plugin's registration amounts to for the scheduler).

``stop()`` kills every process in the cgroup subtree, removes the cgroups bottom-up (v1 hierarchies and the
v2 ``unified`` one, where runc also creates pod cgroups), deletes the bridge; the private mount namespace and
the pods' network namespaces vanish with their last process. ``reap_stale_nodes()`` does the same for nodes
whose test process died without stopping them (SIGKILL, OOM), from the ``owner.json`` each node writes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# The cgroup v2 hierarchy of a "hybrid" host: runc creates pod cgroups there too.
UNIFIED = CGROUP_ROOT / "unified"
CNI_BIN_DIR = Path("/usr/lib/cni")
# /proc/sys entries the kubelet (with --protect-kernel-defaults) checks and would otherwise set on the host,
# with the values it expects.
KERNEL_DEFAULTS = {
    "vm/overcommit_memory": "1",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
}
# Host directories the node's mount namespace covers with scratch directories of its own.
PRIVATE_DIRS = ("/run/containerd", "/var/log", "/var/lib/kubelet", "/var/lib/cni")
OWNER_FILE = "owner.json"


class NodeError(RuntimeError):
    """The real node could not be set up or did not come up."""


@dataclass(frozen=True)
class RealNodeConfig:
    """What the real node advertises.

    Attributes:
        name: Node name.
        gpus: ``nvidia.com/gpu`` capacity advertised (there is no GPU: containers get none of it).
        gpu_product: The ``nvidia.com/gpu.product`` label, as GPU feature discovery writes it.
        device_plugin: Advertise the GPUs through a device plugin (``device_plugin.py``), as a GPU node does;
            False patches the capacity into the node status instead (the fallback).
    """

    name: str = "real-node-1"
    gpus: int = 8
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    device_plugin: bool = True


def v1_hierarchies() -> list[Path]:
    """The mounted cgroup v1 hierarchies (``/sys/fs/cgroup/<controllers>``)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup" and fields[1].startswith(str(CGROUP_ROOT) + "/"):
            found.append(Path(fields[1]))
    return found


def _cgroup_dirs(name: str) -> list[Path]:
    """Every cgroup directory a node named ``name`` may have created, in all hierarchies."""
    return [h / name for h in [*v1_hierarchies(), UNIFIED]]


def _subtree_bottom_up(top: Path) -> list[Path]:
    """``top`` and its cgroup descendants, children before their parents."""
    if not top.is_dir():
        return []
    dirs = [Path(root) for root, _subdirs, _files in os.walk(top)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _pids_in(name: str) -> set[int]:
    pids: set[int] = set()
    for top in _cgroup_dirs(name):
        for cgroup in _subtree_bottom_up(top):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in (cgroup / "cgroup.procs").read_text().split())
    return pids


def kill_cgroup_tree(name: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in the ``/<name>`` cgroup subtrees, then remove the cgroups bottom-up.

    Raises:
        NodeError: Processes or cgroups were still there at ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while pids := _pids_in(name):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NodeError(f"processes {sorted(pids)} of cgroup /{name} survive SIGKILL")
        time.sleep(0.05)
    left: list[Path] = []
    for top in _cgroup_dirs(name):
        for cgroup in _subtree_bottom_up(top):
            # A cgroup is busy for a moment after its last process is reaped.
            while True:
                try:
                    cgroup.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        left.append(cgroup)
                        break
                    time.sleep(0.05)
    if left:
        raise NodeError(f"cgroups left: {left}")


def link_exists(name: str) -> bool:
    return (
        subprocess.run(["ip", "link", "show", "dev", name], capture_output=True, check=False).returncode == 0
    )


def delete_link(name: str) -> None:
    if link_exists(name):
        subprocess.run(["ip", "link", "del", "dev", name], capture_output=True, check=False)


def reap_stale_nodes(tmp_root: Path | None = None) -> list[str]:
    """Tear down the nodes of test processes that died without stopping them; return their names.

    Every node writes ``<state dir>/owner.json`` (owner PID, cgroup, bridge) under the system temporary
    directory; a node whose owner is gone has its processes killed, cgroups removed and bridge deleted.
    """
    reaped = []
    for owner_file in (tmp_root or Path(tempfile.gettempdir())).glob(f"gpufn-kube-*/node/{OWNER_FILE}"):
        try:
            owner = json.loads(owner_file.read_text())
            pid = int(owner["pid"])
        except (OSError, ValueError, KeyError):
            continue
        if pid_alive(pid):
            continue
        cluster_dir = owner_file.parent.parent
        _kill_cluster_components(cluster_dir)
        with contextlib.suppress(NodeError):
            kill_cgroup_tree(owner["cgroup"])
        delete_link(owner["bridge"])
        owner_file.unlink(missing_ok=True)
        shutil.rmtree(cluster_dir, ignore_errors=True)
        reaped.append(str(owner["cgroup"]))
    return reaped


def _kill_cluster_components(cluster_dir: Path) -> None:
    """SIGKILL the control-plane process groups a dead test process left (``components.pgids``).

    A group is killed only while its leader's command line still names ``cluster_dir``: PIDs get reused.
    """
    with contextlib.suppress(OSError):
        for pgid in (cluster_dir / "components.pgids").read_text().split():
            with contextlib.suppress(OSError, ValueError):
                cmdline = Path(f"/proc/{int(pgid)}/cmdline").read_bytes()
                if str(cluster_dir).encode() in cmdline:
                    os.killpg(int(pgid), signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pick_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no route of this machine overlaps."""
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True
    ).stdout
    taken = []
    for line in routes.splitlines():
        first = line.split()[1] if line.startswith(("local ", "broadcast ")) else line.split()[0]
        with contextlib.suppress(ValueError):
            taken.append(ipaddress.ip_network(first if first != "default" else "0.0.0.0/32", strict=False))
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return net
    raise NodeError("no free private /24 for the pod network")


class RealNode:
    """containerd + kubelet on this machine, registered with the test cluster's API server.

    Args:
        workdir: The node's state directory (created; removed by the cluster's own cleanup).
        bin_dir: Directory holding ``kubelet``.
        kubeconfig: Kubeconfig the kubelet uses (the cluster's admin one).
        registry_host: ``127.0.0.1:<port>`` of the cluster's plain-HTTP registry.
        sandbox_image: Registry reference of the pod sandbox ("pause") image.
        config: What the node advertises.
        spawn: The cluster's process starter, ``spawn(name, argv)``: logs to ``logs/<name>.log``, own
            process group, stopped with the cluster.
        subnet: The pod network (its first address is the node IP); default a random free private /24.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        bin_dir: Path,
        kubeconfig: Path,
        registry_host: str,
        sandbox_image: str,
        config: RealNodeConfig,
        spawn: Callable[[str, list[str]], subprocess.Popen[bytes]],
        subnet: ipaddress.IPv4Network | None = None,
    ) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.kubeconfig = kubeconfig
        self.registry_host = registry_host
        self.sandbox_image = sandbox_image
        self.config = config
        self._spawn = spawn
        suffix = secrets.token_hex(3)
        # Interface names have at most 15 characters.
        self.bridge = f"gpufn{suffix}"
        self.cgroup = f"gpufn-{suffix}"
        self.subnet = subnet or pick_subnet()
        self.node_ip = str(self.subnet.network_address + 1)
        self.containerd_socket = workdir / "containerd" / "containerd.sock"
        self.containerd: subprocess.Popen[bytes] | None = None
        self.kubelet: subprocess.Popen[bytes] | None = None
        # The kubelet's /var/lib/kubelet/device-plugins (fixed in 1.20), seen from the host.
        self.device_plugin_dir = self.private_dir("/var/lib/kubelet") / "device-plugins"
        self._set_up = False

    def private_dir(self, host_dir: str) -> Path:
        """The directory of the state dir bound over ``host_dir`` in the node's mount namespace."""
        return self.workdir / "private" / host_dir.strip("/").replace("/", "_")

    # --- start ---------------------------------------------------------------------------------------

    def start(self, ports: tuple[int, int, int]) -> None:
        """Create the bridge and cgroups, start containerd and the kubelet (not waiting for Ready).

        Args:
            ports: Free ports for the kubelet's API, its healthz endpoint and containerd's stream server.
        """
        kubelet_port, healthz_port, stream_port = ports
        wd = self.workdir
        wd.mkdir(parents=True, exist_ok=True)
        (wd / OWNER_FILE).write_text(
            json.dumps({"pid": os.getpid(), "cgroup": self.cgroup, "bridge": self.bridge})
        )
        self._set_up = True
        self._create_bridge()
        node_cgroups = self._create_cgroups()
        self._write_containerd_config(stream_port)
        self._write_cni_config()

        # The values the kubelet expects in /proc/sys, as files to bind over the real entries.
        binds: list[tuple[Path, str]] = []
        for entry, value in KERNEL_DEFAULTS.items():
            holder = wd / "sysctl" / entry.replace("/", "_")
            holder.parent.mkdir(parents=True, exist_ok=True)
            holder.write_text(value + "\n")
            binds.append((holder, f"/proc/sys/{entry}"))
        for host_dir in PRIVATE_DIRS:
            scratch = self.private_dir(host_dir)
            scratch.mkdir(parents=True, exist_ok=True)
            # The mount point must exist on the host; an empty directory is all that appears there.
            Path(host_dir).mkdir(parents=True, exist_ok=True)
            binds.append((scratch, host_dir))
        mounts = "; ".join(f"mount --bind '{src}' '{dst}'" for src, dst in binds)

        join = _join_cgroups_prefix(node_cgroups)
        self.containerd = self._spawn(
            "containerd",
            [
                *join,
                "unshare", "-m", "--propagation", "private", "--",
                "sh", "-ec", f'{mounts}; exec containerd --config "{wd / "containerd.toml"}"',
            ],
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.containerd_socket.exists():
            if self.containerd.poll() is not None:
                raise NodeError(f"containerd exited with {self.containerd.returncode}")
            if time.monotonic() > deadline:
                raise NodeError("containerd did not create its socket in 30 s")
            time.sleep(0.05)

        labels = {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": self.config.gpu_product,
            "nvidia.com/gpu.count": str(self.config.gpus),
        }
        kubelet_dir = wd / "kubelet"
        self.kubelet = self._spawn(
            "kubelet",
            [
                *join,
                "nsenter", "-t", str(self.containerd.pid), "-m", "--",
                str(self.bin_dir / "kubelet"),
                f"--kubeconfig={self.kubeconfig}",
                f"--hostname-override={self.config.name}",
                f"--node-labels={','.join(f'{k}={v}' for k, v in labels.items())}",
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{self.containerd_socket}",
                "--runtime-request-timeout=2m",
                "--cgroup-driver=cgroupfs",
                f"--cgroup-root=/{self.cgroup}",
                "--fail-swap-on=false",
                f"--node-ip={self.node_ip}",
                f"--address={self.node_ip}",
                f"--port={kubelet_port}",
                "--healthz-bind-address=127.0.0.1",
                f"--healthz-port={healthz_port}",
                "--read-only-port=0",
                # Lowering oom_score_adj is refused here (no CAP_SYS_RESOURCE).
                "--oom-score-adj=0",
                # Check the /proc/sys values (bound above) instead of changing the host's.
                "--protect-kernel-defaults=true",
                f"--root-dir={kubelet_dir}",
                f"--cert-dir={kubelet_dir / 'pki'}",
                f"--volume-plugin-dir={kubelet_dir / 'volume-plugins'}",
                # A shared machine: do not evict pods because other work uses memory or disk.
                "--eviction-hard=memory.available<50Mi,nodefs.available<1%,imagefs.available<1%",
                "--image-gc-high-threshold=100",
                "--serialize-image-pulls=false",
                "--node-status-update-frequency=4s",
                "--v=1",
            ],
        )  # fmt: skip

    def _create_bridge(self) -> None:
        gateway = f"{self.node_ip}/{self.subnet.prefixlen}"
        for argv in (
            ["ip", "link", "add", "name", self.bridge, "type", "bridge"],
            ["ip", "addr", "add", gateway, "dev", self.bridge],
            ["ip", "link", "set", "dev", self.bridge, "up"],
        ):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise NodeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")

    def _create_cgroups(self) -> list[Path]:
        """Create ``/<name>`` and ``/<name>/node`` in every v1 hierarchy; return their ``cgroup.procs``."""
        procs = []
        for hierarchy in v1_hierarchies():
            for cgroup in (hierarchy / self.cgroup, hierarchy / self.cgroup / "node"):
                cgroup.mkdir(exist_ok=True)
                if hierarchy.name.split(",").count("cpuset"):
                    # A new cpuset cgroup has no CPUs or memory nodes: a process cannot join it until set.
                    for knob in ("cpuset.cpus", "cpuset.mems"):
                        (cgroup / knob).write_text((cgroup.parent / knob).read_text())
            procs.append(hierarchy / self.cgroup / "node" / "cgroup.procs")
        return procs

    def _write_containerd_config(self, stream_port: int) -> None:
        wd = self.workdir
        certs = wd / "containerd" / "certs.d" / self.registry_host
        certs.mkdir(parents=True, exist_ok=True)
        # The local registry speaks plain HTTP.
        certs.joinpath("hosts.toml").write_text(
            f'server = "http://{self.registry_host}"\n\n'
            f'[host."http://{self.registry_host}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (wd / "containerd.toml").write_text(
            f"""version = 2
root = "{wd / "containerd" / "root"}"
state = "{wd / "containerd" / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{self.containerd_socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{wd / "containerd" / "opt"}"

[{cri}]
  sandbox_image = "{self.sandbox_image}"
  # Lowering oom_score_adj is refused on this kind of machine; without this every sandbox fails.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_hugetlb_controller = true
  tolerate_missing_hugetlb_controller = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "{stream_port}"

[{cri}.containerd]
  default_runtime_name = "runc"
  snapshotter = "overlayfs"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{wd / "cni"}"

[{cri}.registry]
  config_path = "{wd / "containerd" / "certs.d"}"
"""
        )

    def _write_cni_config(self) -> None:
        (self.workdir / "cni").mkdir(exist_ok=True)
        hosts = list(self.subnet.hosts())
        conflist = {
            "cniVersion": "0.4.0",
            "name": "gpufn-pods",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    # Pods talk to the host and each other over the bridge only: no NAT to anywhere else.
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [
                            [
                                {
                                    "subnet": str(self.subnet),
                                    "rangeStart": str(hosts[9]),
                                    "gateway": self.node_ip,
                                }
                            ]
                        ],
                        "routes": [{"dst": str(self.subnet)}],
                        "dataDir": str(self.workdir / "cni-ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }
        (self.workdir / "cni" / "10-gpufn.conflist").write_text(json.dumps(conflist, indent=2))

    # --- stop ----------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the kubelet, then containerd, kill what is left (pods, shims), remove cgroups and bridge."""
        if not self._set_up:
            return
        self._set_up = False
        for proc in (self.kubelet, self.containerd):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        errors = []
        try:
            kill_cgroup_tree(self.cgroup)
        except NodeError as exc:
            errors.append(str(exc))
        for proc in (self.kubelet, self.containerd):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        delete_link(self.bridge)
        (self.workdir / OWNER_FILE).unlink(missing_ok=True)
        if errors:
            raise NodeError("; ".join(errors))


def _join_cgroups_prefix(procs_files: list[Path]) -> list[str]:
    """argv prefix that moves the process into the given cgroups, then execs the rest of the argv."""
    script = 'for f in $GPUFN_CGROUP_PROCS; do echo $$ > "$f"; done; exec "$@"'
    return ["env", f"GPUFN_CGROUP_PROCS={' '.join(map(str, procs_files))}", "sh", "-c", script, "sh"]
