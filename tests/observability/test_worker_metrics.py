"""The worker's instance bookkeeping: starts, cold starts, failures, usage and scaling decisions.

`WorkerMetrics` is fed the instance lists the lifecycle activities return (the full-stack test in
test_stack_observability.py feeds it from a real worker); here the lists and clock are given, so the
counts and seconds are exact.
"""

from __future__ import annotations

from datetime import UTC, datetime

from activities.telemetry import WorkerMetrics
from workflows.models import DeploymentSpecification, InstanceRecord, InstanceStatus, VersionRef

REF = VersionRef(accountId="acct", functionId="fn", versionId="ver")
SPECS = [
    DeploymentSpecification(gpu="H100", instanceType="LOCAL.GPU.H100_2x", minInstances=1, maxInstances=2),
]
LABELS = {"function_id": "fn", "version_id": "ver", "gpu": "H100", "instance_type": "LOCAL.GPU.H100_2x"}
T0 = 1_000_000.0


def instance(instance_id: str, status: InstanceStatus) -> InstanceRecord:
    created = datetime.fromtimestamp(T0, UTC)
    return InstanceRecord(instanceId=instance_id, specIndex=0, status=status, createdAt=created)


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels or LABELS)
    return 0.0 if found is None else found


def test_instance_lifecycle_and_usage() -> None:
    metrics = WorkerMetrics()
    metrics.instances_seen(REF, SPECS, [instance("a", InstanceStatus.STARTING)], complete=True, now=T0 + 1)
    metrics.instances_seen(REF, SPECS, [instance("a", InstanceStatus.RUNNING)], complete=True, now=T0 + 12)
    assert value(metrics, "gpufn_worker_instance_starts_total") == 1
    assert value(metrics, "gpufn_worker_instance_cold_start_seconds_count") == 1
    assert value(metrics, "gpufn_worker_instance_cold_start_seconds_sum") == 12  # from createdAt
    seconds, gpu_seconds = metrics.usage(now=T0 + 20)
    key = tuple(LABELS.values())
    assert seconds[key] == 20 and gpu_seconds[key] == 40  # two GPUs per instance

    metrics.instances_seen(
        REF,
        SPECS,
        [instance("a", InstanceStatus.ERRORED), instance("b", InstanceStatus.STARTING)],
        complete=True,
        now=T0 + 30,
    )
    assert value(metrics, "gpufn_worker_instance_failures_total") == 1
    assert value(metrics, "gpufn_worker_instance_starts_total") == 2
    # "a" is gone from the next complete list: its 40 s are kept, "b" counts from its createdAt.
    metrics.instances_seen(REF, SPECS, [instance("b", InstanceStatus.RUNNING)], complete=True, now=T0 + 40)
    metrics.version_gone(REF, now=T0 + 50)  # teardown
    seconds, gpu_seconds = metrics.usage(now=T0 + 1000)
    assert seconds[key] == 40 + 50 and gpu_seconds[key] == 2 * 90
    assert value(metrics, "gpufn_worker_instance_seconds_total") == 90
    assert value(metrics, "gpufn_worker_gpu_seconds_total") == 180


def test_scaling_decisions_by_rule_and_direction() -> None:
    metrics = WorkerMetrics()
    metrics.scaling_decision(REF, "kpa_panic", current=1, desired=3)
    metrics.scaling_decision(REF, "scale_to_zero", current=1, desired=0)
    labels = {"function_id": "fn", "version_id": "ver"}
    assert (
        value(metrics, "gpufn_worker_scaling_decisions_total", **labels, rule="kpa_panic", direction="up")
        == 1
    )
    assert (
        value(
            metrics, "gpufn_worker_scaling_decisions_total", **labels, rule="scale_to_zero", direction="down"
        )
        == 1
    )
