"""`LocalBackend`: the `Backend` of cluster group `local`, over the `LocalSupervisor` of this machine."""

from __future__ import annotations

import asyncio
import contextlib

from temporalio.exceptions import ApplicationError

from activities.local.records import CONTAINER_RUNTIME, NO_COMMAND_LINE
from activities.local.supervisor import LocalSupervisor
from activities.registry.resolver import RegistryResolver
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    InstanceRecord,
    InstanceStatus,
    PrepareInput,
    PrepareResult,
    VersionRef,
)


class LocalBackend:
    """The `Backend` of cluster group `local`: instances are processes or containers of this machine.

    Args:
        supervisor: The worker's supervisor of local instances.
        resolver: Pins container images to digests (needed when instances run as containers).
    """

    def __init__(self, supervisor: LocalSupervisor, resolver: RegistryResolver | None = None) -> None:
        self._supervisor = supervisor
        self._resolver = resolver
        self._observed: dict[str, int] = {}
        """Per version, the change generation its last observation saw."""

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        """Check the spec; for a container, pin the image to its digest and pull it.

        A process instance runs the command line, so the image is only recorded. A missing image or tag
        fails non-retryably (the deployment ends in ERROR with the registry's words).
        """
        spec = request.spec
        if spec.helmChart:
            raise ApplicationError(
                "Helm-chart functions need a Kubernetes cluster group; the local backend runs processes "
                "and containers",
                type="InvalidSpec",
                non_retryable=True,
            )
        if self._supervisor.runtime_for(spec) != CONTAINER_RUNTIME:
            if not spec.containerArgs:
                raise ApplicationError(NO_COMMAND_LINE, type="InvalidSpec", non_retryable=True)
            return PrepareResult(resolvedImage=spec.containerImage)
        if self._resolver is None:
            raise ApplicationError(
                "The local backend runs containers but has no registry resolver",
                type="ContainerRuntimeUnavailable",
                non_retryable=True,
            )
        pinned = await self._resolver.resolve_artifacts(spec)
        image = pinned.resolvedImage or spec.containerImage
        assert image is not None
        await self._supervisor.pull(image)
        return PrepareResult(resolvedImage=image)

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        """Make the spec have exactly `count` live instances."""
        await self._supervisor.ensure(request)
        return await self.observe(request.ref, [])

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        """Return the version's instances now."""
        self._observed[ref.versionId] = self._supervisor.generation(ref.versionId)
        return [
            i.record(
                self._supervisor.log_tail(i.instanceId) if i.status == InstanceStatus.ERRORED.value else None
            )
            for i in self._supervisor.instances_of(ref.versionId)
        ]

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        """Return when one of the version's instances changed, or after `max_wait` seconds.

        A change notified after the last `observe` and before this wait began (the watcher observes, then
        starts its waits as tasks) returns at once: without it, that change waited for the next re-check.
        """
        if self._supervisor.generation(ref.versionId) != self._observed.get(ref.versionId):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._supervisor.changed_event(ref.versionId).wait(), timeout=max(0.0, max_wait)
            )

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        """Stop every instance of the version."""
        await self._supervisor.remove_version(ref.versionId)
