"""The Kubernetes backend: each deployment spec of a version is a Deployment; its pods are the instances.

Objects live in the account's namespace (`gpufn-<account>`), carry the labels `app.kubernetes.io/managed-by`,
`gpufn.io/function-id`, `gpufn.io/version-id` and `gpufn.io/account`, and are named after the version
(`fn-<versionId>-<specIndex>`):

* a Deployment whose replicas are the spec's instance count. Its pods ask for `nvidia.com/gpu` as the
  instance type says, require a node whose `nvidia.com/gpu.product` is the spec's GPU, run `containerArgs`
  as the container command, and are ready when the version's health check passes (a readiness probe);
* a Secret with the version's secrets, opened from their sealed form here (never in workflow data) and
  owned by the Deployment, so that deleting the Deployment removes everything.

Prepare checks the cluster has the spec's GPU and makes a server-side dry run of the Deployment, so that
permissions, admission and quota refuse a deployment at once, with the API server's words.

One watch per cluster keeps every gpufn pod in memory: observing a version reads memory, and a pod event
wakes the version's watcher activity at once. A pod is RUNNING when it is Running and Ready; otherwise it
is STARTING, with the scheduler's or the kubelet's reason as its error, until a bound passes (image pull,
unschedulable, crash loop, not ready) and it is ERRORED, with the reason, the pod's warning events and its
last log lines.

Scale-down removes exactly the pods the workflow drained. Kubernetes 1.20 has no pod-deletion-cost, so
those pods are first released from their ReplicaSet (a label change takes them out of its selector), then
the replica count is lowered, then the released pods are deleted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import shlex
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidTag
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from temporalio.exceptions import ApplicationError
from urllib3.exceptions import HTTPError

from gpufn.durations import parse_iso_duration
from gpufn.kube_inventory import (
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    REQUEST_TIMEOUT,
    GpuNode,
    api_client,
    cluster_group_names,
    gpu_nodes,
    parse_instance_type,
    products_of,
    read_json,
)
from gpufn.sealing import SecretBox, secret_context
from gpufn.settings import Settings
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    FunctionVersionSpec,
    Health,
    InstanceRecord,
    InstanceStatus,
    PrepareInput,
    PrepareResult,
    VersionRef,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]
T = TypeVar("T")

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGER = "gpufn"
FUNCTION_LABEL = "gpufn.io/function-id"
VERSION_LABEL = "gpufn.io/version-id"
ACCOUNT_LABEL = "gpufn.io/account"
SPEC_LABEL = "gpufn.io/spec-index"
ROLE_LABEL = "gpufn.io/role"
ROLE_INSTANCE = "instance"
ROLE_RELEASED = "released"
"""A pod taken out of its ReplicaSet to be deleted (scale-down of exactly the drained pods)."""
CONTAINER = "function"
MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGER}"
MERGE_PATCH = "application/merge-patch+json"

WATCH_SECONDS = 240
"""The API server ends each watch after this long; the informer then watches again from where it was."""
RELIST_BACKOFF_SECONDS = (0.5, 10.0)
SYNC_TIMEOUT_SECONDS = 15.0
"""How long an activity waits for the first list of the cluster's pods before it fails (and is retried)."""
FENCE_SECONDS = 5.0
"""How long ensure_instances waits for the watch to show its own changes, so its answer is never stale."""
NAMESPACE_READY_SECONDS = 15.0
POLL_SECONDS = 0.25
FORCE_DELETE_AFTER_SECONDS = 60.0
"""A pod still terminating this long after its grace period ended has lost its node: delete it by force."""
LOG_TAIL_LINES = 20
LOG_TIMEOUT = (3.0, 5.0)
WARNING_EVENTS = 3
PROBE_PERIOD_SECONDS = 5
PROBE_FAILURES = 3
EXECUTOR_THREADS = 16
WAKE_SLACK_SECONDS = 0.05

IMAGE_ERRORS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "RegistryUnavailable", "SignatureValidationFailed"}
)
CONTAINER_ERRORS = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "PreCreateHookError", "PreStartHookError"}
)
"""Waiting reasons that persist until someone fixes the spec or the registry: bounded like image pulls."""
HOPELESS_WAITING = frozenset({"InvalidImageName", "ErrImageNeverPull"})
"""Waiting reasons no amount of waiting fixes."""
RETRYABLE_CLIENT_ERRORS = frozenset({401, 404, 408, 409, 429})
"""4xx statuses that may succeed on a retry (credentials are refreshed, conflicts and throttling pass);
callers treat 404 and 409 as success where they are the idempotent outcome."""


# --- Settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KubeSettings:
    """Knobs of the Kubernetes backend; each is the setting `kube_<name>` (`GPUFN_KUBE_<NAME>`).

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
    """

    namespace_prefix: str = "gpufn-"
    image_pull_timeout: float = 60.0
    unschedulable_timeout: float = 600.0
    crash_loop_restarts: int = 3
    start_timeout: float = 600.0
    termination_grace_seconds: int = 30
    runtime_class: str | None = None

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
        )


# --- Names and labels -------------------------------------------------------------------------------


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def dns_label(text: str, max_length: int = 63) -> str:
    """Return `text` as a DNS label; a lossy conversion gets a hash suffix so two inputs never collide."""
    clean = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if clean == text and len(clean) <= max_length:
        return clean
    return f"{clean[: max_length - 9].rstrip('-')}-{_digest(text)}".lstrip("-")


def label_value(text: str) -> str:
    """Return `text` as a label value (63 characters of [A-Za-z0-9_.-], alphanumeric at both ends)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    if clean == text and len(clean) <= 63:
        return clean
    return f"{clean[:54].rstrip('-_.')}-{_digest(text)}".lstrip("-_.")


def namespace_name(prefix: str, account: str) -> str:
    """Return the namespace of an account's functions."""
    return dns_label(prefix + account)


def deployment_name(version_id: str, spec_index: int) -> str:
    """Return the name of a spec's Deployment (and Secret): short enough that pod names stay under 63."""
    return dns_label(f"fn-{version_id}-{spec_index}", max_length=46)


def version_selector(version_id: str) -> str:
    """Return the label selector of every object of a version."""
    return f"{VERSION_LABEL}={label_value(version_id)}"


def version_labels(ref: VersionRef) -> dict[str, str]:
    """Return the labels every object of a version carries."""
    return {
        MANAGED_BY_LABEL: MANAGER,
        FUNCTION_LABEL: label_value(ref.functionId),
        VERSION_LABEL: label_value(ref.versionId),
        ACCOUNT_LABEL: label_value(ref.accountId),
    }


def _escape(text: str) -> str:
    """Keep Kubernetes from expanding `$(VAR)` in a command word or an environment value."""
    return text.replace("$", "$$")


# --- Manifests --------------------------------------------------------------------------------------


def readiness_probe(health: Health, serving_port: int) -> JSON:
    """Return the readiness probe of the version's health check.

    Kubernetes 1.20 has no gRPC probe, so a gRPC health check becomes a TCP check of its port; an HTTP
    probe accepts any status from 200 to 399.
    """
    port = health.port or serving_port
    try:
        timeout = parse_iso_duration(health.timeout, default=10.0)
    except ValueError:
        timeout = 10.0
    action: JSON
    if health.protocol.upper() == "GRPC":
        action = {"tcpSocket": {"port": port}}
    else:
        action = {"httpGet": {"path": health.uri, "port": port, "scheme": "HTTP"}}
    return {
        **action,
        "periodSeconds": PROBE_PERIOD_SECONDS,
        "timeoutSeconds": max(1, math.ceil(timeout)),
        "failureThreshold": PROBE_FAILURES,
        "successThreshold": 1,
    }


def container_environment(
    ref: VersionRef,
    spec: FunctionVersionSpec,
    dspec: DeploymentSpecification,
    secret_name: str | None,
    cluster_group: str,
) -> list[JSON]:
    """Return the container's `env`: the version's environment, its secrets (by reference), then NVCF's."""
    env: dict[str, JSON] = {}
    for entry in spec.containerEnvironment or []:
        env[entry.key] = {"name": entry.key, "value": _escape(entry.value)}
    if secret_name is not None:
        for name in sorted(spec.encryptedSecrets):
            env[name] = {"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": name}}}
    fixed = {
        # Servers bind $HOST:$PORT; in a pod that is every interface.
        "HOST": "0.0.0.0",
        "PORT": str(spec.serving_port),
        "NVCF_BACKEND": dspec.backend or dspec.clusterGroup,
        "NVCF_ENV": "kubernetes",
        "NVCF_FUNCTION_ID": ref.functionId,
        "NVCF_FUNCTION_NAME": spec.name,
        "NVCF_FUNCTION_VERSION_ID": ref.versionId,
        "NVCF_INSTANCETYPE": dspec.instanceType,
        "NVCF_NCA_ID": ref.accountId,
        "NVCF_REGION": cluster_group,
    }
    for key, value in fixed.items():
        env[key] = {"name": key, "value": _escape(value)}
    env["NVCF_INSTANCE_ID"] = {
        "name": "NVCF_INSTANCE_ID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    return list(env.values())


def deployment_manifest(
    *,
    request: EnsureInstancesInput,
    name: str,
    namespace: str,
    gpus: int,
    products: Sequence[str],
    secret_name: str | None,
    cluster_group: str,
    settings: KubeSettings,
) -> JSON:
    """Return the Deployment of one deployment spec of a version, with `request.count` replicas."""
    ref, spec, dspec = request.ref, request.spec, request.deploymentSpec
    labels = version_labels(ref)
    selector = {
        VERSION_LABEL: labels[VERSION_LABEL],
        SPEC_LABEL: str(request.specIndex),
        ROLE_LABEL: ROLE_INSTANCE,
    }
    annotations = {
        "gpufn.io/function-name": spec.name,
        "gpufn.io/instance-type": dspec.instanceType,
        "gpufn.io/cluster-group": cluster_group,
    }
    gpu_quantity = {GPU_RESOURCE: str(gpus)}
    container: JSON = {
        "name": CONTAINER,
        "image": request.prepared.resolvedImage or spec.containerImage,
        "ports": [{"name": "http", "containerPort": spec.serving_port, "protocol": "TCP"}],
        "env": container_environment(ref, spec, dspec, secret_name, cluster_group),
        "resources": {"limits": gpu_quantity, "requests": gpu_quantity},
        "readinessProbe": readiness_probe(spec.health, spec.serving_port),
    }
    if spec.containerArgs:
        container["command"] = [_escape(word) for word in shlex.split(spec.containerArgs)]
    pod_spec: JSON = {
        "containers": [container],
        # Functions have no business with the cluster's API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(products)}
                            ]
                        }
                    ]
                }
            }
        },
        # GPU nodes are often tainted so that only pods asking for GPUs land there.
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
    }
    if settings.runtime_class:
        pod_spec["runtimeClassName"] = settings.runtime_class
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**labels, SPEC_LABEL: str(request.specIndex)},
            "annotations": annotations,
        },
        "spec": {
            "replicas": request.count,
            "selector": {"matchLabels": selector},
            # The template never changes (versions are immutable); should it, never hold twice the GPUs.
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 1,
            "template": {
                "metadata": {"labels": {**labels, **selector}, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def secret_manifest(name: str, namespace: str, ref: VersionRef, values: dict[str, str]) -> JSON:
    """Return the Secret holding a version's opened secret values."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": version_labels(ref)},
        "stringData": values,
    }


# --- Pods as instances ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodView:
    """What one pod means to the workflow.

    Attributes:
        record: The instance.
        deadline: When this STARTING pod turns ERRORED unless something changes first.
        uid: The pod's uid (ERRORED details are fetched once per pod and error).
        crashed: The container crashed: its previous run's log says why.
    """

    record: InstanceRecord
    deadline: datetime | None = None
    uid: str = ""
    crashed: bool = False


def _time(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def _join(*parts: Any) -> str:
    return ": ".join(str(p) for p in parts if p)


def _main_container(status: JSON) -> JSON:
    statuses = status.get("containerStatuses") or []
    for entry in statuses:
        if entry.get("name") == CONTAINER:
            return dict(entry)
    return dict(statuses[0]) if statuses else {}


def _serving_port(pod: JSON) -> int | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("containerPort"):
                return int(port["containerPort"])
    return None


def _exit_text(container: JSON) -> str:
    state = container.get("state") or {}
    terminated = state.get("terminated") or (container.get("lastState") or {}).get("terminated")
    if not terminated:
        return "crashed"
    text = f"exited with code {terminated.get('exitCode')}"
    if terminated.get("reason"):
        text += f" ({terminated['reason']})"
    if terminated.get("message"):
        text += f": {terminated['message']}"
    return text


def _crash_state(container: JSON) -> tuple[bool, int]:
    """Return (crashed and waiting to restart now, crashes so far)."""
    state = container.get("state") or {}
    restarts = int(container.get("restartCount") or 0)
    down = "terminated" in state or (state.get("waiting") or {}).get("reason") == "CrashLoopBackOff"
    return down, restarts + (1 if down else 0)


def _scheduler_decided(pod: JSON) -> bool:
    """Whether the scheduler placed the pod or said why it cannot."""
    if (pod.get("spec") or {}).get("nodeName"):
        return True
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "PodScheduled" for c in conditions)


def view_pod(pod: JSON, now: datetime, settings: KubeSettings) -> PodView | None:
    """Return what a pod means to the workflow, or None for a pod on its way out (deleted or released).

    Args:
        pod: The pod in the API's JSON form.
        now: The current time (pod timestamps are compared with it).
        settings: The bounds after which a pod that does not start is ERRORED.
    """
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if meta.get("deletionTimestamp") or labels.get(ROLE_LABEL) != ROLE_INSTANCE:
        return None
    name = str(meta.get("name"))
    uid = str(meta.get("uid") or "")
    status = pod.get("status") or {}
    created = _time(meta.get("creationTimestamp")) or now
    ip = status.get("podIP")
    port = _serving_port(pod)
    address = f"http://{ip}:{port}" if ip and port else None
    try:
        spec_index = int(labels.get(SPEC_LABEL, "0"))
    except ValueError:
        spec_index = 0

    def view(
        state: InstanceStatus,
        error: str | None = None,
        deadline: datetime | None = None,
        crashed: bool = False,
    ) -> PodView:
        record = InstanceRecord(
            instanceId=name,
            specIndex=spec_index,
            status=state,
            address=address,
            error=error,
            createdAt=created,
        )
        return PodView(record=record, deadline=deadline, uid=uid, crashed=crashed)

    def bounded(text: str, since: datetime, bound: float, what: str) -> PodView:
        deadline = since + timedelta(seconds=bound)
        if now >= deadline:
            return view(InstanceStatus.ERRORED, f"Pod {name} {what} for more than {bound:g} s: {text}")
        return view(InstanceStatus.STARTING, text, deadline)

    phase = status.get("phase") or "Pending"
    container = _main_container(status)
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready") or {}
    if phase == "Succeeded":
        return view(InstanceStatus.TERMINATED, f"Pod {name} exited: {_exit_text(container)}")
    if phase == "Failed":
        detail = _join(status.get("reason"), status.get("message")) or _exit_text(container)
        return view(InstanceStatus.ERRORED, f"Pod {name} failed: {detail}", crashed=True)
    if phase == "Running" and ready.get("status") == "True":
        return view(InstanceStatus.RUNNING)

    scheduled = conditions.get("PodScheduled") or {}
    if scheduled.get("status") == "False":
        text = _join(scheduled.get("reason") or "Unschedulable", scheduled.get("message"))
        return bounded(text, created, settings.unschedulable_timeout, "could not be scheduled")
    scheduled_at = _time(scheduled.get("lastTransitionTime")) or created

    waiting = (container.get("state") or {}).get("waiting") or {}
    reason = str(waiting.get("reason") or "")
    text = _join(reason, waiting.get("message"))
    if reason in HOPELESS_WAITING:
        return view(InstanceStatus.ERRORED, f"Pod {name}: {text}")
    if reason in IMAGE_ERRORS or reason in CONTAINER_ERRORS:
        what = "could not pull its image" if reason in IMAGE_ERRORS else "could not create its container"
        return bounded(text, scheduled_at, settings.image_pull_timeout, what)

    down, crashes = _crash_state(container)
    if crashes:
        text = f"container {_exit_text(container)}; {crashes} crash{'es' if crashes > 1 else ''}"
        if down and crashes >= settings.crash_loop_restarts:
            return view(InstanceStatus.ERRORED, f"Pod {name} is in CrashLoopBackOff: {text}", crashed=True)
        if down:
            return view(InstanceStatus.STARTING, f"CrashLoopBackOff: {text}")

    running = (container.get("state") or {}).get("running")
    if running is not None:
        # Not ready: since the container started, or since it stopped being ready, whichever is later.
        since = max(
            _time(running.get("startedAt")) or scheduled_at,
            _time(ready.get("lastTransitionTime")) or scheduled_at,
        )
        deadline = since + timedelta(seconds=settings.start_timeout)
        if now >= deadline:
            detail = _join(ready.get("reason"), ready.get("message")) or "not ready"
            return view(
                InstanceStatus.ERRORED,
                f"Pod {name} did not pass its readiness probe within {settings.start_timeout:g} s ({detail})",
                crashed=crashes > 0,
            )
        return view(InstanceStatus.STARTING, f"Restarted: {text}" if crashes else None, deadline)
    return view(InstanceStatus.STARTING)


# --- Errors -----------------------------------------------------------------------------------------


def _status_message(err: ApiException) -> str:
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        return str(err.body or "")[:500]
    return str(body.get("message") or "") if isinstance(body, dict) else ""


def api_error(err: ApiException, action: str) -> ApplicationError:
    """Return the ApplicationError of a failed API call: non-retryable when no retry can succeed.

    Invalid objects (400, 422) and refusals (403) are permanent, except a namespace being deleted;
    server errors, throttling, conflicts and expired credentials are retried by Temporal.
    """
    status = int(err.status or 0)
    message = _status_message(err)
    terminating = status == 403 and "being terminated" in message
    permanent = 400 <= status < 500 and status not in RETRYABLE_CLIENT_ERRORS and not terminating
    kind = {400: "KubernetesBadRequest", 403: "KubernetesForbidden", 422: "KubernetesInvalid"}.get(
        status, "KubernetesApiError"
    )
    return ApplicationError(
        f"Kubernetes API: cannot {action}: {status} {err.reason or ''}: {message}".strip(),
        type=kind,
        non_retryable=permanent,
    )


def _invalid_spec(message: str) -> ApplicationError:
    return ApplicationError(message, type="InvalidSpec", non_retryable=True)


# --- The pod informer -------------------------------------------------------------------------------


class _AlreadyExists(Exception):
    """A create found the object there (409): the idempotent outcome."""


class _WatchExpired(Exception):
    """The watch's resource version is too old (410): list again."""


class _WatchFailed(Exception):
    """The API server ended the watch with an error event: list again after a back-off."""


class PodInformer:
    """Keeps every gpufn pod of one cluster in memory: one list, then one watch, listing again on any gap.

    Runs in its own thread (the `kubernetes` client is synchronous); `on_change` is called from that thread
    with the version ids whose pods changed.
    """

    def __init__(self, core: client.CoreV1Api, on_change: Callable[[set[str]], None], name: str) -> None:
        self._core = core
        self._on_change = on_change
        self._by_version: dict[str, dict[str, JSON]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._response: Any = None
        self.synced = threading.Event()
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"gpufn-pods-{name}", daemon=True)

    def start(self) -> None:
        """Start listing and watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (blocks up to a few seconds)."""
        self._stopping.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()
        self._thread.join(timeout=5)

    def pods(self, version_label: str) -> list[JSON]:
        """Return the pods of a version (by its label value), released and terminating ones included."""
        with self._lock:
            return list(self._by_version.get(version_label, {}).values())

    def _run(self) -> None:
        backoff = RELIST_BACKOFF_SECONDS[0]
        while not self._stopping.is_set():
            try:
                version = self._relist()
                backoff = RELIST_BACKOFF_SECONDS[0]
                while not self._stopping.is_set():
                    version = self._watch(version)
            except _WatchExpired:
                continue
            except Exception as err:
                # Whatever breaks the watch (connection refused, timeouts, 5xx, a dropped stream), the
                # informer must outlive it: list again after a back-off.
                if self._stopping.is_set():
                    return
                self.last_error = f"{type(err).__name__}: {err}"
                log.warning("Pod watch failed (%s); listing again in %.1f s", self.last_error, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, RELIST_BACKOFF_SECONDS[1])

    def _relist(self) -> str:
        listed = read_json(self._core.list_pod_for_all_namespaces, label_selector=MANAGED_SELECTOR)
        fresh: dict[str, dict[str, JSON]] = {}
        for pod in listed.get("items") or []:
            key = (pod["metadata"].get("labels") or {}).get(VERSION_LABEL, "")
            fresh.setdefault(key, {})[pod["metadata"]["uid"]] = pod
        with self._lock:
            changed = set(self._by_version) | set(fresh)
            self._by_version = fresh
        self.last_error = None
        self.synced.set()
        self._on_change(changed)
        return str(listed["metadata"].get("resourceVersion") or "")

    def _watch(self, resource_version: str) -> str:
        response: Any = self._core.list_pod_for_all_namespaces(
            label_selector=MANAGED_SELECTOR,
            watch=True,
            resource_version=resource_version,
            timeout_seconds=WATCH_SECONDS,
            allow_watch_bookmarks=True,
            _preload_content=False,
            _request_timeout=(REQUEST_TIMEOUT[0], WATCH_SECONDS + 30),
        )
        self._response = response
        try:
            for line in iter_resp_lines(response):
                if not line or self._stopping.is_set():
                    continue
                event = json.loads(line)
                kind, pod = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if pod.get("code") == 410:
                        raise _WatchExpired()
                    raise _WatchFailed(f"{pod.get('code')} {pod.get('reason')}: {pod.get('message')}")
                resource_version = str(pod.get("metadata", {}).get("resourceVersion") or resource_version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._apply(kind, pod)
        finally:
            self._response = None
            response.release_conn()
        return resource_version

    def _apply(self, kind: str, pod: JSON) -> None:
        meta = pod["metadata"]
        key = (meta.get("labels") or {}).get(VERSION_LABEL, "")
        with self._lock:
            pods = self._by_version.setdefault(key, {})
            if kind == "DELETED":
                pods.pop(meta["uid"], None)
                if not pods:
                    del self._by_version[key]
            else:
                pods[meta["uid"]] = pod
        self._on_change({key})


# --- The backend ------------------------------------------------------------------------------------


class KubernetesBackend:
    """The `Backend` of one Kubernetes cluster (cluster group): container functions as Deployments.

    Args:
        kubeconfig: The cluster's kubeconfig; its current context is used.
        secret_box: Opens the version's sealed secrets.
        settings: Bounds and knobs.
        name: The cluster group name (default: derived from the kubeconfig).
    """

    def __init__(
        self, kubeconfig: Path, secret_box: SecretBox, settings: KubeSettings, name: str | None = None
    ) -> None:
        self.cluster_group = name or cluster_group_names([kubeconfig])[0]
        self._client = api_client(kubeconfig)
        self._core = client.CoreV1Api(self._client)
        self._apps = client.AppsV1Api(self._client)
        self._box = secret_box
        self._settings = settings
        self._executor = ThreadPoolExecutor(EXECUTOR_THREADS, thread_name_prefix=f"kube-{self.cluster_group}")
        self._informer = PodInformer(self._core, self._pods_changed, self.cluster_group)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._synced = asyncio.Event()
        self._changed: dict[str, asyncio.Event] = {}
        self._deadlines: dict[str, datetime] = {}
        self._details: dict[str, dict[tuple[str, str], tuple[str, str | None]]] = {}
        self._namespaces: set[str] = set()

    # --- Lifecycle of the backend itself ------------------------------------------------------------

    async def start(self) -> None:
        """Start watching the cluster's gpufn pods (does not wait for the cluster)."""
        self._loop = asyncio.get_running_loop()
        self._informer.start()

    async def close(self) -> None:
        """Stop watching and close the API client."""
        await asyncio.get_running_loop().run_in_executor(None, self._informer.stop)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # --- Backend verbs ------------------------------------------------------------------------------

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        """Check that the cluster can run the spec: an image, nodes with its GPU, an object it accepts.

        Raises:
            ApplicationError: Non-retryable when the cluster can never run the spec as it is.
        """
        spec = request.spec
        if spec.helmChart:
            raise _invalid_spec(
                f"Helm-chart functions are not served by the container backend of cluster group "
                f"'{self.cluster_group}'"
            )
        if not spec.containerImage:
            raise _invalid_spec("A container function needs a containerImage")
        if spec.containerArgs:
            try:
                shlex.split(spec.containerArgs)
            except ValueError as err:
                raise _invalid_spec(f"containerArgs is not a valid shell-quoted command line: {err}") from err
        gpu, count = self._instance_type(request.deploymentSpec)
        products = self._products(await self._run(self._gpu_nodes), gpu, count, permanent=True)
        # A server-side dry run of the Deployment: permissions, admission and quota refuse it here, where
        # the workflow ends in ERROR with the reason, rather than later while it scales.
        ref = request.ref
        namespace = namespace_name(self._settings.namespace_prefix, ref.accountId)
        name = deployment_name(ref.versionId, 0)
        await self._ensure_namespace(namespace)
        draft = EnsureInstancesInput(
            ref=ref,
            spec=spec,
            deploymentSpec=request.deploymentSpec,
            specIndex=0,
            count=0,
            prepared=PrepareResult(resolvedImage=spec.containerImage),
        )
        manifest = deployment_manifest(
            request=draft,
            name=name,
            namespace=namespace,
            gpus=count,
            products=products,
            secret_name=name if spec.encryptedSecrets else None,
            cluster_group=self.cluster_group,
            settings=self._settings,
        )
        await self._run(
            self._call,
            "create a Deployment",
            self._apps.create_namespaced_deployment,
            namespace,
            manifest,
            dry_run="All",
            ok=(409,),
        )
        return PrepareResult(resolvedImage=spec.containerImage)

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        """Remove exactly the pods in `request.remove`, then give the spec's Deployment `count` replicas.

        Idempotent: a retry finds the released pods released (or gone), the Deployment created, the replica
        count already right.
        """
        ref = request.ref
        namespace = namespace_name(self._settings.namespace_prefix, ref.accountId)
        name = deployment_name(ref.versionId, request.specIndex)
        await self._wait_synced()
        await self._ensure_namespace(namespace)
        released = await self._run(self._release_pods, namespace, ref.versionId, request.remove)
        current = await self._run(
            self._call, "read a Deployment", self._apps.read_namespaced_deployment, name, namespace, ok=(404,)
        )
        if current is None:
            await self._create(request, namespace, name)
        else:
            if request.spec.encryptedSecrets:
                # Secrets updated since the deploy reach the pods started from now on.
                await self._run(self._refresh_secret, namespace, name, self._open_secrets(request.spec))
            if (current.get("spec") or {}).get("replicas") != request.count:
                await self._run(self._scale, namespace, name, request.count)
        if released:
            await self._run(self._delete_pods, namespace, released)
        await self._fence(ref.versionId, request.specIndex, released, request.count)
        return await self.observe(ref, [])

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        """Return the version's instances in this cluster, from the watched pods."""
        await self._wait_synced()
        self._event(ref.versionId).clear()
        pods = self._informer.pods(label_value(ref.versionId))
        now = datetime.now(UTC)
        views = [v for v in (view_pod(p, now, self._settings) for p in pods) if v is not None]
        deadlines = [v.deadline for v in views if v.deadline is not None]
        if deadlines:
            self._deadlines[ref.versionId] = min(deadlines)
        else:
            self._deadlines.pop(ref.versionId, None)
        records = [await self._explained(ref.versionId, pods, v) for v in views]
        cache = self._details.get(ref.versionId)
        if cache:
            alive = {v.uid for v in views}
            for key in [k for k in cache if k[0] not in alive]:
                del cache[key]
        return sorted(records, key=lambda r: (r.createdAt or now, r.instanceId))

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        """Return when a pod of the version changed, a pod's bound passed, or after `max_wait` seconds."""
        timeout = max(0.0, max_wait)
        deadline = self._deadlines.get(ref.versionId)
        if deadline is not None:
            until = (deadline - datetime.now(UTC)).total_seconds() + WAKE_SLACK_SECONDS
            timeout = min(timeout, max(WAKE_SLACK_SECONDS, until))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event(ref.versionId).wait(), timeout=timeout)

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        """Delete every object of the version; return once no pod of it is left."""
        namespace = namespace_name(self._settings.namespace_prefix, ref.accountId)
        selector = version_selector(ref.versionId)
        await self._run(self._delete_controllers, namespace, selector)
        while True:
            pods = await self._run(
                self._call,
                "list pods",
                self._core.list_namespaced_pod,
                namespace,
                label_selector=selector,
                ok=(404,),
            )
            items = (pods or {}).get("items") or []
            if not items:
                break
            if any(not p["metadata"].get("deletionTimestamp") for p in items):
                # Pods the ReplicaSet made before it went, or released pods a crashed worker left.
                await self._run(self._delete_controllers, namespace, selector)
                await self._run(
                    self._call,
                    "delete pods",
                    self._core.delete_collection_namespaced_pod,
                    namespace,
                    label_selector=selector,
                    ok=(404,),
                )
            await self._run(self._force_delete_stuck, namespace, items)
            await asyncio.sleep(POLL_SECONDS)
        self._changed.pop(label_value(ref.versionId), None)
        self._deadlines.pop(ref.versionId, None)
        self._details.pop(ref.versionId, None)

    # --- Helpers: threads, events, errors -----------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call in this backend's threads, so the event loop never waits for the cluster."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def _call(
        self, action: str, fn: Callable[..., Any], *args: Any, ok: Iterable[int] = (), **kwargs: Any
    ) -> Any:
        """Make one API call and return its JSON; None for a status in `ok` (the idempotent outcomes)."""
        try:
            return read_json(fn, *args, **kwargs)
        except ApiException as err:
            if err.status in set(ok):
                return None
            raise api_error(err, action) from err

    def _event(self, version_id: str) -> asyncio.Event:
        """Return the event set when a pod of the version changes (keyed like the informer: by label)."""
        return self._changed.setdefault(label_value(version_id), asyncio.Event())

    def _pods_changed(self, versions: set[str]) -> None:
        """Called by the informer's thread: wake the watchers of the changed versions."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake, versions)

    def _wake(self, versions: set[str]) -> None:
        self._synced.set()
        for version in versions:
            event = self._changed.get(version)
            if event is not None:
                event.set()

    async def _wait_synced(self) -> None:
        if self._informer.synced.is_set():
            return
        try:
            await asyncio.wait_for(self._synced.wait(), timeout=SYNC_TIMEOUT_SECONDS)
        except TimeoutError:
            reason = self._informer.last_error or "no answer"
            raise ApplicationError(
                f"Cluster '{self.cluster_group}' cannot be reached: {reason}",
                type="KubernetesUnavailable",
            ) from None

    # --- Helpers: placement --------------------------------------------------------------------------

    def _instance_type(self, dspec: DeploymentSpecification) -> tuple[str, int]:
        parsed = parse_instance_type(self.cluster_group, dspec.instanceType)
        if parsed is None or parsed[0] != dspec.gpu:
            raise _invalid_spec(
                f"Invalid InstanceType '{dspec.instanceType}' for GPU '{dspec.gpu}' in cluster group "
                f"'{self.cluster_group}'"
            )
        return parsed

    def _gpu_nodes(self) -> list[GpuNode]:
        listed = self._call("list nodes", self._core.list_node)
        return gpu_nodes(listed.get("items") or [])

    def _products(self, nodes: list[GpuNode], gpu: str, count: int, permanent: bool) -> list[str]:
        """Return the GPU products a pod of `count` `gpu`s may run on.

        Args:
            nodes: The cluster's GPU nodes now.
            gpu: The short GPU name.
            count: GPUs per instance.
            permanent: Whether a missing GPU is final (at prepare), or may come back (nodes replaced
                between prepare and a later scale-up: retried).
        """
        products = products_of(nodes, gpu)
        if not products:
            raise ApplicationError(
                f"Cluster '{self.cluster_group}' has no node with {gpu} GPUs (label {GPU_PRODUCT_LABEL})",
                type="NoSuchGpu",
                non_retryable=permanent,
            )
        largest = max(n.gpus for n in nodes if n.gpu == gpu)
        if largest < count:
            raise ApplicationError(
                f"No node of cluster '{self.cluster_group}' has {count} {gpu} GPUs "
                f"(the largest has {largest})",
                type="InstanceTypeTooLarge",
                non_retryable=permanent,
            )
        return products

    # --- Helpers: objects ----------------------------------------------------------------------------

    async def _ensure_namespace(self, namespace: str) -> None:
        """Create the account's namespace once, and wait until pods can be created in it."""
        if namespace in self._namespaces:
            return
        body = {"metadata": {"name": namespace, "labels": {MANAGED_BY_LABEL: MANAGER}}}
        await self._run(self._call, "create a namespace", self._core.create_namespace, body, ok=(409,))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + NAMESPACE_READY_SECONDS
        # Pods are refused until the service-account controller has made the namespace's default account.
        while (
            await self._run(
                self._call,
                "read a service account",
                self._core.read_namespaced_service_account,
                "default",
                namespace,
                ok=(404,),
            )
            is None
        ):
            if loop.time() > deadline:
                raise ApplicationError(
                    f"Namespace {namespace} has no default service account yet", type="NamespaceNotReady"
                )
            await asyncio.sleep(0.05)
        self._namespaces.add(namespace)

    async def _create(self, request: EnsureInstancesInput, namespace: str, name: str) -> None:
        """Create the spec's Secret and Deployment (idempotent), and make the Deployment own the Secret."""
        ref, spec = request.ref, request.spec
        gpu, count = self._instance_type(request.deploymentSpec)
        products = self._products(await self._run(self._gpu_nodes), gpu, count, permanent=False)
        secret_name = name if spec.encryptedSecrets else None
        secret = (
            secret_manifest(secret_name, namespace, ref, self._open_secrets(spec))
            if secret_name is not None
            else None
        )
        manifest = deployment_manifest(
            request=request,
            name=name,
            namespace=namespace,
            gpus=count,
            products=products,
            secret_name=secret_name,
            cluster_group=self.cluster_group,
            settings=self._settings,
        )
        await self._run(self._create_objects, namespace, name, manifest, secret, request.count)

    def _create_objects(
        self, namespace: str, name: str, manifest: JSON, secret: JSON | None, replicas: int
    ) -> None:
        """Create the Secret, then the Deployment, then make the Deployment own the Secret (idempotent)."""
        try:
            if secret is not None:
                with contextlib.suppress(_AlreadyExists):
                    self._create_object(self._core.create_namespaced_secret, namespace, secret)
            try:
                created = self._create_object(self._apps.create_namespaced_deployment, namespace, manifest)
            except _AlreadyExists:
                created = self._call(
                    "read a Deployment", self._apps.read_namespaced_deployment, name, namespace
                )
                if (created.get("spec") or {}).get("replicas") != replicas:
                    self._scale(namespace, name, replicas)
        except ApiException as err:
            if err.status == 404:
                # The namespace went away behind our back: create it again on the retry.
                self._namespaces.discard(namespace)
            raise api_error(err, f"create the objects of {namespace}/{name}") from err
        log.info("Deployment %s/%s of cluster %s: %s replicas", namespace, name, self.cluster_group, replicas)
        if secret is not None:
            owner = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": name,
                "uid": created["metadata"]["uid"],
            }
            self._call(
                "own a Secret",
                self._core.patch_namespaced_secret,
                secret["metadata"]["name"],
                namespace,
                {"metadata": {"ownerReferences": [owner]}},
                _content_type=MERGE_PATCH,
            )

    @staticmethod
    def _create_object(fn: Callable[..., Any], namespace: str, body: JSON) -> JSON:
        try:
            created: JSON = read_json(fn, namespace, body)
        except ApiException as err:
            if err.status == 409:
                raise _AlreadyExists() from err
            raise
        return created

    def _open_secrets(self, spec: FunctionVersionSpec) -> dict[str, str]:
        values = {}
        for secret, sealed in spec.encryptedSecrets.items():
            try:
                values[secret] = self._box.open(sealed, secret_context(spec.versionId, secret))
            except (InvalidTag, ValueError) as err:
                raise ApplicationError(
                    f"Secret '{secret}' cannot be opened with this worker's secret key",
                    type="SecretUnreadable",
                    non_retryable=True,
                ) from err
        return values

    def _refresh_secret(self, namespace: str, name: str, values: dict[str, str]) -> None:
        """Write the version's current secret values into its Secret where they differ (one read)."""
        secret = self._call("read a Secret", self._core.read_namespaced_secret, name, namespace, ok=(404,))
        if secret is None:
            return
        stored = secret.get("data") or {}
        changed = {
            key: value
            for key, value in values.items()
            if stored.get(key) != base64.b64encode(value.encode()).decode()
        }
        if changed:
            self._call(
                "update a Secret",
                self._core.patch_namespaced_secret,
                name,
                namespace,
                {"stringData": changed},
                _content_type=MERGE_PATCH,
            )
            log.info("Secret %s/%s: %d value(s) updated", namespace, name, len(changed))

    def _scale(self, namespace: str, name: str, replicas: int) -> None:
        self._call(
            "scale a Deployment",
            self._apps.patch_namespaced_deployment,
            name,
            namespace,
            {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH,
        )
        log.info("Deployment %s/%s of cluster %s: %s replicas", namespace, name, self.cluster_group, replicas)

    def _release_pods(self, namespace: str, version_id: str, names: list[str]) -> list[str]:
        """Take the named pods of the version out of their ReplicaSet; return those that exist."""
        released = []
        for pod_name in names:
            pod = self._call("read a pod", self._core.read_namespaced_pod, pod_name, namespace, ok=(404,))
            if pod is None:
                continue
            labels = pod["metadata"].get("labels") or {}
            if labels.get(VERSION_LABEL) != label_value(version_id):
                log.warning("Not removing pod %s/%s: not of version %s", namespace, pod_name, version_id)
                continue
            if labels.get(ROLE_LABEL) != ROLE_RELEASED:
                patched = self._call(
                    "release a pod",
                    self._core.patch_namespaced_pod,
                    pod_name,
                    namespace,
                    {"metadata": {"labels": {ROLE_LABEL: ROLE_RELEASED}}},
                    _content_type=MERGE_PATCH,
                    ok=(404,),
                )
                if patched is None:
                    continue
            released.append(pod_name)
        return released

    def _delete_pods(self, namespace: str, names: list[str]) -> None:
        for pod_name in names:
            self._call("delete a pod", self._core.delete_namespaced_pod, pod_name, namespace, ok=(404,))
            log.info("Removed pod %s/%s of cluster %s", namespace, pod_name, self.cluster_group)

    def _force_delete_stuck(self, namespace: str, pods: list[JSON]) -> None:
        """Force the deletion of pods terminating long past their grace period (their node is gone)."""
        now = datetime.now(UTC)
        for pod in pods:
            meta = pod["metadata"]
            due = _time(meta.get("deletionTimestamp"))
            if due is not None and now > due + timedelta(seconds=FORCE_DELETE_AFTER_SECONDS):
                log.warning("Pod %s/%s is stuck terminating: deleting it by force", namespace, meta["name"])
                self._call(
                    "force the deletion of a pod",
                    self._core.delete_namespaced_pod,
                    meta["name"],
                    namespace,
                    grace_period_seconds=0,
                    ok=(404,),
                )

    def _delete_controllers(self, namespace: str, selector: str) -> None:
        """Delete the version's Deployments, ReplicaSets and Secrets; their pods go with them."""
        for action, fn in (
            ("delete Deployments", self._apps.delete_collection_namespaced_deployment),
            ("delete ReplicaSets", self._apps.delete_collection_namespaced_replica_set),
        ):
            self._call(
                action, fn, namespace, label_selector=selector, propagation_policy="Background", ok=(404,)
            )
        self._call(
            "delete Secrets",
            self._core.delete_collection_namespaced_secret,
            namespace,
            label_selector=selector,
            ok=(404,),
        )

    async def _fence(self, version_id: str, spec_index: int, released: list[str], count: int) -> None:
        """Wait (briefly) until the watch shows what was just done, and the scheduler's verdict on new pods.

        That is: the released pods gone, `count` pods live, each placed or refused by the scheduler.
        Otherwise the answer could show a released pod, or the replacement its ReplicaSet made before the
        replica count went down, and the workflow would act on that; and a pod that cannot be scheduled
        would not say why until its status changes again.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FENCE_SECONDS
        wanted = set(released)
        while loop.time() < deadline:
            now = datetime.now(UTC)
            views = [
                (p, view_pod(p, now, self._settings)) for p in self._informer.pods(label_value(version_id))
            ]
            leftover = any(v is not None and v.record.instanceId in wanted for _, v in views)
            live = [p for p, v in views if v is not None and v.record.specIndex == spec_index]
            if not leftover and len(live) == count and all(_scheduler_decided(p) for p in live):
                return
            await asyncio.sleep(0.02)
        log.info(
            "The pod watch of cluster %s is behind %s after %s s",
            self.cluster_group,
            version_id,
            FENCE_SECONDS,
        )

    # --- Helpers: explaining failures ---------------------------------------------------------------

    async def _explained(self, version_id: str, pods: list[JSON], view: PodView) -> InstanceRecord:
        """Return the record, with the pod's warning events and last log lines when it is ERRORED."""
        record = view.record
        if record.status != InstanceStatus.ERRORED or not record.error:
            return record
        cache = self._details.setdefault(version_id, {})
        key = (view.uid, record.error)
        if key not in cache:
            pod = next((p for p in pods if p["metadata"].get("uid") == view.uid), None)
            if pod is None:
                return record
            cache[key] = await self._run(self._details_of, pod, view.crashed, record.error)
        events, tail = cache[key]
        error = f"{record.error}\nEvents: {events}" if events else record.error
        return record.model_copy(update={"error": error, "logTail": tail})

    def _details_of(self, pod: JSON, crashed: bool, error: str) -> tuple[str, str | None]:
        """Return the pod's last warning events that `error` does not say, and its last log lines.

        Best effort: events may have expired, and logs need the kubelet (and the container's runtime).
        """
        meta = pod["metadata"]
        events = ""
        try:
            listed = read_json(
                self._core.list_namespaced_event,
                meta["namespace"],
                field_selector=f"involvedObject.uid={meta['uid']},type=Warning",
            )
            items = sorted(
                listed.get("items") or [],
                key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""),
            )
            messages: list[str] = []
            for item in reversed(items):
                message = str(item.get("message") or "")
                if message and message not in messages and message not in error:
                    messages.append(message)
                if len(messages) == WARNING_EVENTS:
                    break
            events = "; ".join(reversed(messages))
        except (ApiException, OSError, ValueError, HTTPError) as err:
            log.info("No events of pod %s: %s", meta["name"], err)
        return events, self._log_tail(meta["namespace"], meta["name"], crashed)

    def _log_tail(self, namespace: str, pod: str, previous: bool) -> str | None:
        for earlier in (True, False) if previous else (False,):
            try:
                response: Any = self._core.read_namespaced_pod_log(
                    pod,
                    namespace,
                    container=CONTAINER,
                    tail_lines=LOG_TAIL_LINES,
                    previous=earlier,
                    _preload_content=False,
                    _request_timeout=LOG_TIMEOUT,
                )
                try:
                    text = response.data.decode(errors="replace").strip()
                finally:
                    response.release_conn()
            except (ApiException, OSError, ValueError, HTTPError) as err:
                log.info("No log of pod %s/%s: %s", namespace, pod, err)
                continue
            if text:
                return text
        return None


def kubernetes_backends(
    kubeconfigs: Sequence[Path], secret_box: SecretBox, settings: KubeSettings
) -> list[KubernetesBackend]:
    """Return one backend per configured cluster, each named after its kubeconfig's cluster."""
    names = cluster_group_names(kubeconfigs)
    return [
        KubernetesBackend(path, secret_box, settings, name)
        for path, name in zip(kubeconfigs, names, strict=True)
    ]
