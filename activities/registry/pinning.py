"""`PinningBackend`: any backend whose `prepare` first pins the version's image or chart."""

from __future__ import annotations

from activities.backend import Backend
from activities.registry.resolver import RegistryResolver
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    InstanceRecord,
    PrepareInput,
    PrepareResult,
    VersionRef,
)


class PinningBackend:
    """A `Backend` that pins the version's image or chart in its registry when it prepares a deployment.

    The wrapped backend's own checks run first (they are cheaper and need no network); then the resolver
    pins the artifact, and the pins travel to `ensure_instances` in `request.prepared`, so every instance
    runs the same digest. Every other verb is the wrapped backend's.

    Args:
        backend: The backend that runs the instances.
        resolver: The worker's resolver.
    """

    def __init__(self, backend: Backend, resolver: RegistryResolver) -> None:
        self._backend = backend
        self._resolver = resolver

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        """Run the backend's checks, then resolve the artifact; a missing one fails non-retryably."""
        checked = await self._backend.prepare(request)
        pinned = await self._resolver.resolve_artifacts(request.spec)
        return PrepareResult(
            resolvedImage=pinned.resolvedImage or checked.resolvedImage,
            resolvedChart=pinned.resolvedChart or checked.resolvedChart,
        )

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        """Delegate to the wrapped backend."""
        return await self._backend.ensure_instances(request)

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        """Delegate to the wrapped backend."""
        return await self._backend.observe(ref, specs)

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        """Delegate to the wrapped backend."""
        await self._backend.wait_for_change(ref, max_wait)

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        """Delegate to the wrapped backend."""
        await self._backend.teardown(ref, specs)
