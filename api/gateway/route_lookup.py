"""Answers a route-table miss from the lifecycle's own state before the gateway says 404.

The table learns routes from visibility polls, so it lags what the management API already reports: a
client that saw its version ACTIVE and invokes at once may reach a replica that has not heard yet. On a
miss (the version is unknown, or known but not invocable) the gateway asks its `RouteSource` (the API
wires one that asks the version's workflow) and applies the answer to the table before it decides.

Only misses pay for this; the hit path stays a dict lookup. Concurrent misses of the same version share
one lookup, with one rule that keeps the answer truthful: a caller only accepts a lookup that started
after it arrived (an older one may predate the state the caller was shown), so at most one lookup per key
runs at a time and at most one more is waiting. Versions whose workflow does not exist at all are
remembered for a while, so a client hammering an unknown version id costs one lookup per `unknown_ttl`
(a version's workflow exists from the moment its id is handed out, so this cannot hide a new one).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from api.gateway.routes import RouteTable

log = logging.getLogger(__name__)


class RouteSource(Protocol):
    """Where authoritative routing entries come from (the lifecycle workflows)."""

    async def version_route(self, function_id: str, version_id: str) -> Mapping[str, Any] | None:
        """Return the version's routing entry now, or None when no such version exists (any more)."""

    async def function_version_ids(self, function_id: str) -> list[str]:
        """Return the ids of the function's live versions (visibility: a just-created one may be missing)."""


def is_uuid(value: str) -> bool:
    """Return whether `value` is a UUID in its canonical text form (every gpufn id is one)."""
    if len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


class _Flight:
    __slots__ = ("done", "started")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.done = asyncio.Event()


class MissResolver:
    """Brings a route table's entries up to date from a `RouteSource` when an invocation misses.

    Args:
        source: Where the current routing entries come from.
        routes: The table to update.
        timeout: Longest a lookup may take; after it the miss is answered from the table as it is.
        unknown_ttl: How long a version id that has no workflow is answered without a lookup.
        max_unknown: Bound on the remembered unknown ids (oldest forgotten first).
    """

    def __init__(
        self,
        source: RouteSource,
        routes: RouteTable,
        timeout: float = 2.0,
        unknown_ttl: float = 10.0,
        max_unknown: int = 10_000,
    ) -> None:
        self._source = source
        self._routes = routes
        self._timeout = timeout
        self._unknown_ttl = unknown_ttl
        self._max_unknown = max_unknown
        self._flights: dict[str, _Flight] = {}
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self.lookups = 0
        """Lookups made so far (for tests and diagnostics)."""

    async def resolve_version(self, function_id: str, version_id: str, arrived: float) -> None:
        """Update the table's entry of one version with its state as of a moment after `arrived`."""
        if not (is_uuid(function_id) and is_uuid(version_id)) or self._known_unknown(version_id):
            return

        async def fetch() -> None:
            self._take(version_id, await self._source.version_route(function_id, version_id))

        await self._shared("v:" + version_id, arrived, fetch)

    async def resolve_function(self, function_id: str, arrived: float) -> None:
        """Update the table's entries of every live version of a function, as of after `arrived`."""
        if not is_uuid(function_id):
            return

        async def fetch() -> None:
            # Versions this table knows are looked up even if visibility does not list them yet.
            known = [v.version_id for v in self._routes.function_versions(function_id)]
            listed = await self._source.function_version_ids(function_id)
            version_ids = [v for v in dict.fromkeys([*known, *listed]) if is_uuid(v)]
            routes = await asyncio.gather(*(self._source.version_route(function_id, v) for v in version_ids))
            for version_id, route in zip(version_ids, routes, strict=True):
                self._take(version_id, route)

        await self._shared("f:" + function_id, arrived, fetch)

    def _take(self, version_id: str, route: Mapping[str, Any] | None) -> None:
        """Put what the source said of a version in the table (no route: it does not exist)."""
        if route is None:
            self._remember_unknown(version_id)
            self._routes.remove(version_id)
        elif route.get("status") == "DELETED":
            self._routes.remove(version_id)
        else:
            self._routes.apply(route)

    async def _shared(self, key: str, arrived: float, fetch: Callable[[], Awaitable[None]]) -> None:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = _Flight()
                self.lookups += 1
                try:
                    await asyncio.wait_for(fetch(), self._timeout)
                except Exception as err:
                    # The table answers as it is (a 404 at worst); the visibility poll keeps catching up.
                    log.warning("Route lookup %s failed: %s", key, err or type(err).__name__)
                finally:
                    del self._flights[key]
                    flight.done.set()
                return
            await flight.done.wait()
            if flight.started >= arrived:
                return
            # That lookup may have read the state from before what this caller was shown: look again
            # (together with every other caller in the same position).

    def _known_unknown(self, key: str) -> bool:
        expires = self._unknown.get(key)
        if expires is None:
            return False
        if expires > time.monotonic():
            return True
        del self._unknown[key]
        return False

    def _remember_unknown(self, key: str) -> None:
        self._unknown[key] = time.monotonic() + self._unknown_ttl
        self._unknown.move_to_end(key)
        while len(self._unknown) > self._max_unknown:
            self._unknown.popitem(last=False)
