"""What a pod means to the workflow: its instance state, and why it is not running.

A pod is RUNNING when it is Running and Ready; otherwise it is STARTING, with the scheduler's or the
kubelet's reason as its error, until a bound passes (image pull, unschedulable, crash loop, not ready) and
it is ERRORED, with the reason. Both backends judge their pods by these rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from activities.kube.config import KubeSettings
from activities.kube.names import CONTAINER, ROLE_INSTANCE, ROLE_LABEL, SPEC_LABEL
from workflows.models import InstanceRecord, InstanceStatus

JSON = dict[str, Any]

IMAGE_ERRORS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "RegistryUnavailable", "SignatureValidationFailed"}
)
CONTAINER_ERRORS = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "PreCreateHookError", "PreStartHookError"}
)
"""Waiting reasons that persist until someone fixes the spec or the registry: bounded like image pulls."""
HOPELESS_WAITING = frozenset({"InvalidImageName", "ErrImageNeverPull"})
"""Waiting reasons no amount of waiting fixes."""


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


def parse_time(text: Any) -> datetime | None:
    """Return a timestamp of the API (RFC 3339) as a datetime, or None when there is none."""
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


def scheduler_decided(pod: JSON) -> bool:
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
    created = parse_time(meta.get("creationTimestamp")) or now
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
    scheduled_at = parse_time(scheduled.get("lastTransitionTime")) or created

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
            parse_time(running.get("startedAt")) or scheduled_at,
            parse_time(ready.get("lastTransitionTime")) or scheduled_at,
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
