"""The knobs of the Kubernetes backends (`KubeSettings`) and of Helm (`HelmSettings`), read from gpufn's
settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gpufn.sealing import SecretBox
from gpufn.settings import Settings

IN_CLUSTER_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
"""Where Kubernetes tells a pod its namespace: the worker's, when it runs in the cluster."""


def own_namespace(path: Path = IN_CLUSTER_NAMESPACE_FILE) -> str | None:
    """Return the namespace this process runs in as a pod, or None outside a cluster."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class KubeSettings:
    """Knobs of the Kubernetes backends; each is the setting `kube_<name>` (`GPUFN_KUBE_<NAME>`).

    Attributes:
        namespace_prefix: Namespaces are `<prefix><account>`.
        image_pull_timeout: Seconds an image pull (or a container config error, such as a missing Secret)
            may keep failing before the instance is ERRORED.
        unschedulable_timeout: Seconds a pod may stay unschedulable (e.g. not enough free GPUs) before the
            instance is ERRORED.
        crash_loop_restarts: Crashes of the container after which the instance is ERRORED.
        start_timeout: Seconds a running container may stay not ready (`instance_start_timeout`).
        termination_grace_seconds: The pods' `terminationGracePeriodSeconds`.
        runtime_class: `runtimeClassName` of the pods (e.g. `nvidia`), when the cluster needs one for GPUs.
        run_as_user: uid and gid of function containers, with `runAsNonRoot`; 0 keeps the image's user.
        network_policy: Whether the namespaces gpufn makes get an isolating NetworkPolicy.
        gateway_namespace: Namespace of gpufn's API pods, whose gateways call function pods.
        gateway_cidrs: Addresses of gateways outside the cluster.
        egress_denied_cidrs: Addresses function pods may not reach outside their own namespace.
    """

    namespace_prefix: str = "gpufn-"
    image_pull_timeout: float = 60.0
    unschedulable_timeout: float = 600.0
    crash_loop_restarts: int = 3
    start_timeout: float = 600.0
    termination_grace_seconds: int = 30
    runtime_class: str | None = None
    run_as_user: int = 1000
    network_policy: bool = True
    gateway_namespace: str | None = None
    gateway_cidrs: tuple[str, ...] = ()
    egress_denied_cidrs: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            Settings.model_fields["kube_egress_denied_cidrs"].get_default(call_default_factory=True)
        )
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> KubeSettings:
        """Read the knobs from the `kube_*` settings."""
        return cls(
            namespace_prefix=settings.kube_namespace_prefix,
            image_pull_timeout=settings.kube_image_pull_timeout,
            unschedulable_timeout=settings.kube_unschedulable_timeout,
            crash_loop_restarts=settings.kube_crash_loop_restarts,
            start_timeout=settings.instance_start_timeout,
            termination_grace_seconds=settings.kube_termination_grace_seconds,
            runtime_class=settings.kube_runtime_class or None,
            run_as_user=settings.kube_run_as_user,
            network_policy=settings.kube_network_policy,
            gateway_namespace=settings.kube_gateway_namespace or own_namespace(),
            gateway_cidrs=tuple(settings.kube_gateway_cidrs),
            egress_denied_cidrs=tuple(settings.kube_egress_denied_cidrs),
        )


@dataclass(frozen=True)
class HelmSettings:
    """Knobs of the Helm backend.

    Attributes:
        executable: The helm v3 binary (`GPUFN_HELM_EXECUTABLE`); default: `helm` on the worker's PATH.
        home: Helm's cache, config and data homes (unless `HELM_*_HOME` are set) and the chart cache.
        replica_count_key: The values key, dotted for nested keys, that receives the instance count
            (`GPUFN_HELM_REPLICA_COUNT_KEY`).
        timeout_seconds: How long one Helm operation may take, hooks included (`GPUFN_HELM_TIMEOUT`).
        gpu_values_key: The values key, dotted for nested keys, whose `limits` and `requests` receive the
            function's GPUs (`GPUFN_HELM_GPU_VALUES_KEY`).
        secret_box: Opens the functions' sealed secrets (the key of `GPUFN_SECRET_KEY`); without it, a
            Helm-chart function with secrets fails to deploy.
    """

    executable: str | None = None
    home: Path = Path(".gpufn") / "helm"
    replica_count_key: str = "replicaCount"
    timeout_seconds: float = 300.0
    gpu_values_key: str = "resources"
    secret_box: SecretBox | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> HelmSettings:
        """Read the knobs from the `helm_*` settings."""
        return cls(
            executable=settings.helm_executable,
            home=settings.home.resolve() / "helm",
            replica_count_key=settings.helm_replica_count_key,
            timeout_seconds=settings.helm_timeout,
            gpu_values_key=settings.helm_gpu_values_key,
            secret_box=SecretBox(settings.resolved_secret_key()),
        )
