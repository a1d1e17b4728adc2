"""The version watcher: one long-running activity per deployed version that returns only with news.

It waits on the backend for a change of the version's instances and, when the deployment autoscales,
runs the autoscaler on the gateways' load (`LoadMonitor`). It returns the new instances or the
autoscaler's decision; the workflow then acts and starts the next watcher. Between news it is cheap:

* it sleeps on events (the backend's change event, the monitor's load-change event), not on a tick,
  unless the version has load or a scaling timer (scale-down delay, idle timeout) is running;
* it heartbeats only as often as its heartbeat timeout needs (every 0.8 x the timeout), because each
  heartbeat is a write on the Temporal server;
* a newer watcher of the same version in this worker supersedes an older one at once, instead of the
  older one learning of its cancellation at its next heartbeat;
* on a worker's shutdown it fails retryably, so its version is watched again at once on another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.backend import Backend, BackendActivities, instances_fingerprint
from activities.gateway import IDLE_TICK_SECONDS, LoadMonitor
from gpufn.autoscaling import Autoscaler, AutoscalerState, ScalingDecision
from workflows.models import AutoscalingWatch, InstanceRecord, WatchInput, WatchResult

log = logging.getLogger(__name__)

RECHECK_SECONDS = 60.0
"""The watcher re-observes the instances at least this often, in case a backend missed a change."""
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 60.0
HEARTBEAT_SHARE = 0.8
"""Heartbeat at this share of the heartbeat timeout: late enough to be rare, early enough to arrive."""


@dataclass
class _LoadStep:
    """What one look at the load gave: a decision to return, or how long the autoscaler can sleep."""

    decision: ScalingDecision | None = None
    sleep: float | None = None
    """Seconds until the autoscaler must look again even without a load change; None: only on a change."""
    every_tick: bool = False
    """The version has load: look again after the monitor's next poll."""


class WatchActivities:
    """The version watcher, on top of the backends' activities and the worker's load monitor."""

    def __init__(self, backends: BackendActivities, monitor: LoadMonitor) -> None:
        self._backends = backends
        self._monitor = monitor
        self._running: dict[str, asyncio.Task[object]] = {}
        self._superseded: set[asyncio.Task[object]] = set()

    @activity.defn
    async def watch_version(self, request: WatchInput) -> WatchResult:
        """Return when the version's instances differ from `known` or the autoscaler wants another count.

        Also returns (with neither) after `maxWaitSeconds`, so no watcher runs forever.
        """
        key = activity.info().workflow_id or request.ref.versionId
        task = asyncio.current_task()
        assert task is not None
        self._supersede(key, task)
        try:
            return await self._watch(request)
        except asyncio.CancelledError:
            if task in self._superseded:
                # A newer watcher of the version runs in this worker: the workflow stopped waiting on
                # this one. Ending it with nothing to report makes sure Temporal does not retry it.
                task.uncancel()
                return WatchResult()
            if activity.is_worker_shutdown():
                # Fail (retryably) rather than end as cancelled, so Temporal runs the watcher again at
                # once on another worker instead of after the heartbeat timeout.
                raise ApplicationError(
                    "The worker is shutting down; the watcher resumes on another worker",
                    type="WorkerShutdown",
                ) from None
            raise
        finally:
            self._superseded.discard(task)
            if self._running.get(key) is task:
                del self._running[key]

    def _supersede(self, key: str, task: asyncio.Task[object]) -> None:
        """Stop an older watcher of the same version in this worker; the workflow no longer waits on it."""
        older = self._running.get(key)
        if older is not None and older is not task and not older.done():
            self._superseded.add(older)
            older.cancel()
        self._running[key] = task

    async def _watch(self, request: WatchInput) -> WatchResult:
        info = activity.info()
        timeout = info.heartbeat_timeout.total_seconds() if info.heartbeat_timeout else None
        beat_every = HEARTBEAT_SHARE * (timeout or DEFAULT_HEARTBEAT_TIMEOUT_SECONDS)
        backends = self._backends.backends_for(request.specs)
        known = instances_fingerprint(request.known)
        scaler = self._autoscaler(request.autoscaling, request.ref.versionId, info.heartbeat_details)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + request.maxWaitSeconds
        next_beat = started + beat_every
        version_id = request.ref.versionId
        step, quiet = _LoadStep(), False
        try:
            while True:
                instances: list[InstanceRecord] = []
                for backend in backends:
                    instances += await backend.observe(request.ref, request.specs)
                if instances_fingerprint(instances) != known:
                    return WatchResult(instances=instances)
                if scaler is not None and request.autoscaling is not None:
                    reachable = self._monitor.reachable
                    if not (quiet and reachable and self._monitor.load(version_id).total == 0):
                        step = self._look_at_load(scaler, request.autoscaling, version_id, loop.time())
                        if step.decision is not None:
                            return WatchResult(decision=step.decision)
                        # Idle, and the count holds while it stays idle: until the load changes, a
                        # wake-up (a backend re-check, a heartbeat) need not run the autoscaler.
                        quiet = reachable and step.sleep is None and not step.every_tick
                now = loop.time()
                if now >= deadline:
                    return WatchResult()
                if now >= next_beat:
                    activity.heartbeat(scaler.state.model_dump(mode="json") if scaler is not None else None)
                    next_beat = now + beat_every
                sleep = min(RECHECK_SECONDS, next_beat - now, deadline - now)
                if step.sleep is not None:
                    sleep = min(sleep, step.sleep)
                await self._wait(
                    request, backends, sleep, every_tick=step.every_tick, load=scaler is not None
                )
        finally:
            if scaler is not None:
                self._monitor.remember(version_id, scaler.state)

    def _autoscaler(
        self, watch: AutoscalingWatch | None, version_id: str, details: object
    ) -> Autoscaler | None:
        """Build the version's autoscaler, resuming the history a previous attempt or watcher kept."""
        if watch is None:
            return None
        state: AutoscalerState | None = None
        if isinstance(details, (list, tuple)) and details and details[0] is not None:
            with contextlib.suppress(Exception):
                state = AutoscalerState.model_validate(details[0])
        return Autoscaler(
            watch.settings,
            watch.nvcf,
            max_request_concurrency=watch.maxRequestConcurrency,
            min_instances=watch.minInstances,
            max_instances=watch.maxInstances,
            state=state or self._monitor.recall(version_id),
        )

    def _look_at_load(
        self, scaler: Autoscaler, watch: AutoscalingWatch, version_id: str, now: float
    ) -> _LoadStep:
        """Record the version's load and decide; say when to look again if the count stays."""
        if not self._monitor.reachable:
            # No gateway answered: no data is not zero load, so decide nothing until one answers (the
            # monitor reports a change of reachability as a load change).
            return _LoadStep()
        load = self._monitor.load(version_id)
        scaler.record_zero_until(now)
        scaler.record(now, float(load.total))
        ready = load.ready if load.ready or watch.ready == 0 else watch.ready
        decision = scaler.decide(now, ready=ready, current=watch.current)
        if decision.desired != watch.current:
            return _LoadStep(decision=decision)
        if load.total > 0:
            return _LoadStep(every_tick=True)
        if scaler.steady_without_load(now, ready=ready, current=watch.current):
            return _LoadStep()
        return _LoadStep(sleep=IDLE_TICK_SECONDS)

    async def _wait(
        self,
        request: WatchInput,
        backends: list[Backend],
        seconds: float,
        *,
        every_tick: bool,
        load: bool,
    ) -> None:
        """Sleep until a backend reports a change, the load changes (or is polled), or `seconds` pass."""
        waits: list[asyncio.Task[None]] = [
            asyncio.create_task(backend.wait_for_change(request.ref, seconds)) for backend in backends
        ]
        if load:
            if every_tick:
                waits.append(asyncio.create_task(self._monitor.next_tick()))
            else:
                waits.append(asyncio.create_task(self._monitor.next_change(request.ref.versionId, seconds)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
