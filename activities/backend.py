"""The backend interface the lifecycle workflow drives, and the activities that dispatch to a backend.

Every backend (local processes, Kubernetes objects, Helm releases) implements the same verbs, so the
workflow never changes with the backend: prepare (resolve and pull), ensure instances ("make it N",
idempotent), observe (optionally waiting for a change), and tear down. The cluster group named in the
deployment specification picks the backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from temporalio import activity
from temporalio.exceptions import ApplicationError

from workflows import activity_contracts as contract
from workflows.errors import permanent_fault
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    InstanceRecord,
    ObservedInstances,
    ObserveInput,
    PrepareInput,
    PrepareResult,
    TeardownInput,
    VersionRef,
)

PERMANENT_FAULTS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
)
"""Exceptions that say the input or the code is wrong (a command line that cannot be split, a missing
field): the same call fails the same way however often it is retried. Everything else (connection
errors, timeouts, a busy API server) is transient and retried on the workflow's bounded schedule."""

HEARTBEAT_SECONDS = 2.0
WATCH_WAKE_SECONDS = 10.0
"""The instance watcher re-checks at least this often; backends wake it at once on a change."""


class Backend(Protocol):
    """What a place that runs instances must offer to the lifecycle workflow."""

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        """Resolve and pull the artifacts; raise a non-retryable ApplicationError when they are missing."""
        ...

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        """Remove `request.remove`, then make the spec have exactly `request.count` live instances."""
        ...

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        """Return the version's instances as they are now."""
        ...

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        """Return when the version's instances may have changed, or after `max_wait` seconds."""
        ...

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        """Remove every instance and object of the version; succeed when there is nothing left."""
        ...


class UnknownClusterGroupError(ApplicationError):
    """A deployment names a cluster group no backend serves."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Unknown cluster group '{name}'", type="UnknownClusterGroup", non_retryable=True)


@asynccontextmanager
async def classified_faults(action: str) -> AsyncIterator[None]:
    """Turn a permanent fault raised by the body into a non-retryable, declared `ApplicationError`.

    Declared errors (`ApplicationError`) pass unchanged: the backend already said whether a retry helps.
    """
    try:
        yield
    except ApplicationError:
        raise
    except PERMANENT_FAULTS as err:
        raise permanent_fault(f"{action}: {type(err).__name__}: {err}") from err


@asynccontextmanager
async def heartbeating(details: object = None) -> AsyncIterator[None]:
    """Heartbeat in the background while the body runs, so a dead worker is noticed within seconds."""

    async def beat() -> None:
        while True:
            activity.heartbeat(details)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()


def instances_fingerprint(instances: list[InstanceRecord]) -> set[tuple[str, str, str | None, str | None]]:
    """Return what identifies a change of instances: their IDs, statuses, addresses and errors."""
    # The error text counts: a STARTING instance's reason (no free GPU, unschedulable) is news too.
    return {(i.instanceId, i.status.value, i.address, i.error) for i in instances}


class BackendActivities:
    """Activities of the lifecycle, each dispatching to the backend of the spec's cluster group."""

    def __init__(self, backends: dict[str, Backend]) -> None:
        self._backends = backends

    def _backend(self, cluster_group: str) -> Backend:
        backend = self._backends.get(cluster_group)
        if backend is None:
            raise UnknownClusterGroupError(cluster_group)
        return backend

    def backends_for(self, specs: list[DeploymentSpecification]) -> list[Backend]:
        """Return the backends of the specs' cluster groups, each once."""
        seen: dict[str, Backend] = {}
        for spec in specs:
            seen.setdefault(spec.clusterGroup, self._backend(spec.clusterGroup))
        return list(seen.values())

    @activity.defn(name=contract.PREPARE.name)
    async def prepare(self, request: PrepareInput) -> PrepareResult:
        """Resolve and pull what the spec runs (image digest, chart), before any instance exists."""
        async with heartbeating(), classified_faults("Cannot prepare the deployment"):
            return await self._backend(request.deploymentSpec.clusterGroup).prepare(request)

    @activity.defn(name=contract.ENSURE_INSTANCES.name)
    async def ensure_instances(self, request: EnsureInstancesInput) -> ObservedInstances:
        """Make one spec have exactly `count` live instances after removing `remove` (idempotent)."""
        async with heartbeating(), classified_faults("Cannot start instances"):
            instances = await self._backend(request.deploymentSpec.clusterGroup).ensure_instances(request)
        return ObservedInstances(instances=instances)

    @activity.defn(name=contract.OBSERVE_INSTANCES.name)
    async def observe_instances(self, request: ObserveInput) -> ObservedInstances:
        """Return the version's instances; with `waitForChange`, only once they differ from `known`.

        Heartbeats while it waits, so the workflow's history stays still while nothing changes. Waiting
        here is what workflows started before the single version watcher (`watch_version`) still do.
        """
        async with classified_faults("Cannot observe instances"):
            return await self._observe(request)

    async def _observe(self, request: ObserveInput) -> ObservedInstances:
        backends = self.backends_for(request.specs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.maxWaitSeconds
        known = instances_fingerprint(request.known)
        while True:
            instances = [i for backend in backends for i in await backend.observe(request.ref, request.specs)]
            if (
                not request.waitForChange
                or instances_fingerprint(instances) != known
                or loop.time() >= deadline
            ):
                return ObservedInstances(instances=instances)
            activity.heartbeat()
            waits = [
                asyncio.create_task(
                    backend.wait_for_change(request.ref, min(WATCH_WAKE_SECONDS, deadline - loop.time()))
                )
                for backend in backends
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    @activity.defn(name=contract.TEARDOWN.name)
    async def teardown(self, request: TeardownInput) -> None:
        """Remove every instance and object of the version (idempotent)."""
        async with heartbeating(), classified_faults("Cannot remove instances"):
            for backend in self.backends_for(request.specs):
                await backend.teardown(request.ref, request.specs)
