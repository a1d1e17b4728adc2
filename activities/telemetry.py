"""The worker's Prometheus metrics, taken from what its activities already return.

An activity interceptor (`MetricsInterceptor`) sees every activity's input and result, which is where the
worker learns about instances and scaling decisions:

* every activity: runs and failures by activity type and error type;
* `observe_instances` / `watch_version` results: the whole list of a version's instances, so an instance
  seen for the first time is a start, one that turns RUNNING ends its cold start, one that turns ERRORED is a
  failure, and one that is missing has stopped; `teardown` stops them all;
* `watch_version` results with a decision: a scaling decision, by the rule that fired and its direction.

Instance-seconds (and GPU-seconds, instance-seconds times the GPUs of the instance type) are counted from
the first time the worker saw an instance until it saw it gone, per version and spec: the usage the
operator bills. A worker that restarts starts counting again from the instances it then sees, so usage is
exact while one worker runs and undercounts by at most the restart gap otherwise (documented).

Deployments by state come from Temporal's visibility (a count query per state every
`DEPLOYMENT_COUNT_SECONDS`), not from the worker's own memory, so every worker reports the same numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from gpufn.kube_inventory import parse_instance_type
from workflows.models import (
    DeploymentSpecification,
    FunctionStatus,
    InstanceRecord,
    InstanceStatus,
    VersionRef,
)

log = logging.getLogger(__name__)

COLD_START_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
DEPLOYMENT_COUNT_SECONDS = 15.0

SPEC_LABELS = ("function_id", "version_id", "gpu", "instance_type")


@dataclass
class _Tracked:
    status: InstanceStatus
    first_seen: float
    labels: tuple[str, str, str, str]
    gpus: int


class WorkerMetrics:
    """The worker's metric families and the instances it tracks for them.

    Args:
        registry: Where the families are registered (a fresh registry when omitted).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.activities = Counter(
            "gpufn_worker_activities",
            "Activity executions by type and result (ok, or the failure's error type).",
            ("activity", "result"),
            registry=reg,
        )
        self.instance_starts = Counter(
            "gpufn_worker_instance_starts", "Instances the worker saw appear.", SPEC_LABELS, registry=reg
        )
        self.instance_failures = Counter(
            "gpufn_worker_instance_failures",
            "Instances the worker saw turn ERRORED.",
            SPEC_LABELS,
            registry=reg,
        )
        self.cold_start = Histogram(
            "gpufn_worker_instance_cold_start_seconds",
            "Time from an instance's creation (or first sight) until it was RUNNING (healthy).",
            SPEC_LABELS,
            buckets=COLD_START_BUCKETS,
            registry=reg,
        )
        self.scaling_decisions = Counter(
            "gpufn_worker_scaling_decisions",
            "Autoscaler decisions that changed a version's instance count, by the rule that fired.",
            ("function_id", "version_id", "rule", "direction"),
            registry=reg,
        )
        self.deployments = Gauge(
            "gpufn_worker_deployments",
            "Function versions of this task queue by state (from Temporal's visibility).",
            ("state",),
            registry=reg,
        )
        self._instances: dict[str, _Tracked] = {}
        self._used_seconds: dict[tuple[str, str, str, str], float] = {}
        self._used_gpu_seconds: dict[tuple[str, str, str, str], float] = {}
        reg.register(_UsageCollector(self))

    # --- what the interceptor feeds -----------------------------------------------------------------

    def activity_result(self, activity_type: str, error: BaseException | None) -> None:
        """Count one activity execution."""
        if error is None:
            result = "ok"
        elif isinstance(error, ApplicationError) and error.type:
            result = error.type
        else:
            result = type(error).__name__
        self.activities.labels(activity_type, result).inc()

    def instances_seen(
        self,
        ref: VersionRef,
        specs: list[DeploymentSpecification],
        instances: list[InstanceRecord],
        complete: bool,
        now: float | None = None,
    ) -> None:
        """Update the tracked instances of a version; `complete`: the list holds all of them."""
        now = time.time() if now is None else now
        seen: set[str] = set()
        for record in instances:
            seen.add(record.instanceId)
            tracked = self._instances.get(record.instanceId)
            if tracked is None:
                spec = specs[record.specIndex] if 0 <= record.specIndex < len(specs) else None
                labels = (
                    ref.functionId,
                    ref.versionId,
                    spec.gpu if spec else "",
                    spec.instanceType if spec else "",
                )
                born = record.createdAt.timestamp() if record.createdAt is not None else now
                tracked = _Tracked(InstanceStatus.STARTING, min(born, now), labels, _gpus(spec))
                self._instances[record.instanceId] = tracked
                self.instance_starts.labels(*labels).inc()
            if record.status == tracked.status:
                continue
            if record.status == InstanceStatus.RUNNING and tracked.status == InstanceStatus.STARTING:
                self.cold_start.labels(*tracked.labels).observe(now - tracked.first_seen)
            elif record.status == InstanceStatus.ERRORED:
                self.instance_failures.labels(*tracked.labels).inc()
            tracked.status = record.status
        if complete:
            self.version_gone(ref, keep=seen, now=now)

    def version_gone(self, ref: VersionRef, keep: set[str] | None = None, now: float | None = None) -> None:
        """Stop counting the version's instances (all of them, or those not in `keep`)."""
        now = time.time() if now is None else now
        for instance_id, tracked in list(self._instances.items()):
            if tracked.labels[1] != ref.versionId or (keep is not None and instance_id in keep):
                continue
            self._account(tracked, now)
            del self._instances[instance_id]

    def scaling_decision(self, ref: VersionRef, rule: str, current: int, desired: int) -> None:
        """Count a decision of the autoscaler."""
        direction = "up" if desired > current else "down" if desired < current else "hold"
        self.scaling_decisions.labels(ref.functionId, ref.versionId, rule, direction).inc()

    # --- usage ----------------------------------------------------------------------------------------

    def _account(self, tracked: _Tracked, now: float) -> None:
        seconds = max(0.0, now - tracked.first_seen)
        self._used_seconds[tracked.labels] = self._used_seconds.get(tracked.labels, 0.0) + seconds
        self._used_gpu_seconds[tracked.labels] = (
            self._used_gpu_seconds.get(tracked.labels, 0.0) + seconds * tracked.gpus
        )

    def usage(self, now: float | None = None) -> tuple[dict[Any, float], dict[Any, float]]:
        """Return instance-seconds and GPU-seconds by spec labels: stopped instances plus live ones so far."""
        now = time.time() if now is None else now
        seconds = dict(self._used_seconds)
        gpu_seconds = dict(self._used_gpu_seconds)
        for tracked in self._instances.values():
            live = max(0.0, now - tracked.first_seen)
            seconds[tracked.labels] = seconds.get(tracked.labels, 0.0) + live
            gpu_seconds[tracked.labels] = gpu_seconds.get(tracked.labels, 0.0) + live * tracked.gpus
        return seconds, gpu_seconds

    async def count_deployments(self, client: Client, task_queue: str) -> None:
        """Keep the deployments-by-state gauge current from Temporal's visibility until cancelled."""
        while True:
            for state in FunctionStatus:
                query = f"TaskQueue = '{task_queue}' AND GpufnStatus = '{state.value}'"
                with contextlib.suppress(Exception):
                    counted = await client.count_workflows(query)
                    self.deployments.labels(state.value).set(counted.count)
            await asyncio.sleep(DEPLOYMENT_COUNT_SECONDS)


def _gpus(spec: DeploymentSpecification | None) -> int:
    """Return the GPUs of one instance of the spec (0 for CPU instance types)."""
    if spec is None or spec.gpu.upper() == "CPU":
        return 0
    group = spec.instanceType.split(".", 1)[0]
    parsed = parse_instance_type(group, spec.instanceType)
    return parsed[1] if parsed is not None else 1


class _UsageCollector(Collector):
    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        seconds, gpu_seconds = self._metrics.usage()
        for name, help_text, values in (
            (
                "gpufn_worker_instance_seconds",
                "Seconds instances existed (from creation or first sight until gone), by version and spec.",
                seconds,
            ),
            (
                "gpufn_worker_gpu_seconds",
                "Instance-seconds times the GPUs of the instance type, by version and spec.",
                gpu_seconds,
            ),
        ):
            family = CounterMetricFamily(name, help_text, labels=list(SPEC_LABELS))
            for labels, value in sorted(values.items()):
                family.add_metric(list(labels), value)
            yield family


class MetricsInterceptor(Interceptor):
    """Feeds `WorkerMetrics` from every activity's input and result (no change to the activities)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        """Wrap the activity inbound chain."""
        return _ActivityMetrics(next, self._metrics)


class _ActivityMetrics(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, metrics: WorkerMetrics) -> None:
        super().__init__(next)
        self._metrics = metrics

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        activity_type = activity.info().activity_type
        try:
            result = await super().execute_activity(input)
        except BaseException as error:
            self._metrics.activity_result(activity_type, error)
            raise
        self._metrics.activity_result(activity_type, None)
        try:
            self._observe(activity_type, input.args[0] if input.args else None, result)
        except Exception:  # metrics never fail an activity
            log.exception("Recording metrics of activity %s failed", activity_type)
        return result

    def _observe(self, activity_type: str, request: Any, result: Any) -> None:
        ref = getattr(request, "ref", None)
        if not isinstance(ref, VersionRef):
            return
        instances: list[InstanceRecord] | None = getattr(result, "instances", None)
        if activity_type in ("observe_instances", "watch_version") and instances is not None:
            # Both return every instance of the version.
            self._metrics.instances_seen(ref, request.specs, instances, complete=True)
        elif activity_type == "ensure_instances" and instances is not None:
            # The instances of one spec: new ones start, none is gone.
            specs = [request.deploymentSpec] * (request.specIndex + 1)
            self._metrics.instances_seen(ref, specs, instances, complete=False)
        elif activity_type == "teardown":
            self._metrics.version_gone(ref)
        decision = getattr(result, "decision", None)
        if decision is not None:
            self._metrics.scaling_decision(ref, decision.rule, decision.current, decision.desired)
