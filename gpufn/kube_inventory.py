"""What a Kubernetes cluster offers as a cluster group: its GPU nodes, read from node labels and capacity.

Each configured kubeconfig is one cluster group, named after the cluster of its current context. GPU
feature discovery (part of NVIDIA's GPU operator) labels every GPU node with `nvidia.com/gpu.product`
(e.g. `NVIDIA-H100-80GB-HBM3`), and the device plugin advertises `nvidia.com/gpu` in its capacity. The
group's GPUs are the short names of those products (`H100`), and its instance types are
`<GROUP>.GPU.<GPU>_<n>x` for n in 1, 2, 4, 8 up to the largest node of that GPU. Both the API (which lists
and validates against them) and the worker (which steers pods to nodes) use this module.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from kubernetes import client, config
from urllib3.exceptions import InsecureRequestWarning

from gpufn.cluster_groups import ClusterGroups
from gpufn.inventory import LOCAL_CLUSTER_GROUP, short_gpu_name

log = logging.getLogger(__name__)

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
INSTANCE_SIZES = (1, 2, 4, 8)
DEFAULT_REFRESH_SECONDS = 30.0
REQUEST_TIMEOUT = (5.0, 20.0)
"""(connect, read) seconds of every API call, so that an unreachable cluster never hangs a thread."""
CONNECTION_POOL_SIZE = 32

JSON = dict[str, Any]
T = TypeVar("T")


class KubeconfigError(ValueError):
    """A kubeconfig cannot be read, or names a cluster another kubeconfig already serves."""


def api_client(kubeconfig: Path) -> client.ApiClient:
    """Return an API client for the current context of `kubeconfig`; nothing global is touched.

    Refreshed credentials (exec plugins, OIDC) are never written back to the file.
    """
    configuration = client.Configuration()
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    # One quick retry (a stale pooled connection); anything longer is the caller's (Temporal's) business.
    configuration.retries = 1
    try:
        api = config.new_client_from_config(
            config_file=str(kubeconfig), persist_config=False, client_configuration=configuration
        )
    except (OSError, config.ConfigException) as err:
        raise KubeconfigError(f"Cannot use kubeconfig {kubeconfig}: {err}") from err
    if not configuration.verify_ssl:
        # The kubeconfig asks for it (insecure-skip-tls-verify): say so once, not on every request.
        host = urlsplit(configuration.host).hostname or ""
        log.warning("TLS certificates of %s are not verified (kubeconfig %s)", configuration.host, kubeconfig)
        warnings.filterwarnings(
            "ignore",
            message=f"Unverified HTTPS request is being made to host '{re.escape(host)}'",
            category=InsecureRequestWarning,
        )
    return api


def cluster_group_name(kubeconfig: Path) -> str:
    """Return the cluster group name of a kubeconfig: its current context's cluster, made URL- and label-safe.

    Raises:
        KubeconfigError: The file is unreadable or has no current context.
    """
    try:
        _, current = config.list_kube_config_contexts(config_file=str(kubeconfig))
    except (OSError, config.ConfigException) as err:
        raise KubeconfigError(f"Cannot read kubeconfig {kubeconfig}: {err}") from err
    cluster = str((current or {}).get("context", {}).get("cluster") or "")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", cluster).strip("-._")
    if not name:
        raise KubeconfigError(f"Kubeconfig {kubeconfig} has no current context with a cluster")
    return name


def cluster_group_names(kubeconfigs: Sequence[Path]) -> list[str]:
    """Return the group name of each kubeconfig, refusing two of one name, or a name taken by `local`."""
    names = [cluster_group_name(path) for path in kubeconfigs]
    for path, name in zip(kubeconfigs, names, strict=True):
        if name == LOCAL_CLUSTER_GROUP:
            raise KubeconfigError(f"Kubeconfig {path} names cluster '{name}', the name of the local group")
    for name in set(names):
        paths = [str(p) for p, n in zip(kubeconfigs, names, strict=True) if n == name]
        if len(paths) > 1:
            raise KubeconfigError(f"Kubeconfigs {', '.join(paths)} all name cluster '{name}'")
    return names


def instance_type_name(group: str, gpu: str, count: int) -> str:
    """Return the instance type of `count` GPUs of `gpu` in a cluster group, e.g. PROD.GPU.H100_2x."""
    return f"{group.upper()}.GPU.{gpu}_{count}x"


def parse_instance_type(group: str, instance_type: str) -> tuple[str, int] | None:
    """Return (gpu, count) of one of the group's instance types, or None when it is not one of them."""
    match = re.fullmatch(re.escape(group.upper()) + r"\.GPU\.(.+)_(\d+)x", instance_type)
    if match is None or int(match.group(2)) < 1:
        return None
    return match.group(1), int(match.group(2))


@dataclass(frozen=True)
class GpuNode:
    """One node with NVIDIA GPUs, as its labels and status describe it."""

    name: str
    product: str
    """The `nvidia.com/gpu.product` label, e.g. NVIDIA-H100-80GB-HBM3."""
    gpu: str
    """NVCF's short GPU name, e.g. H100."""
    gpus: int
    """Allocatable `nvidia.com/gpu`."""
    schedulable: bool
    """Ready and not cordoned."""


def _quantity(value: Any) -> int:
    try:
        return int(str(value or "0"))
    except ValueError:
        return 0


def gpu_nodes(nodes: list[JSON]) -> list[GpuNode]:
    """Return the GPU nodes among nodes in the API's JSON form (labelled by GPU feature discovery)."""
    found = []
    for node in nodes:
        labels = node.get("metadata", {}).get("labels") or {}
        product = labels.get(GPU_PRODUCT_LABEL)
        status = node.get("status") or {}
        allocatable = (status.get("allocatable") or status.get("capacity") or {}).get(GPU_RESOURCE)
        count = _quantity(allocatable)
        if not product or count < 1:
            continue
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        cordoned = bool((node.get("spec") or {}).get("unschedulable"))
        found.append(
            GpuNode(
                name=node["metadata"]["name"],
                product=product,
                gpu=short_gpu_name(product),
                gpus=count,
                schedulable=ready and not cordoned,
            )
        )
    return found


def products_of(nodes: list[GpuNode], gpu: str) -> list[str]:
    """Return the `nvidia.com/gpu.product` values whose short name is `gpu`, sorted."""
    return sorted({n.product for n in nodes if n.gpu == gpu})


def cluster_group(name: str, nodes: list[GpuNode], k8s_version: str | None) -> JSON:
    """Return the cluster group of one cluster in NVCF's `clusterGroups[]` shape."""
    entries: list[JSON] = []
    for gpu in sorted({n.gpu for n in nodes}):
        mine = [n for n in nodes if n.gpu == gpu]
        largest = max(n.gpus for n in mine)
        capacity = sum(n.gpus for n in mine if n.schedulable)
        sizes = [s for s in INSTANCE_SIZES if s <= largest]
        entries.append(
            {
                "name": gpu,
                "capacity": capacity,
                "instanceTypes": [
                    {
                        "name": instance_type_name(name, gpu, size),
                        "description": f"{size} {gpu} GPU{'s' if size > 1 else ''} on one node of {name}",
                        "default": size == 1,
                    }
                    for size in sizes
                ],
            }
        )
    return {
        "id": name,
        "name": name,
        "ncaId": None,
        "authorizedNcaIds": ["*"],
        "gpus": entries,
        "clusters": [{"id": name, "name": name, "k8sVersion": k8s_version}],
    }


def read_json(fn: Any, *args: Any, **kwargs: Any) -> JSON:
    """Call a `kubernetes` client read or list method and return the API's raw JSON (camelCase)."""
    response = fn(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
    try:
        data: JSON = json.loads(response.data)
    finally:
        response.release_conn()
    return data


class ClusterInventory:
    """Reads the GPU nodes of one cluster (blocking calls: run them off the event loop where it matters)."""

    def __init__(self, kubeconfig: Path, name: str | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.name = name or cluster_group_name(kubeconfig)
        self._client = api_client(kubeconfig)
        self._core = client.CoreV1Api(self._client)
        self._version: str | None = None

    def nodes(self) -> list[GpuNode]:
        """Return the cluster's GPU nodes now."""
        return gpu_nodes(read_json(self._core.list_node)["items"])

    def group(self) -> JSON:
        """Return the cluster group as the cluster's nodes describe it now."""
        nodes = self.nodes()
        if self._version is None:
            version = read_json(client.VersionApi(self._client).get_code)
            self._version = str(version.get("gitVersion") or "") or None
        return cluster_group(self.name, nodes, self._version)

    def empty_group(self) -> JSON:
        """Return the group with no GPUs (the cluster was unreachable)."""
        return cluster_group(self.name, [], self._version)

    def close(self) -> None:
        """Close the API client's connections."""
        self._client.close()


class KubeClusterGroups(ClusterGroups):
    """Cluster groups that include Kubernetes clusters, whose nodes are re-read every `refresh_seconds`.

    A refresh runs in a background thread when a read finds the data older than `refresh_seconds`, so a
    request never waits for a cluster (it gets the data of the last refresh). A cluster that cannot be
    reached keeps its last known GPUs; one never reached shows none.
    """

    def __init__(
        self,
        static_groups: list[JSON],
        inventories: list[ClusterInventory],
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
    ) -> None:
        super().__init__(groups=list(static_groups))
        self._static = list(static_groups)
        self._inventories = inventories
        self._known: dict[str, JSON] = {}
        self._refresh_seconds = refresh_seconds
        self._refreshed_at = float("-inf")
        self._lock = threading.Lock()
        self._refreshing = False

    def refresh(self) -> None:
        """Re-read every cluster's nodes now (blocking)."""
        for inventory in self._inventories:
            try:
                self._known[inventory.name] = inventory.group()
            except Exception as err:
                # Any failure of one cluster (unreachable, 5xx, expired credentials) must not hide the
                # others, nor fail the request that triggered the refresh.
                log.warning("Cannot read the nodes of cluster %s: %s", inventory.name, err)
                self._known.setdefault(inventory.name, inventory.empty_group())
        self.groups = self._static + [self._known[i.name] for i in self._inventories]
        self._refreshed_at = time.monotonic()

    def _refresh_if_stale(self) -> None:
        with self._lock:
            if self._refreshing or time.monotonic() - self._refreshed_at < self._refresh_seconds:
                return
            self._refreshing = True

        def run() -> None:
            try:
                self.refresh()
            finally:
                with self._lock:
                    self._refreshing = False

        threading.Thread(target=run, name="gpufn-kube-inventory", daemon=True).start()

    def as_json(self) -> dict[str, Any]:
        """Return the body of `GET /v2/nvcf/clusterGroups`."""
        self._refresh_if_stale()
        return super().as_json()

    def resolve(self, gpu: str, instance_type: str, backend: str | None, clusters: list[str] | None) -> str:
        """Return the name of the cluster group that serves the spec, or raise InvalidPlacementError."""
        self._refresh_if_stale()
        return super().resolve(gpu, instance_type, backend, clusters)


def kube_cluster_groups(
    static_groups: list[JSON], kubeconfigs: Sequence[Path], refresh_seconds: float = DEFAULT_REFRESH_SECONDS
) -> ClusterGroups:
    """Return the cluster groups of `static_groups` plus one per kubeconfig, read once now."""
    if not kubeconfigs:
        return ClusterGroups(groups=list(static_groups))
    names = cluster_group_names(kubeconfigs)
    taken = {str(g["name"]) for g in static_groups}
    for name in names:
        if name in taken:
            raise KubeconfigError(f"Cluster group name '{name}' is already taken")
    inventories = [ClusterInventory(path, name) for path, name in zip(kubeconfigs, names, strict=True)]
    groups = KubeClusterGroups(static_groups, inventories, refresh_seconds)
    groups.refresh()
    return groups
