"""Helm releases as the Helm backend makes and reads them: names, values, the release's namespace record,
the Service whose pods are the instances, and what Helm's failures mean to Temporal.

Values are the deployment specification's `configuration` (NVCF's Helm values override) with what the
platform decides set over it: the instance count (at `replicaCount`), the function's GPUs (the limits and
requests of `resources`) and the name of the Secret with the function's secrets (`gpufn.secretName`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from pyhelm3 import errors as helm_errors
from temporalio.exceptions import ApplicationError

from activities.kube import manifests
from activities.kube.config import KubeSettings
from activities.kube.names import (
    MANAGED_SELECTOR,
    ROLE_INSTANCE,
    ROLE_LABEL,
    SPEC_LABEL,
    dns_label,
    version_labels,
)
from activities.kube.pods import PodView, view_pod
from gpufn.kube_inventory import GPU_RESOURCE
from workflows.models import VersionRef

JSON = dict[str, Any]

RELEASE_LABEL = "gpufn.io/helm-release"
SERVICE_ANNOTATION = "gpufn.io/service-name"
PORT_ANNOTATION = "gpufn.io/inference-port"
RELEASE_NAMESPACES = f"{MANAGED_SELECTOR},{RELEASE_LABEL}"
"""Selects the namespaces of Helm releases (the container backend's account namespaces lack the label)."""
RELEASE_NAME_MAX = 53
"""Helm refuses longer release names (they become parts of object names)."""
ERROR_TEXT_LIMIT = 4000
SECRET_NAME = "gpufn-secrets"
"""The Secret with the function's secrets, in the release's namespace, made before the chart is installed."""
SECRET_NAME_KEY = "gpufn.secretName"
"""Where the values tell the chart that Secret's name (set only when the function has secrets)."""

PERMANENT_HELM_ERRORS = (
    helm_errors.FailedToRenderChartError,
    helm_errors.ChartNotFoundError,
    helm_errors.InvalidResourceError,
    helm_errors.ResourceAlreadyExistsError,
)
TRANSIENT_HELM_ERRORS = (
    helm_errors.ConnectionError,
    helm_errors.CommandCancelledError,
)
TRANSIENT_MARKERS = (
    "kubernetes cluster unreachable",
    "connection refused",
    "connection reset",
    "no route to host",
    "i/o timeout",
    "tls handshake timeout",
    "context deadline exceeded",
    "unexpected eof",
    "the server is currently unable to handle the request",
    "the server was unable to return a response",
    "internal error occurred",
    "too many requests",
    "the object has been modified",
    "another operation (install/upgrade/rollback) is in progress",
    "because it is being terminated",
)
"""Helm's words for failures of the moment (the cluster, not the chart): the activity is retried."""


def release_name(version_id: str, spec_index: int) -> str:
    """Return the Helm release of a version's deployment spec (deterministic, so retries find it)."""
    return dns_label(f"fn-{version_id}-{spec_index}", max_length=RELEASE_NAME_MAX)


def release_namespace(prefix: str, ref: VersionRef, spec_index: int) -> str:
    """Return the namespace the release lives in, alone."""
    return dns_label(f"{prefix}{ref.accountId}-{ref.versionId}-{spec_index}")


def _set(values: JSON, key: str, value: Any) -> JSON:
    """Set `value` at a dotted `key` of `values` (in place), making the maps on the way; return the node's
    parent map.
    """
    node = values
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value
    return node


def release_values(
    configuration: Mapping[str, Any] | None,
    count: int,
    key: str,
    *,
    gpus: int = 0,
    gpu_key: str = "resources",
    secret_name: str | None = None,
) -> JSON:
    """Return the values of the release: `configuration` with what the platform decides set over it.

    Args:
        configuration: The deployment specification's Helm values override.
        count: The instance count, set at `key`; dots separate nested keys (`server.replicas`).
        key: Where the count goes.
        gpus: GPUs per instance (the instance type's), set as the `nvidia.com/gpu` limit and request of the
            resources at `gpu_key` (0: none set).
        gpu_key: Where the chart reads its GPU container's resources.
        secret_name: The Secret with the function's secrets, at `gpufn.secretName` (None: not set).
    """
    values: JSON = copy.deepcopy(dict(configuration or {}))
    _set(values, key, count)
    if gpus > 0:
        resources = _get_map(values, gpu_key)
        for part in ("limits", "requests"):
            quantities = resources.get(part)
            if not isinstance(quantities, dict):
                quantities = resources[part] = {}
            quantities[GPU_RESOURCE] = gpus
        _set(values, gpu_key, resources)
    if secret_name is not None:
        _set(values, SECRET_NAME_KEY, secret_name)
    return values


def _get_map(values: JSON, key: str) -> JSON:
    """Return the map at a dotted key of `values` (a copy; an empty map when there is none)."""
    node: Any = values
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return dict(node) if isinstance(node, dict) else {}


def rendered_gpus(resources: Iterable[Any]) -> int:
    """Return the most `nvidia.com/gpu` that one pod of a rendered chart asks for (0: none asks)."""
    most = 0
    for resource in resources:
        if not isinstance(resource, dict):
            continue
        spec: JSON = resource.get("spec") or {}
        if resource.get("kind") == "Pod":
            pod = spec
        else:
            # Deployments, StatefulSets, DaemonSets and Jobs hold a pod template; CronJobs one level deeper.
            holder: JSON = (spec.get("jobTemplate") or {}).get("spec") or spec
            pod = (holder.get("template") or {}).get("spec") or {}
        total = 0
        for container in pod.get("containers") or []:
            limits = (container.get("resources") or {}).get("limits") or {}
            try:
                total += int(limits.get(GPU_RESOURCE, 0))
            except (TypeError, ValueError):
                continue
        most = max(most, total)
    return most


def check_rendered_gpus(resources: Iterable[Any], gpus: int, gpu_key: str) -> None:
    """Check that the chart gives the function's GPUs to a pod, as the values told it to.

    Raises:
        ApplicationError: Non-retryable, when no pod of the chart asks for the instance type's GPUs.
    """
    found = rendered_gpus(resources)
    if found < gpus:
        raise invalid_chart(
            f"No pod of the chart asks for the instance type's {gpus} GPU(s) ({GPU_RESOURCE}; the most one "
            f"pod asks for is {found}): gpufn sets them as the limits and requests at the values key "
            f"'{gpu_key}' (GPUFN_HELM_GPU_VALUES_KEY), which the chart must give its GPU container"
        )


@dataclass(frozen=True)
class Release:
    """A release as its namespace records it.

    Attributes:
        name: The release name.
        namespace: Its namespace.
        spec_index: The deployment spec it serves.
        service: The Service whose pods are the instances (`helmChartServiceName`).
        port: The function's inference port (a port of that Service).
        uid: The namespace's uid (a redeployed version gets a new namespace, and new cached answers).
        terminating: The namespace is being deleted.
    """

    name: str
    namespace: str
    spec_index: int
    service: str
    port: int
    uid: str = ""
    terminating: bool = False

    @classmethod
    def of(cls, namespace: JSON) -> Release | None:
        """Return the release a namespace records, or None when it is not a complete release namespace."""
        meta = namespace.get("metadata") or {}
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        try:
            return cls(
                name=str(labels[RELEASE_LABEL]),
                namespace=str(meta["name"]),
                spec_index=int(labels.get(SPEC_LABEL, "0")),
                service=str(annotations[SERVICE_ANNOTATION]),
                port=int(annotations[PORT_ANNOTATION]),
                uid=str(meta.get("uid") or ""),
                terminating=bool(meta.get("deletionTimestamp"))
                or (namespace.get("status") or {}).get("phase") == "Terminating",
            )
        except (KeyError, ValueError):
            return None


def namespace_manifest(release: Release, ref: VersionRef) -> JSON:
    """Return the namespace of a release, labelled and annotated so that it describes the release."""
    return manifests.namespace_manifest(
        release.namespace,
        labels={**version_labels(ref), SPEC_LABEL: str(release.spec_index), RELEASE_LABEL: release.name},
        annotations={SERVICE_ANNOTATION: release.service, PORT_ANNOTATION: str(release.port)},
    )


# --- The Service and its pods -----------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceTarget:
    """Which pods a Service sends to, and on which of their ports.

    Attributes:
        selector: The Service's pod selector.
        target: The targetPort of the inference port: a number, or the name of a container port.
    """

    selector: Mapping[str, str]
    target: int | str


def service_target(service: JSON, inference_port: int) -> ServiceTarget | str:
    """Return where a Service sends the inference port's traffic, or why it cannot serve the function.

    The port is the one whose `port` is the inference port, else whose `targetPort` is, else the Service's
    only port.
    """
    name = (service.get("metadata") or {}).get("name")
    spec = service.get("spec") or {}
    selector = spec.get("selector") or {}
    if not selector:
        return f"Service '{name}' has no pod selector, so no pods back it"
    ports = [p for p in spec.get("ports") or [] if isinstance(p, dict)]
    chosen = next((p for p in ports if p.get("port") == inference_port), None)
    chosen = chosen or next((p for p in ports if p.get("targetPort") == inference_port), None)
    if chosen is None and len(ports) == 1:
        chosen = ports[0]
    if chosen is None:
        listed = ", ".join(str(p.get("port")) for p in ports) or "none"
        return f"Service '{name}' has no port {inference_port} (the inference port); its ports: {listed}"
    target = chosen.get("targetPort") or chosen.get("port")
    if isinstance(target, str):
        return ServiceTarget(selector=dict(selector), target=target)
    if isinstance(target, int):
        return ServiceTarget(selector=dict(selector), target=target)
    return f"Service '{name}' has a port without a number"


def selects(selector: Mapping[str, str], pod: JSON) -> bool:
    """Return whether a Service selector selects a pod."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in selector.items())


def pod_port(pod: JSON, target: int | str) -> int | None:
    """Return the pod's port a Service's targetPort names (a number, or a container port's name)."""
    if isinstance(target, int):
        return target
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target and port.get("containerPort"):
                return int(port["containerPort"])
    return None


def instance_view(
    pod: JSON, now: datetime, settings: KubeSettings, spec_index: int, target: ServiceTarget
) -> PodView | None:
    """Return what a pod of a release means to the workflow, or None when it is no instance.

    Only pods the Service selects are instances; pods on their way out are not.
    """
    if not selects(target.selector, pod):
        return None
    meta = pod.get("metadata") or {}
    # view_pod recognizes gpufn's own pods by their role and spec labels. A chart's pods carry neither:
    # give them both, on a copy, so that a chart's pods are judged by exactly the same rules.
    labels = {**(meta.get("labels") or {}), ROLE_LABEL: ROLE_INSTANCE, SPEC_LABEL: str(spec_index)}
    view = view_pod({**pod, "metadata": {**meta, "labels": labels}}, now, settings)
    if view is None:
        return None
    ip = (pod.get("status") or {}).get("podIP")
    port = pod_port(pod, target.target)
    address = f"http://{ip}:{port}" if ip and port else None
    return replace(view, record=view.record.model_copy(update={"address": address}))


def check_rendered_service(resources: Iterable[Any], service: str, inference_port: int) -> None:
    """Check that a chart renders the function's Service, with a selector and the inference port.

    Raises:
        ApplicationError: Non-retryable, naming what the chart renders instead.
    """
    services = [
        r
        for r in resources
        if isinstance(r, dict) and r.get("kind") == "Service" and r.get("apiVersion") == "v1"
    ]
    found = next((s for s in services if (s.get("metadata") or {}).get("name") == service), None)
    if found is None:
        names = ", ".join(sorted(str((s.get("metadata") or {}).get("name")) for s in services)) or "none"
        raise invalid_chart(
            f"The chart renders no Service named '{service}' (helmChartServiceName); its Services: {names}"
        )
    target = service_target(found, inference_port)
    if isinstance(target, str):
        raise invalid_chart(target)


# --- Errors -----------------------------------------------------------------------------------------


def invalid_chart(message: str) -> ApplicationError:
    """Return the error of a chart that cannot serve the function (no retry helps)."""
    return ApplicationError(message, type="InvalidHelmChart", non_retryable=True)


def helm_error(err: helm_errors.Error, action: str) -> ApplicationError:
    """Return the ApplicationError of a failed Helm command, carrying Helm's own message.

    A chart that cannot render, is missing, or renders objects the API server refuses or that exist
    already fails for good; a cluster that cannot be reached, throttles or conflicts is retried.
    """
    text = (err.stderr or b"").decode(errors="replace").strip() or (err.stdout or b"").decode(
        errors="replace"
    ).strip()
    text = text[:ERROR_TEXT_LIMIT] or f"helm exited with code {err.returncode}"
    lowered = text.lower()
    if isinstance(err, PERMANENT_HELM_ERRORS):
        transient = False
    else:
        transient = isinstance(err, TRANSIENT_HELM_ERRORS) or any(m in lowered for m in TRANSIENT_MARKERS)
    if isinstance(err, helm_errors.FailedToRenderChartError):
        kind = "HelmChartRenderFailed"
    elif isinstance(err, helm_errors.ChartNotFoundError):
        kind = "HelmChartNotFound"
    else:
        kind = "HelmUnavailable" if transient else "HelmFailed"
    return ApplicationError(f"Helm could not {action}: {text}", type=kind, non_retryable=not transient)
