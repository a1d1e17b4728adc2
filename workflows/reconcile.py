"""Pure decisions of the lifecycle: the NVCF state machine and how instance counts are split per spec.

No I/O and no clock: the workflow passes in what it observed, so these rules are unit-tested directly.
"""

from __future__ import annotations

import math

from workflows.models import (
    DeploymentSpecification,
    FunctionStatus,
    InstanceRecord,
    InstanceStatus,
)

LIVE_STATUSES = frozenset({InstanceStatus.STARTING, InstanceStatus.RUNNING, InstanceStatus.DRAINING})


def count_by_spec(instances: list[InstanceRecord], spec_count: int, status: InstanceStatus) -> list[int]:
    """Count the instances in `status` for each spec index."""
    counts = [0] * spec_count
    for instance in instances:
        if instance.status == status and instance.specIndex < spec_count:
            counts[instance.specIndex] += 1
    return counts


def next_status(
    current: FunctionStatus,
    specs: list[DeploymentSpecification],
    instances: list[InstanceRecord],
    deploy_failed: bool = False,
) -> FunctionStatus:
    """Return the version's status after observing `instances`, following NVCF's transition rules.

    Args:
        current: The status before this observation.
        specs: The deployment specifications (each with its minInstances).
        instances: The instances as observed now.
        deploy_failed: True when every instance failed while deploying (or the deadline passed).
    """
    if current not in (
        FunctionStatus.DEPLOYING,
        FunctionStatus.ACTIVE,
        FunctionStatus.DEGRADING,
        FunctionStatus.DEGRADED,
    ):
        return current
    running = count_by_spec(instances, len(specs), InstanceStatus.RUNNING)
    min_met = all(running[i] >= spec.minInstances for i, spec in enumerate(specs))
    if current == FunctionStatus.DEPLOYING:
        if min_met:
            return FunctionStatus.ACTIVE
        return FunctionStatus.ERROR if deploy_failed else FunctionStatus.DEPLOYING
    if min_met:
        return FunctionStatus.ACTIVE
    # Below minInstances: some spec lost instances. Zero serving instances means the version cannot
    # answer at all (DEGRADED, not invocable); otherwise it still serves, degraded (DEGRADING).
    return FunctionStatus.DEGRADED if sum(running) == 0 else FunctionStatus.DEGRADING


def initial_status(specs: list[DeploymentSpecification]) -> FunctionStatus:
    """Return the status right after a deployment is created: ACTIVE when every spec has min 0."""
    if all(spec.minInstances == 0 for spec in specs):
        return FunctionStatus.ACTIVE
    return FunctionStatus.DEPLOYING


def clamp_total(specs: list[DeploymentSpecification], total: int) -> int:
    """Clamp a version-wide instance count to [sum of minInstances, sum of maxInstances]."""
    low = sum(spec.minInstances for spec in specs)
    high = sum(spec.maxInstances for spec in specs)
    return max(low, min(high, total))


def split_total(specs: list[DeploymentSpecification], total: int) -> list[int]:
    """Split a version-wide instance count over the specs.

    Every spec gets its minInstances first; the rest goes round-robin to specs with room, in
    `preferredOrder` (then declaration order), so no spec exceeds its maxInstances.
    """
    total = clamp_total(specs, total)
    counts = [spec.minInstances for spec in specs]
    order = sorted(range(len(specs)), key=lambda i: (specs[i].preferredOrder or 99, i))
    remaining = total - sum(counts)
    while remaining > 0:
        progressed = False
        for i in order:
            if remaining > 0 and counts[i] < specs[i].maxInstances:
                counts[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    return counts


def default_total(specs: list[DeploymentSpecification]) -> int:
    """Return the instance count a fresh deployment starts with: the sum of minInstances."""
    return sum(spec.minInstances for spec in specs)


def heal_backoff_seconds(consecutive_failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Return how long to wait before replacing an instance after `consecutive_failures` failures."""
    if consecutive_failures <= 0:
        return 0.0
    return min(cap, base * math.pow(2, consecutive_failures - 1))
