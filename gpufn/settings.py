"""Settings shared by the stack, the worker and the API, read from `GPUFN_*` environment variables."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ADMIN_KEY_FILE = "admin.key"
SECRET_KEY_FILE = "secret.key"


class Settings(BaseSettings):
    """Every knob of gpufn; each field is the environment variable `GPUFN_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="GPUFN_", env_ignore_empty=True, extra="ignore")

    home: Path = Path(".gpufn")
    """State directory: Temporal's SQLite file, keys, instance logs."""
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    temporal_port: int = 7233
    ui_port: int = 8233
    temporal_address: str | None = None
    """host:port of the Temporal frontend; defaults to the embedded dev server on temporal_port."""
    temporal_namespace: str = "default"
    task_queue: str = "gpufn"
    admin_key: str | None = None
    """Bootstrap admin API key; when unset one is generated once and kept in the state directory."""
    admin_account: str = "gpufn-admin"
    secret_key: str | None = None
    """Key sealing function secrets (urlsafe base64 of 32 bytes); generated once when unset."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    gateway_urls: list[str] = Field(default_factory=list)
    """Base URLs of every API replica, which the worker asks for load and drain state."""
    local_cpu_slots: int = 8
    """How many CPU pseudo-GPU instances the local backend runs at once."""
    local_gpus: str | None = None
    """Override GPU discovery for the local backend, e.g. "H100,H100" (default: NVML)."""
    local_instance_network: str = "10.213.0.0/16"
    """Private range of the local backend's per-instance networks (a /30 each; root only)."""
    local_instance_uid_base: int = 1_640_000
    """First uid of the range the local backend runs instances as, one uid per slot (root only)."""
    local_instance_dir: Path | None = None
    """Parent of the instances' private directories (default: `gpufn-instances` in the temp directory)."""
    local_runtime: Literal["auto", "process", "podman"] = "process"
    """How the local backend runs an instance: `process` (its containerArgs as a command line), `podman`
    (the version's containerImage; needs root and podman) or `auto` (podman where it can run, else
    process); docs/operations.md, Security."""
    local_oci_runtime: str = "runc"
    """The OCI runtime podman runs the local backend's containers with (crun cannot run on hybrid cgroups)."""
    instance_start_timeout: float = 600.0
    """Seconds an instance may take to pass its first health check before it counts as failed."""
    deploy_timeout: float = 900.0
    """Seconds a deployment may stay DEPLOYING before it ends in ERROR."""
    routes_poll_interval: float = 0.25
    """Seconds between a gateway's checks of visibility for changed routes."""
    result_ttl: float = 3600.0
    """Seconds a finished invocation's result waits for its poll."""
    result_memory_bytes: int = 512 * 1024 * 1024
    """Memory bound for finished results waiting for their poll."""
    max_queue_depth: int = 10_000
    """Requests a version's queue holds before invocations answer 429."""
    kubeconfigs: list[Path] = Field(default_factory=list)
    """Kubeconfig files; each cluster becomes a cluster group served by the Kubernetes backend."""
    kube_namespace_prefix: str = "gpufn-"
    """Kubernetes namespaces of function objects are `<prefix><account>`."""
    kube_image_pull_timeout: float = 60.0
    """Seconds an image pull (or a container config error) may keep failing before the instance fails."""
    kube_unschedulable_timeout: float = 600.0
    """Seconds a pod may stay unschedulable (e.g. not enough free GPUs) before the instance fails."""
    kube_crash_loop_restarts: int = 3
    """Container crashes after which the instance fails."""
    kube_termination_grace_seconds: int = 30
    """The pods' terminationGracePeriodSeconds."""
    kube_runtime_class: str | None = None
    """runtimeClassName of function pods (e.g. `nvidia`), when the cluster needs one for GPUs."""
    kube_run_as_user: int = 1000
    """uid and gid of function containers (with runAsNonRoot); 0: the image's own user, root allowed."""
    kube_network_policy: bool = True
    """Give every namespace gpufn makes a NetworkPolicy that isolates its pods (docs/kubernetes.md)."""
    kube_gateway_namespace: str | None = None
    """Namespace of gpufn's API pods when they run in the cluster (default: the worker's own namespace)."""
    kube_gateway_cidrs: list[str] = Field(default_factory=list)
    """Addresses gateways outside the cluster call function pods from (NetworkPolicy ingress)."""
    kube_egress_denied_cidrs: list[str] = Field(
        default_factory=lambda: [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "169.254.0.0/16",
            "fc00::/7",
            "fe80::/10",
        ]
    )
    """Addresses function pods may not reach (beyond their own namespace and DNS): the platform's networks."""
    kube_inventory_refresh: float = 30.0
    """Seconds between the API's reads of the clusters' nodes (GPUs and instance types)."""
    registry_credentials: dict[str, dict[str, str]] = Field(default_factory=dict)
    """Registry host[:port] -> {"username", "password"}, for resolving images and charts."""
    helm_executable: str | None = None
    """The helm v3 binary for Helm-chart functions (default: `helm` on the worker's PATH)."""
    helm_replica_count_key: str = "replicaCount"
    """The values key (dotted for nested keys) that receives a Helm function's instance count."""
    helm_timeout: float = 300.0
    """Seconds one Helm operation may take, hooks included."""
    helm_gpu_values_key: str = "resources"
    """The values key (dotted) whose `limits` and `requests` receive a Helm function's GPUs."""
    resolve_artifacts: bool = True
    """Resolve Kubernetes functions' images to digests (and charts) against their registries at deploy."""
    insecure_registries: list[str] = Field(default_factory=list)
    """Registries reached over plain HTTP (loopback registries always are)."""
    replica_id: str | None = None
    """This API replica's id, carried in request ids (defaults to its own URL)."""
    peers: dict[str, str] = Field(default_factory=dict)
    """Other API replicas, id -> base URL, for forwarding status polls (defaults to gateway_urls)."""
    api_metrics_address: str | None = None
    """HOST:PORT where the API process serves /metrics without a key (off when unset; see operations.md)."""
    worker_metrics_address: str | None = None
    """HOST:PORT where the worker serves its /metrics without a key (off when unset)."""
    worker_sdk_metrics_address: str | None = None
    """HOST:PORT where the Temporal SDK serves the worker's runtime metrics (off when unset)."""
    request_record_retention: float = 3600.0
    """Seconds a request's record (GET /v2/gpufn/requests/{id}) is kept after it arrived."""
    request_record_max: int = 100_000
    """Most request records an API process keeps (about 300 bytes each); the oldest go first."""

    nats_url: str | None = None
    """NATS server with JetStream for the durable invocation plane (queued requests, 202 results, request
    records, route broadcast); `make up` starts one and sets it. Unset: the gateway keeps them in memory."""
    nats_port: int = 4222
    """Port of the embedded NATS server that `make up` starts (loopback only)."""
    nats_max_payload: int = 8 * 1024 * 1024
    """Largest NATS message the embedded server accepts: NVCF's 5 MiB inline body or result plus headers."""
    result_retention_bytes_per_account: int = 1024 * 1024 * 1024
    """Bound on the durable 202 results one account keeps waiting for their poll (bytes)."""

    @property
    def temporal_target(self) -> str:
        """Return the Temporal frontend address to connect to."""
        return self.temporal_address or f"127.0.0.1:{self.temporal_port}"

    @property
    def api_url(self) -> str:
        """Return the API's own base URL."""
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{self.api_host}:{self.api_port}"

    @property
    def gateways(self) -> list[str]:
        """Return the API replicas' base URLs (the embedded stack has one)."""
        return self.gateway_urls or [self.api_url]

    def resolved_admin_key(self) -> str:
        """Return the admin key: the configured one, or the one generated once into the state directory."""
        if self.admin_key:
            return self.admin_key
        return _read_or_create(self.home / ADMIN_KEY_FILE, lambda: "nvapi-" + secrets.token_urlsafe(48))

    def resolved_secret_key(self) -> str:
        """Return the secret-sealing key: configured, or generated once into the state directory."""
        if self.secret_key:
            return self.secret_key
        return _read_or_create(
            self.home / SECRET_KEY_FILE, lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        )


def _read_or_create(path: Path, make: Callable[[], str]) -> str:
    """Read a one-line secret file, creating it (mode 0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    tmp.chmod(0o600)
    tmp.rename(path)
    return value
