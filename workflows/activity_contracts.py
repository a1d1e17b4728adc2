"""The activities a version's workflow calls: each one's name and the types of its input and output.

The workflow layer declares what it needs and calls activities by these names; `activities/` implements
them (`@activity.defn(name=PREPARE.name)` ...) and is wired into the worker. So the workflow never imports
the code that touches the world, and a fake (the time-skipping tests) implements the same contract.

The names are what Temporal records in a history (`ActivityType`): never rename one, or a recorded
history stops replaying; add a new contract instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from temporalio import workflow

from workflows.models import (
    DrainInput,
    DrainResult,
    EnsureInstancesInput,
    ObservedInstances,
    ObserveInput,
    PrepareInput,
    PrepareResult,
    TeardownInput,
    WatchInput,
    WatchLoadInput,
    WatchLoadResult,
    WatchResult,
)

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out")


@dataclass(frozen=True)
class ActivityContract(Generic[In, Out]):
    """One activity: the name it is registered under, its input model and its result type."""

    name: str
    input: type[In]
    output: type[Out]


PREPARE: ActivityContract[PrepareInput, PrepareResult] = ActivityContract(
    "prepare", PrepareInput, PrepareResult
)
"""Resolve and pin what one deployment spec runs (image digest, chart), before any instance starts."""
ENSURE_INSTANCES: ActivityContract[EnsureInstancesInput, ObservedInstances] = ActivityContract(
    "ensure_instances", EnsureInstancesInput, ObservedInstances
)
"""Make one spec's instance count N, removing the named instances first; answers what then runs."""
OBSERVE_INSTANCES: ActivityContract[ObserveInput, ObservedInstances] = ActivityContract(
    "observe_instances", ObserveInput, ObservedInstances
)
"""What runs for a version now (or, for versions started before the one watcher, once it changed)."""
TEARDOWN: ActivityContract[TeardownInput, Any] = ActivityContract("teardown", TeardownInput, type(None))
"""Remove everything a version runs (answers nothing)."""
WATCH_VERSION: ActivityContract[WatchInput, WatchResult] = ActivityContract(
    "watch_version", WatchInput, WatchResult
)
"""Wait, heartbeating, until an instance changes or the autoscaler wants another count."""
WATCH_LOAD: ActivityContract[WatchLoadInput, WatchLoadResult] = ActivityContract(
    "watch_load", WatchLoadInput, WatchLoadResult
)
"""The load watcher of versions started before the one watcher (`one-version-watcher` patch)."""
WAIT_DRAINED: ActivityContract[DrainInput, DrainResult] = ActivityContract(
    "wait_drained", DrainInput, DrainResult
)
"""Wait until the gateways hold nothing queued or in flight for a version (or one instance)."""

ALL: tuple[ActivityContract[Any, Any], ...] = (
    PREPARE,
    ENSURE_INSTANCES,
    OBSERVE_INSTANCES,
    TEARDOWN,
    WATCH_VERSION,
    WATCH_LOAD,
    WAIT_DRAINED,
)
"""Every activity the workflow may call: the worker must register an implementation of each."""


async def execute(contract: ActivityContract[In, Out], arg: In, **options: Any) -> Out:
    """Run an activity of the contract from workflow code and return its typed result."""
    result: Out = await workflow.execute_activity(contract.name, arg, result_type=contract.output, **options)
    return result


def start(contract: ActivityContract[In, Out], arg: In, **options: Any) -> workflow.ActivityHandle[Out]:
    """Start an activity of the contract from workflow code; the handle is a task of its typed result."""
    handle: workflow.ActivityHandle[Out] = workflow.start_activity(
        contract.name, arg, result_type=contract.output, **options
    )
    return handle
