"""Activities that read the gateways' load: the autoscaling watcher and the drain wait.

Load is measured where requests are: at every API replica's gateway. One `LoadMonitor` per worker polls
every replica's internal load endpoint once per tick, for all versions at once, so a thousand watched
versions cost one small HTTP call per replica per tick, not a thousand; and each reply carries only the
versions whose load changed since the previous one, so idle versions cost nothing per tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from temporalio import activity

from gpufn.autoscaling import Autoscaler, AutoscalerState
from gpufn.contracts import LoadReportBody, VersionLoadEntry
from workflows import activity_contracts as contract
from workflows.models import DrainInput, DrainResult, WatchLoadInput, WatchLoadResult

log = logging.getLogger(__name__)

LOAD_PATH = "/internal/v1/load"
TICK_SECONDS = 0.5
IDLE_TICK_SECONDS = 5.0
"""A version without load is re-decided this often (idle timers), or at once when load appears."""
HEARTBEAT_EVERY_SECONDS = 10.0
DRAIN_POLL_SECONDS = 0.2


@dataclass
class VersionLoad:
    """One version's load summed over every gateway."""

    queued: int = 0
    inFlight: int = 0
    ready: int = 0
    routesVersion: int = 0
    """The oldest routing version any gateway applied for this version."""
    instances: dict[str, int] = field(default_factory=dict)
    """In-flight requests per instance."""

    @property
    def total(self) -> int:
        """Return the autoscaling signal: in-flight plus queued requests."""
        return self.queued + self.inFlight


@dataclass
class _GatewayReport:
    """The last full view of one gateway's load report, kept up to date with its deltas."""

    epoch: str
    generation: int
    versions: dict[str, VersionLoadEntry]


class LoadMonitor:
    """Polls every gateway's per-version load on a shared tick, while anyone is watching."""

    def __init__(self, gateway_urls: list[str], admin_key: str, tick: float = TICK_SECONDS) -> None:
        self._urls = gateway_urls
        self._headers = {"Authorization": f"Bearer {admin_key}"}
        self._tick = tick
        self._loads: dict[str, VersionLoad] = {}
        self._reachable = False
        self._outages = 0
        self._tick_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._autoscaler_states: dict[str, AutoscalerState] = {}
        self._load_changed: dict[str, asyncio.Event] = {}
        self._reports: dict[str, _GatewayReport] = {}

    async def close(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    def remember(self, version_id: str, state: AutoscalerState) -> None:
        """Keep a version's autoscaler history for its next watcher in this worker."""
        self._autoscaler_states[version_id] = state

    def recall(self, version_id: str) -> AutoscalerState | None:
        """Return the history kept by the version's previous watcher in this worker, if any."""
        return self._autoscaler_states.get(version_id)

    def load(self, version_id: str) -> VersionLoad:
        """Return the version's last measured load (zero when no gateway reports it)."""
        return self._loads.get(version_id, VersionLoad())

    @property
    def reachable(self) -> bool:
        """Return whether the last poll reached at least one gateway."""
        return self._reachable

    @property
    def outages(self) -> int:
        """Return how many times the gateways became unreachable: a load sleeper's gap held no data."""
        return self._outages

    def load_is_zero(self, version_id: str) -> bool:
        """Return whether the gateways answered and hold no request of the version."""
        return self._reachable and self.load(version_id).total == 0

    def change_event(self, version_id: str) -> asyncio.Event:
        """Return an event set when a poll finds the version's load (or the reachability) changed."""
        self._ensure_running()
        return self._load_changed.setdefault(version_id, asyncio.Event())

    async def next_tick(self) -> None:
        """Wait for the next poll of the gateways to finish."""
        self._ensure_running()
        self._tick_event.clear()
        await self._tick_event.wait()

    async def next_change(self, version_id: str, max_wait: float) -> None:
        """Wait until a poll finds the version's load (or the gateways' reachability) changed, or `max_wait`.

        Idle versions wait here instead of on every tick, so a thousand of them cost a wake-up each
        every couple of seconds, while a load step still reaches its autoscaler on the next poll.
        """
        event = self.change_event(version_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max_wait)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        self._session = self._session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except Exception:
                log.exception("Load poll failed")
            self._tick_event.set()
            await asyncio.sleep(max(0.0, self._tick - (time.monotonic() - started)))

    async def poll_once(self) -> None:
        """Read every gateway's load (what changed since the last poll) and re-sum the versions it names."""
        assert self._session is not None
        changes = await asyncio.gather(*(self._fetch(url) for url in self._urls))
        reached = any(url in self._reports for url in self._urls)
        reachability_changed = reached != self._reachable
        if reachability_changed and not reached:
            self._outages += 1
        self._reachable = reached
        for version_id in set().union(*changes):
            before = self._loads.pop(version_id, None)
            now = self._sum(version_id)
            if now is not None:
                self._loads[version_id] = now
            if (before.total if before else 0) != (now.total if now else 0):
                event = self._load_changed.pop(version_id, None)
                if event is not None:
                    event.set()
        if reachability_changed:
            for event in self._load_changed.values():
                event.set()
            self._load_changed.clear()

    def _sum(self, version_id: str) -> VersionLoad | None:
        """Return the version's load summed over every reachable gateway (None when none reports it)."""
        total: VersionLoad | None = None
        for report in self._reports.values():
            item = report.versions.get(version_id)
            if item is None:
                continue
            if total is None:
                total = VersionLoad(routesVersion=item.routesVersion)
            total.queued += item.queued
            total.inFlight += item.inFlight
            total.ready = max(total.ready, item.ready)
            total.routesVersion = min(total.routesVersion, item.routesVersion)
            for instance_id, count in item.instances.items():
                total.instances[instance_id] = total.instances.get(instance_id, 0) + count
        return total

    async def _fetch(self, base_url: str) -> set[str]:
        """Apply the gateway's report (a delta, or everything) and return the version IDs it changed."""
        assert self._session is not None
        known = self._reports.get(base_url)
        params = {"since": str(known.generation), "epoch": known.epoch} if known is not None else {}
        try:
            async with self._session.get(
                base_url.rstrip("/") + LOAD_PATH, headers=self._headers, params=params, ssl=False
            ) as resp:
                # Any schema version (an older or newer gateway's, during a rolling upgrade).
                body = LoadReportBody.parse(await resp.json()) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            body = None
        if body is None:
            # An unreachable gateway's requests count no more: forget its view (and its deltas).
            lost = self._reports.pop(base_url, None)
            return set(lost.versions) if lost is not None else set()
        versions = body.versions
        if known is None or body.full or body.epoch != known.epoch:
            replaced = set(known.versions) if known is not None else set()
            self._reports[base_url] = _GatewayReport(
                epoch=body.epoch, generation=body.generation, versions=versions
            )
            return replaced | set(versions)
        known.versions.update(versions)
        for version_id in body.removed:
            known.versions.pop(version_id, None)
        known.generation = body.generation
        return set(versions) | set(body.removed)


class GatewayActivities:
    """Activities that watch the gateways' load on behalf of the lifecycle workflow."""

    def __init__(self, monitor: LoadMonitor) -> None:
        self._monitor = monitor

    @activity.defn(name=contract.WATCH_LOAD.name)
    async def watch_load(self, request: WatchLoadInput) -> WatchLoadResult:
        """Run the autoscaler on the version's load; return when it wants a count other than `current`.

        Only workflows started before the single version watcher (`watch_version`) still run this one.
        """
        version_id = request.ref.versionId
        details = activity.info().heartbeat_details
        state: AutoscalerState | None = None
        if details:
            with contextlib.suppress(Exception):
                state = AutoscalerState.model_validate(details[0])
        state = state or self._monitor.recall(version_id)
        scaler = Autoscaler(
            request.settings,
            request.nvcf,
            max_request_concurrency=request.maxRequestConcurrency,
            min_instances=request.minInstances,
            max_instances=request.maxInstances,
            state=state,
        )
        started = time.monotonic()
        last_beat = 0.0
        idle = False
        while time.monotonic() - started < request.maxWaitSeconds:
            if idle:
                await self._monitor.next_change(version_id, IDLE_TICK_SECONDS)
            else:
                await self._monitor.next_tick()
            now = time.monotonic()
            if not self._monitor.reachable:
                # No gateway answered: no data is not zero load, so decide nothing until one answers.
                activity.heartbeat()
                continue
            load = self._monitor.load(version_id)
            idle = load.total == 0
            scaler.record(now, float(load.total))
            ready = load.ready if load.ready or request.ready == 0 else request.ready
            decision = scaler.decide(now, ready=ready, current=request.current)
            if decision.desired != request.current:
                self._monitor.remember(version_id, scaler.state)
                return WatchLoadResult(decision=decision)
            if now - last_beat >= HEARTBEAT_EVERY_SECONDS:
                last_beat = now
                activity.heartbeat(scaler.state.model_dump(mode="json"))
        self._monitor.remember(version_id, scaler.state)
        return WatchLoadResult(decision=None)

    @activity.defn(name=contract.WAIT_DRAINED.name)
    async def wait_drained(self, request: DrainInput) -> DrainResult:
        """Wait until no gateway holds a request for the instances (or the version), up to the timeout."""
        deadline = time.monotonic() + request.timeoutSeconds
        remaining = 0
        while True:
            await self._monitor.next_tick()
            load = self._monitor.load(request.ref.versionId)
            # Requests can still be routed to the instances until every gateway applied the routes
            # that leave them out, so the drain only counts once all of them have.
            if request.wholeVersion:
                remaining = load.total
            else:
                remaining = sum(load.instances.get(i, 0) for i in request.instanceIds)
            if self._monitor.reachable and remaining == 0 and load.routesVersion >= request.routesVersion:
                return DrainResult(drained=True)
            if request.stopWhenBusy and self._monitor.reachable and remaining > 0:
                # Work is pending: the caller answers now and waits for the drain in a second call.
                return DrainResult(drained=False, remaining=remaining)
            if time.monotonic() >= deadline:
                log.warning("Drain of %s timed out with %d requests left", request.ref.versionId, remaining)
                return DrainResult(drained=False, remaining=remaining)
            activity.heartbeat(remaining)
            await asyncio.sleep(DRAIN_POLL_SECONDS)
