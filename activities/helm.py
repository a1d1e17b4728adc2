"""Helm-chart functions on Kubernetes: each deployment spec of a version is one Helm release.

A version with `helmChart` and `helmChartServiceName` is installed with pyhelm3 as the release
`fn-<versionId>-<specIndex>`, alone in its namespace `<prefix><account>-<versionId>-<specIndex>`, so that the
release's pods are the namespace's pods and tearing it down is uninstalling it and deleting the namespace.
The namespace is the release's record in the cluster: it carries the labels of the container backend's
objects (`app.kubernetes.io/managed-by`, `gpufn.io/function-id`, `gpufn.io/version-id`, `gpufn.io/account`,
`gpufn.io/spec-index`) plus `gpufn.io/helm-release`, and the service name and inference port as annotations,
so that observing and tearing down (which only get the version's id) need nothing else.

* Values: the deployment specification's `configuration` (NVCF's Helm values override), with the instance
  count set at `replicaCount` (`GPUFN_HELM_REPLICA_COUNT_KEY`). The count wins over `configuration`: it is
  the platform's decision (minInstances, maxInstances, the autoscaler), and a chart pinned to another
  count would make the workflow upgrade it again and again.
* Prepare pins the chart (`RegistryResolver`), renders it with `helm template` and checks that it renders
  the named Service with a selector and the inference port, so that a chart that cannot render or serve ends
  in ERROR at once, with Helm's own message.
* Ensure installs or upgrades the release with `Client.ensure_release`: a release left pending by a worker
  killed mid-install is uninstalled (or rolled back) and installed again, and an unchanged release is left
  alone, so a retried activity never makes a second release or a needless revision. Installs do not wait
  (`--wait=false`): readiness is judged from the pods.
* Instances are the pods of the namespace that the named Service selects. Their address is
  `http://<podIP>:<targetPort>` of the Service's inference port (ClusterIPs are never used: the gateway calls
  ready pods directly, as for container functions); a pod is RUNNING when Running and Ready, and otherwise
  judged by the container backend's rules (`view_pod`: unschedulable, image pull, crash loop, not ready).
* Scale-down lowers the count through the values; the chart's controller picks the pods to remove. Pods the
  workflow drained (or that failed) are deleted first, so the controller replaces them, and the lower count
  then removes the replacement, which is the newest and not yet ready: Helm functions drain by count.

One informer (the container backend's list-then-watch loop) keeps the release namespaces in memory, and one
per release namespace keeps its pods, so observing reads memory and a pod event wakes the version's watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import pyhelm3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pyhelm3 import errors as helm_errors
from temporalio.exceptions import ApplicationError

from activities.backend import Backend
from activities.kubernetes import (
    MANAGED_SELECTOR,
    ROLE_INSTANCE,
    ROLE_LABEL,
    SPEC_LABEL,
    VERSION_LABEL,
    KubeSettings,
    PodInformer,
    PodView,
    api_error,
    dns_label,
    label_value,
    version_labels,
    view_pod,
)
from activities.registry import RegistryResolver
from gpufn.kube_inventory import api_client, cluster_group_names, read_json
from gpufn.settings import Settings
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    FunctionVersionSpec,
    InstanceRecord,
    PrepareInput,
    PrepareResult,
    VersionRef,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]
T = TypeVar("T")

RELEASE_LABEL = "gpufn.io/helm-release"
SERVICE_ANNOTATION = "gpufn.io/service-name"
PORT_ANNOTATION = "gpufn.io/inference-port"
RELEASE_NAMESPACES = f"{MANAGED_SELECTOR},{RELEASE_LABEL}"
"""Selects the namespaces of Helm releases (the container backend's account namespaces lack the label)."""
RELEASE_NAME_MAX = 53
"""Helm refuses longer release names (they become parts of object names)."""
HELM_HOMES = {"HELM_CACHE_HOME": "cache", "HELM_CONFIG_HOME": "config", "HELM_DATA_HOME": "data"}

SYNC_TIMEOUT_SECONDS = 15.0
FENCE_SECONDS = 5.0
"""How long ensure_instances waits for the pods to show the new count, so its answer is never stale."""
NAMESPACE_READY_SECONDS = 15.0
NAMESPACE_GONE_SECONDS = 60.0
"""How long teardown waits for a release namespace to disappear (its pods are gone well before)."""
POLL_SECONDS = 0.25
EXECUTOR_THREADS = 8
WAKE_SLACK_SECONDS = 0.05
ERROR_TEXT_LIMIT = 4000

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


# --- Settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HelmSettings:
    """Knobs of the Helm backend.

    Attributes:
        executable: The helm v3 binary (`GPUFN_HELM_EXECUTABLE`); default: `helm` on the worker's PATH.
        home: Helm's cache, config and data homes (unless `HELM_*_HOME` are set) and the chart cache.
        replica_count_key: The values key, dotted for nested keys, that receives the instance count
            (`GPUFN_HELM_REPLICA_COUNT_KEY`).
        timeout_seconds: How long one Helm operation may take, hooks included (`GPUFN_HELM_TIMEOUT`).
    """

    executable: str | None = None
    home: Path = Path(".gpufn") / "helm"
    replica_count_key: str = "replicaCount"
    timeout_seconds: float = 300.0

    @classmethod
    def from_settings(cls, settings: Settings) -> HelmSettings:
        """Read the knobs from the `helm_*` settings."""
        return cls(
            executable=settings.helm_executable,
            home=settings.home.resolve() / "helm",
            replica_count_key=settings.helm_replica_count_key,
            timeout_seconds=settings.helm_timeout,
        )


# --- Names and values -------------------------------------------------------------------------------


def release_name(version_id: str, spec_index: int) -> str:
    """Return the Helm release of a version's deployment spec (deterministic, so retries find it)."""
    return dns_label(f"fn-{version_id}-{spec_index}", max_length=RELEASE_NAME_MAX)


def release_namespace(prefix: str, ref: VersionRef, spec_index: int) -> str:
    """Return the namespace the release lives in, alone."""
    return dns_label(f"{prefix}{ref.accountId}-{ref.versionId}-{spec_index}")


def release_values(configuration: Mapping[str, Any] | None, count: int, key: str) -> JSON:
    """Return the values of the release: `configuration` with the instance count set at `key`.

    Args:
        configuration: The deployment specification's Helm values override.
        count: The instance count.
        key: Where the count goes; dots separate nested keys (`server.replicas`).
    """
    values: JSON = copy.deepcopy(dict(configuration or {}))
    node = values
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = count
    return values


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
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": release.namespace,
            "labels": {
                **version_labels(ref),
                SPEC_LABEL: str(release.spec_index),
                RELEASE_LABEL: release.name,
            },
            "annotations": {SERVICE_ANNOTATION: release.service, PORT_ANNOTATION: str(release.port)},
        },
    }


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
        raise _invalid_chart(
            f"The chart renders no Service named '{service}' (helmChartServiceName); its Services: {names}"
        )
    target = service_target(found, inference_port)
    if isinstance(target, str):
        raise _invalid_chart(target)


# --- Errors -----------------------------------------------------------------------------------------


def _invalid_chart(message: str) -> ApplicationError:
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


# --- Informers --------------------------------------------------------------------------------------


class _ListingAs:
    """Offers another list call under the name `PodInformer` lists and watches with.

    `PodInformer` lists and watches gpufn's pods of every namespace; given this in place of its CoreV1Api, the
    same list-then-watch loop (relists, back-off, expired resource versions) keeps release namespaces, or
    one namespace's pods, in memory instead of a copy of that loop living here.
    """

    def __init__(self, list_call: Callable[..., Any], label_selector: str | None = None) -> None:
        self._list = list_call
        self._selector = label_selector

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        """Call the wrapped list (or watch) with this selector instead of the informer's."""
        kwargs.pop("label_selector", None)
        if self._selector:
            kwargs["label_selector"] = self._selector
        return self._list(**kwargs)


def _informer(
    list_call: Callable[..., Any], selector: str | None, notify: Callable[[set[str]], None], name: str
) -> PodInformer:
    return PodInformer(cast(client.CoreV1Api, _ListingAs(list_call, selector)), notify, name)


# --- The backend ------------------------------------------------------------------------------------


class HelmBackend:
    """The `Backend` of Helm-chart functions on one Kubernetes cluster.

    Args:
        kubeconfig: The cluster's kubeconfig (its current context), for helm and the API client.
        resolver: Pins and downloads charts.
        settings: The container backend's knobs: the namespace prefix and the bounds that judge pods.
        helm: The Helm backend's knobs.
        name: The cluster group name (default: derived from the kubeconfig).
    """

    def __init__(
        self,
        kubeconfig: Path,
        resolver: RegistryResolver,
        settings: KubeSettings,
        helm: HelmSettings,
        name: str | None = None,
    ) -> None:
        self.cluster_group = name or cluster_group_names([kubeconfig])[0]
        self._kubeconfig = kubeconfig
        self._resolver = resolver
        self._settings = settings
        self._helm_settings = helm
        self._client = api_client(kubeconfig)
        self._core = client.CoreV1Api(self._client)
        self._executor = ThreadPoolExecutor(EXECUTOR_THREADS, thread_name_prefix=f"helm-{self.cluster_group}")
        self._helm: pyhelm3.Client | None = None
        self._helm_problem = "the Helm backend is not started"
        self._releases = _informer(
            self._core.list_namespace, RELEASE_NAMESPACES, self._notify, f"{self.cluster_group}-releases"
        )
        self._pods: dict[str, PodInformer] = {}
        self._pod_keys: dict[str, str] = {}
        """Release namespace -> the version (label value) whose watcher its pod events wake."""
        self._seen: set[str] = set()
        """Release namespaces observed alive (and not yet dropped)."""
        self._services: dict[str, ServiceTarget] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._deadlines: dict[str, datetime] = {}
        self._chart_locks: dict[str, asyncio.Lock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- Lifecycle of the backend itself ------------------------------------------------------------

    async def start(self) -> None:
        """Find helm, give it private homes, and start watching release namespaces (without waiting).

        pyhelm3 runs helm with the worker's own environment (it takes no other), so helm's homes are set
        there, unless the operator set them.
        """
        self._loop = asyncio.get_running_loop()
        home = self._helm_settings.home
        for variable, sub in HELM_HOMES.items():
            os.environ.setdefault(variable, str(home / sub))
        executable = self._helm_settings.executable or shutil.which("helm")
        if executable is None:
            self._helm_problem = "helm is not installed on this worker (set GPUFN_HELM_EXECUTABLE)"
            log.warning(
                "Helm-chart functions disabled on cluster %s: %s", self.cluster_group, self._helm_problem
            )
        else:
            try:
                self._helm = await asyncio.to_thread(
                    pyhelm3.Client,
                    executable=executable,
                    kubeconfig=self._kubeconfig,
                    default_timeout=f"{int(self._helm_settings.timeout_seconds)}s",
                )
            except (AssertionError, OSError, ValueError, subprocess.CalledProcessError) as err:
                self._helm_problem = f"helm at {executable} does not work: {err}"
                log.warning("Helm-chart functions disabled on cluster %s: %s", self.cluster_group, err)
        self._releases.start()

    async def close(self) -> None:
        """Stop watching and close the API client."""
        informers = [self._releases, *self._pods.values()]
        self._pods.clear()
        await asyncio.gather(*(asyncio.to_thread(i.stop) for i in informers))
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # --- Backend verbs ------------------------------------------------------------------------------

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        """Pin the chart, render it with the deployment's values, and check it renders the function's Service.

        Raises:
            ApplicationError: Non-retryable when the chart is missing, does not render (Helm's message), or
                renders no Service that can serve the function.
        """
        helm = self._require_helm()
        spec = request.spec
        if not spec.helmChart or not spec.helmChartServiceName:
            raise _invalid_chart("A Helm-chart function needs helmChart and helmChartServiceName")
        pinned = (await self._resolver.resolve_chart(spec.helmChart)).pinned
        chart = await self._chart(helm, pinned)
        ref, dspec = request.ref, request.deploymentSpec
        values = release_values(
            dspec.configuration, max(1, dspec.minInstances), self._helm_settings.replica_count_key
        )
        try:
            rendered = list(
                await helm.template_resources(
                    chart,
                    release_name(ref.versionId, 0),
                    values,
                    namespace=release_namespace(self._settings.namespace_prefix, ref, 0),
                )
            )
        except helm_errors.Error as err:
            raise helm_error(err, f"render the chart {spec.helmChart}") from err
        check_rendered_service(rendered, spec.helmChartServiceName, spec.serving_port)
        return PrepareResult(resolvedChart=pinned)

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        """Delete the pods in `request.remove`, then install or upgrade the release with `count` instances.

        Idempotent: a retry finds the namespace there, the pods gone, and the release deployed with the same
        chart and values (left alone), or left pending by a dead attempt (uninstalled or rolled back first).
        """
        helm = self._require_helm()
        ref, spec = request.ref, request.spec
        release = self._release_of(spec, ref, request.specIndex)
        await self._wait_synced()
        namespace = await self._ensure_namespace(release, ref)
        release = replace(release, uid=str(namespace["metadata"].get("uid") or ""))
        pods = await self._pod_informer(release.namespace, label_value(ref.versionId))
        if request.remove:
            await self._run(self._delete_pods, release.namespace, request.remove)
        pinned = (
            request.prepared.resolvedChart
            or (await self._resolver.resolve_chart(spec.helmChart or "")).pinned
        )
        chart = await self._chart(helm, pinned)
        values = release_values(
            request.deploymentSpec.configuration, request.count, self._helm_settings.replica_count_key
        )
        try:
            await helm.ensure_release(
                release.name,
                chart,
                values,
                namespace=release.namespace,
                create_namespace=False,
                timeout=f"{int(self._helm_settings.timeout_seconds)}s",
                wait=False,
            )
        except helm_errors.Error as err:
            raise helm_error(err, f"install release {release.name} in {release.namespace}") from err
        log.info(
            "Release %s/%s of cluster %s: %s instances",
            release.namespace,
            release.name,
            self.cluster_group,
            request.count,
        )
        await self._fence(release, pods, set(request.remove), request.count)
        return await self.observe(ref, [])

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        """Return the version's instances: the pods its releases' Services select (none for containers)."""
        await self._wait_synced()
        key = label_value(ref.versionId)
        self._event(key).clear()
        now = datetime.now(UTC)
        views: list[PodView] = []
        live: set[str] = set()
        for namespace in self._releases.pods(key):
            release = Release.of(namespace)
            if release is None or release.terminating:
                continue
            live.add(release.namespace)
            pods = await self._pod_informer(release.namespace, key)
            target = await self._service(release)
            if target is None:
                continue
            for pod in pods.pods(""):
                view = instance_view(pod, now, self._settings, release.spec_index, target)
                if view is not None:
                    views.append(view)
        # Stop watching the version's namespaces that went away (torn down by this or another worker). Only
        # those seen alive before: a namespace ensure_instances just made may not be in the watch yet.
        self._seen.update(live)
        for gone in [n for n, k in self._pod_keys.items() if k == key and n in self._seen and n not in live]:
            await self._drop_namespace(gone)
        deadlines = [v.deadline for v in views if v.deadline is not None]
        if deadlines:
            self._deadlines[key] = min(deadlines)
        else:
            self._deadlines.pop(key, None)
        records = [v.record for v in views]
        return sorted(records, key=lambda r: (r.createdAt or now, r.instanceId))

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        """Return when a release or pod of the version changed, a pod's bound passed, or after `max_wait`."""
        key = label_value(ref.versionId)
        timeout = max(0.0, max_wait)
        deadline = self._deadlines.get(key)
        if deadline is not None:
            until = (deadline - datetime.now(UTC)).total_seconds() + WAKE_SLACK_SECONDS
            timeout = min(timeout, max(WAKE_SLACK_SECONDS, until))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event(key).wait(), timeout=timeout)

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        """Uninstall the version's releases and delete their namespaces; return once the namespaces are gone.

        Uninstalling runs the chart's pre-delete hooks and removes what it made outside its namespace;
        deleting the namespace removes everything else, a release a failed uninstall left included.
        """
        key = label_value(ref.versionId)
        listed = await self._run(
            self._call,
            "list namespaces",
            self._core.list_namespace,
            label_selector=f"{RELEASE_NAMESPACES},{VERSION_LABEL}={key}",
        )
        namespaces = list((listed or {}).get("items") or [])
        for namespace in namespaces:
            release = Release.of(namespace)
            name = namespace["metadata"]["name"]
            self._services.pop(str(namespace["metadata"].get("uid") or ""), None)
            if release is not None and not release.terminating and self._helm is not None:
                await self._uninstall(self._helm, release)
            await self._run(self._call, "delete a namespace", self._core.delete_namespace, name, ok=(404,))
            log.info("Deleted release namespace %s of cluster %s", name, self.cluster_group)
        for namespace in namespaces:
            await self._wait_gone(namespace["metadata"]["name"])
        for namespace in namespaces:
            await self._drop_namespace(namespace["metadata"]["name"])
        self._deadlines.pop(key, None)
        self._changed.pop(key, None)

    # --- Helpers: helm ------------------------------------------------------------------------------

    def _require_helm(self) -> pyhelm3.Client:
        if self._helm is None:
            raise ApplicationError(
                f"Helm-chart functions cannot run on cluster group '{self.cluster_group}': "
                f"{self._helm_problem}",
                type="HelmUnavailable",
                non_retryable=True,
            )
        return self._helm

    def _release_of(self, spec: FunctionVersionSpec, ref: VersionRef, spec_index: int) -> Release:
        if not spec.helmChart or not spec.helmChartServiceName:
            raise _invalid_chart("A Helm-chart function needs helmChart and helmChartServiceName")
        return Release(
            name=release_name(ref.versionId, spec_index),
            namespace=release_namespace(self._settings.namespace_prefix, ref, spec_index),
            spec_index=spec_index,
            service=spec.helmChartServiceName,
            port=spec.serving_port,
        )

    async def _chart(self, helm: pyhelm3.Client, pinned: str) -> pyhelm3.Chart:
        """Return the pinned chart, downloaded (and verified) once per worker into the chart cache."""
        key = hashlib.sha256(pinned.encode()).hexdigest()[:32]
        directory = self._helm_settings.home / "charts" / key
        async with self._chart_locks.setdefault(key, asyncio.Lock()):
            archives = sorted(directory.glob("*.tgz")) if directory.is_dir() else []
            if not archives:
                staging = directory.with_name(f"{key}.partial")
                await asyncio.to_thread(shutil.rmtree, staging, True)
                await asyncio.to_thread(staging.mkdir, parents=True)
                await self._resolver.fetch_chart(pinned, staging)
                # Renamed whole, so a worker killed mid-download leaves no half chart in the cache. Another
                # worker sharing the home may have won the race: its copy is the same verified chart.
                try:
                    await asyncio.to_thread(staging.rename, directory)
                except OSError:
                    await asyncio.to_thread(shutil.rmtree, staging, True)
                archives = sorted(directory.glob("*.tgz"))
        try:
            return await helm.get_chart(archives[0])
        except helm_errors.Error as err:
            raise helm_error(err, f"read the chart {pinned}") from err

    async def _uninstall(self, helm: pyhelm3.Client, release: Release) -> None:
        """Uninstall a release (gone already counts); a permanent failure falls back to no hooks."""
        timeout = f"{int(self._helm_settings.timeout_seconds)}s"
        try:
            await helm.uninstall_release(release.name, namespace=release.namespace, timeout=timeout)
            return
        except helm_errors.Error as err:
            failure = helm_error(err, f"uninstall release {release.name}")
            if not failure.non_retryable:
                raise failure from err
            log.warning("%s; uninstalling without hooks", failure.message)
        try:
            await helm.uninstall_release(
                release.name, namespace=release.namespace, timeout=timeout, no_hooks=True
            )
        except helm_errors.Error as err:
            # Deleting the namespace still removes the release and everything in it.
            log.warning("%s; deleting its namespace regardless", helm_error(err, "uninstall").message)

    # --- Helpers: objects ---------------------------------------------------------------------------

    async def _ensure_namespace(self, release: Release, ref: VersionRef) -> JSON:
        """Create the release's namespace (idempotent) and wait until pods can be created in it."""
        created = await self._run(
            self._call,
            "create a namespace",
            self._core.create_namespace,
            namespace_manifest(release, ref),
            ok=(409,),
        )
        namespace: JSON = created or await self._run(
            self._call, "read a namespace", self._core.read_namespace, release.namespace
        )
        found = Release.of(namespace)
        if found is None or found.terminating:
            # Retryable: the version's previous deployment is still being deleted (or another namespace
            # has the name, which an operator must sort out).
            raise ApplicationError(
                f"Namespace {release.namespace} is being deleted, or is not a gpufn release namespace",
                type="NamespaceNotReady",
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + NAMESPACE_READY_SECONDS
        # Pods are refused until the service-account controller has made the namespace's default account.
        while (
            await self._run(
                self._call,
                "read a service account",
                self._core.read_namespaced_service_account,
                "default",
                release.namespace,
                ok=(404,),
            )
            is None
        ):
            if loop.time() > deadline:
                raise ApplicationError(
                    f"Namespace {release.namespace} has no default service account yet",
                    type="NamespaceNotReady",
                )
            await asyncio.sleep(0.05)
        return namespace

    async def _service(self, release: Release) -> ServiceTarget | None:
        """Return where the release's Service sends traffic (cached), or None while it is missing."""
        cached = self._services.get(release.uid)
        if cached is not None:
            return cached
        service = await self._run(
            self._call,
            "read a Service",
            self._core.read_namespaced_service,
            release.service,
            release.namespace,
            ok=(404,),
        )
        if service is None:
            return None
        target = service_target(service, release.port)
        if isinstance(target, str):
            log.warning("Release %s/%s: %s", release.namespace, release.name, target)
            return None
        # The Service only changes with the deployment's configuration, which a deployment never changes.
        if release.uid:
            self._services[release.uid] = target
        return target

    def _delete_pods(self, namespace: str, names: list[str]) -> None:
        for name in names:
            self._call("delete a pod", self._core.delete_namespaced_pod, name, namespace, ok=(404,))
            log.info("Removed pod %s/%s of cluster %s", namespace, name, self.cluster_group)

    async def _wait_gone(self, namespace: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + NAMESPACE_GONE_SECONDS
        while loop.time() < deadline:
            found = await self._run(
                self._call, "read a namespace", self._core.read_namespace, namespace, ok=(404,)
            )
            if found is None:
                return
            await asyncio.sleep(POLL_SECONDS)
        log.warning("Namespace %s of cluster %s is still being deleted", namespace, self.cluster_group)

    async def _fence(self, release: Release, pods: PodInformer, removed: set[str], count: int) -> None:
        """Wait (briefly) until the watched pods show the removed pods gone and `count` instances.

        Otherwise the answer could show a removed pod, or the replacement its controller made before the
        lower count reached it, and the workflow would act on that.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FENCE_SECONDS
        while loop.time() < deadline:
            target = await self._service(release)
            if target is not None:
                now = datetime.now(UTC)
                live = [
                    p
                    for p in pods.pods("")
                    if instance_view(p, now, self._settings, release.spec_index, target) is not None
                ]
                names = {p["metadata"]["name"] for p in live}
                if not names & removed and len(live) == count:
                    return
            await asyncio.sleep(0.02)
        log.info(
            "Release %s/%s does not show %s instances after %s s",
            release.namespace,
            release.name,
            count,
            FENCE_SECONDS,
        )

    # --- Helpers: informers, threads, events --------------------------------------------------------

    async def _pod_informer(self, namespace: str, key: str) -> PodInformer:
        """Return the informer of a release namespace's pods, started (and synced) on first use."""
        informer = self._pods.get(namespace)
        if informer is None:
            informer = _informer(
                functools.partial(self._core.list_namespaced_pod, namespace),
                None,
                lambda _: self._notify({key}),
                f"{self.cluster_group}-{namespace}",
            )
            self._pods[namespace] = informer
            self._pod_keys[namespace] = key
            informer.start()
        if not informer.synced.is_set():
            synced = await asyncio.to_thread(informer.synced.wait, SYNC_TIMEOUT_SECONDS)
            if not synced:
                raise ApplicationError(
                    f"Cluster '{self.cluster_group}' cannot list the pods of {namespace}: "
                    f"{informer.last_error or 'no answer'}",
                    type="KubernetesUnavailable",
                )
        return informer

    async def _drop_namespace(self, namespace: str) -> None:
        informer = self._pods.pop(namespace, None)
        self._pod_keys.pop(namespace, None)
        self._seen.discard(namespace)
        if informer is not None:
            await asyncio.to_thread(informer.stop)

    async def _wait_synced(self) -> None:
        """Wait for the first list of release namespaces; fail (retryably) if the cluster does not answer."""
        if self._releases.synced.is_set():
            return
        if not await asyncio.to_thread(self._releases.synced.wait, SYNC_TIMEOUT_SECONDS):
            reason = self._releases.last_error or "no answer"
            raise ApplicationError(
                f"Cluster '{self.cluster_group}' cannot be reached: {reason}", type="KubernetesUnavailable"
            )

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call in this backend's threads, so the event loop never waits for the cluster."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    @staticmethod
    def _call(action: str, fn: Callable[..., Any], *args: Any, ok: Iterable[int] = (), **kwargs: Any) -> Any:
        """Make one API call and return its JSON; None for a status in `ok` (the idempotent outcomes)."""
        try:
            return read_json(fn, *args, **kwargs)
        except ApiException as err:
            if err.status in set(ok):
                return None
            raise api_error(err, action) from err

    def _event(self, key: str) -> asyncio.Event:
        return self._changed.setdefault(key, asyncio.Event())

    def _notify(self, keys: set[str]) -> None:
        """Called from an informer's thread: wake the watchers of the changed versions."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake, keys)

    def _wake(self, keys: set[str]) -> None:
        for key in keys:
            event = self._changed.get(key)
            if event is not None:
                event.set()


# --- One cluster group, two kinds of functions ------------------------------------------------------


class KubernetesGroupBackend:
    """The `Backend` of a Kubernetes cluster group: Helm-chart versions go to Helm, the others to containers.

    Prepare and ensure know the version (its `helmChart`). Observe, wait and teardown only get its id: each
    backend reports only what it owns (pods labelled with the version; the version's release namespaces),
    both from memory, so asking both is exact and costs nothing more than asking one.

    Args:
        containers: The container backend of the cluster (possibly wrapped to pin images).
        charts: The Helm backend of the same cluster.
    """

    def __init__(self, containers: Backend, charts: Backend) -> None:
        self._containers = containers
        self._charts = charts

    def _of(self, spec: FunctionVersionSpec) -> Backend:
        return self._charts if spec.helmChart else self._containers

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        """Prepare with the backend of the version's kind."""
        return await self._of(request.spec).prepare(request)

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        """Ensure the instances with the backend of the version's kind."""
        return await self._of(request.spec).ensure_instances(request)

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        """Return the version's instances, whichever backend runs them."""
        return [*await self._containers.observe(ref, specs), *await self._charts.observe(ref, specs)]

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        """Return when either backend sees a change of the version, or after `max_wait` seconds."""
        waits = [
            asyncio.create_task(self._containers.wait_for_change(ref, max_wait)),
            asyncio.create_task(self._charts.wait_for_change(ref, max_wait)),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        """Tear down with both backends (each finds nothing of a version of the other kind)."""
        await self._containers.teardown(ref, specs)
        await self._charts.teardown(ref, specs)
