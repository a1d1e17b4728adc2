"""The backend of a Kubernetes cluster group: Helm-chart versions go to the Helm backend, the others to the
container backend, both on the same cluster.
"""

from __future__ import annotations

import asyncio

from activities.backend import Backend
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    FunctionVersionSpec,
    InstanceRecord,
    PrepareInput,
    PrepareResult,
    VersionRef,
)


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
