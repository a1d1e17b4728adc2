"""Keeps a gateway's route table in step with the lifecycle workflows, through Temporal visibility.

Each version's workflow publishes its routing entry in its memo and stamps `GpufnRoutesUpdatedAt`
whenever it changes. This poller asks visibility for the entries stamped since its last look (one
call every `interval`), and fully resynchronizes now and then, so a replica sees a change within a
fraction of a second and a restarted replica rebuilds its table from Temporal. Never per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.client import Client

from api.visibility import executions, memo_json

log = logging.getLogger(__name__)

OVERLAP = timedelta(seconds=5)
"""Re-read entries this much older than the last look, covering clock skew and visibility lag."""
FULL_RESYNC_SECONDS = 30.0


class RouteSink(Protocol):
    """Where routing entries go (the gateway's route table)."""

    def apply(self, route: dict[str, Any]) -> None:
        """Install or replace a version's routing entry."""

    def remove(self, version_id: str) -> None:
        """Forget a version."""


class RouteSync:
    """Polls visibility for changed routing entries and applies them to a route sink."""

    def __init__(self, client: Client, sink: RouteSink, interval: float) -> None:
        self._client = client
        self._sink = sink
        self._interval = interval
        self._since: datetime | None = None
        self._known: set[str] = set()
        self._applied: dict[str, tuple[str, bytes]] = {}
        """Per workflow ID, the version and route memo JSON last applied."""
        self._last_full = 0.0
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()

    async def start(self) -> None:
        """Load every route now, then keep polling in the background."""
        with contextlib.suppress(Exception):
            await self.poll()
        self._task = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def poll(self) -> None:
        """Apply what changed since the last poll (everything, on a full resync)."""
        started = datetime.now(UTC)
        full = self._since is None or time.monotonic() - self._last_full > FULL_RESYNC_SECONDS
        if full:
            query = "ExecutionStatus = 'Running' AND GpufnVersionId IS NOT NULL"
        else:
            assert self._since is not None
            since = (self._since - OVERLAP).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            query = f"GpufnRoutesUpdatedAt >= '{since}'"
        seen: set[str] = set()
        async for workflow_id, running, data in self._routes(query):
            applied = self._applied.get(workflow_id)
            if not full and running and applied is not None and applied[1] == data:
                # The same entry as last time (the overlap): nothing to parse or apply. A full resync
                # re-applies everything, which also restores instances the gateway dropped after a
                # failed connection (it stops using them until a route lists them again).
                seen.add(applied[0])
                continue
            route = json.loads(data)
            if not isinstance(route, dict):
                continue
            version_id = str(route.get("versionId"))
            if not running or route.get("status") == "DELETED":
                self._sink.remove(version_id)
                self._known.discard(version_id)
                self._applied.pop(workflow_id, None)
                continue
            seen.add(version_id)
            self._sink.apply(route)
            self._applied[workflow_id] = (version_id, data)
        if full:
            for version_id in self._known - seen:
                self._sink.remove(version_id)
            self._known = seen
            self._applied = {w: entry for w, entry in self._applied.items() if entry[0] in seen}
            self._last_full = time.monotonic()
        else:
            self._known |= seen
        self._since = started
        self.synced.set()

    async def _routes(self, query: str) -> AsyncIterator[tuple[str, bool, bytes]]:
        """Yield (workflow ID, running, route memo JSON) per matching execution."""
        async for info in executions(self._client, query):
            data = memo_json(info, "route")
            if data is not None:
                running = info.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING
                yield info.execution.workflow_id, running, data

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll()
            except Exception as err:
                log.warning("Route poll failed: %s", err)
