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
import time
from dataclasses import dataclass

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.backend import Backend, BackendActivities, instances_fingerprint
from activities.gateway import IDLE_TICK_SECONDS, LoadMonitor
from gpufn.autoscaling import Autoscaler, AutoscalerState, ScalingDecision
from workflows import activity_contracts as contract
from workflows.models import AutoscalingWatch, InstanceRecord, WatchInput, WatchResult

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


@dataclass
class _LiveAutoscaler:
    """A watcher's autoscaler, with what the watcher knows about the load between its samples."""

    scaler: Autoscaler
    zeros_known: bool = False
    """The load stayed zero since the last sample: this watcher was listening for a change throughout."""
    outages: int = 0
    """The monitor's count of gateway outages at the last sample (an outage means no data, not zero)."""
    version_id: str = ""

    def settle(self, monitor: LoadMonitor, now: float) -> AutoscalerState:
        """Return the history up to `now`, adding the zero seconds this watcher slept through."""
        if self.zeros_known and monitor.outages == self.outages and monitor.load_is_zero(self.version_id):
            self.scaler.record_zero_until(now)
        return self.scaler.state


class WatchActivities:
    """The version watcher, on top of the backends' activities and the worker's load monitor."""

    def __init__(self, backends: BackendActivities, monitor: LoadMonitor) -> None:
        self._backends = backends
        self._monitor = monitor
        self._running: dict[str, asyncio.Task[object]] = {}
        self._superseded: set[asyncio.Task[object]] = set()
        self._live: dict[str, _LiveAutoscaler] = {}

    @activity.defn(name=contract.WATCH_VERSION.name)
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
        key = info.workflow_id or request.ref.versionId
        live = self._autoscaler(request.autoscaling, key, request.ref.versionId, info.heartbeat_details)
        scaler = live.scaler if live is not None else None
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + request.maxWaitSeconds
        next_beat = started + beat_every
        version_id = request.ref.versionId
        step, quiet = _LoadStep(), False
        load_changed: asyncio.Event | None = None
        try:
            while True:
                # Listen for a load change before reading the load, so none falls in between.
                load_changed = self._monitor.change_event(version_id) if live is not None else None
                instances: list[InstanceRecord] = []
                for backend in backends:
                    instances += await backend.observe(request.ref, request.specs)
                if instances_fingerprint(instances) != known:
                    return WatchResult(instances=instances)
                if live is not None and request.autoscaling is not None:
                    unchanged = self._monitor.outages == live.outages and self._monitor.load_is_zero(
                        version_id
                    )
                    if not (quiet and unchanged):
                        step = self._look_at_load(live, request.autoscaling, version_id, time.time())
                        if step.decision is not None:
                            return WatchResult(decision=step.decision)
                        # Idle, and the count holds while it stays idle: until the load changes, a
                        # wake-up (a backend re-check, a heartbeat) need not run the autoscaler.
                        quiet = self._monitor.reachable and step.sleep is None and not step.every_tick
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
                    request, backends, sleep, every_tick=step.every_tick, load_changed=load_changed
                )
        finally:
            if live is not None:
                self._monitor.remember(version_id, live.settle(self._monitor, time.time()))
                if self._live.get(key) is live:
                    del self._live[key]

    def _autoscaler(
        self, watch: AutoscalingWatch | None, key: str, version_id: str, details: object
    ) -> _LiveAutoscaler | None:
        """Build the version's autoscaler on the newest history this worker has for it.

        That is the live history of a watcher this one supersedes, else what the version's previous
        watcher in this worker left, else (a retry on another worker) the last heartbeat's.
        """
        if watch is None:
            return None
        now = time.time()
        states: list[AutoscalerState] = []
        older = self._live.get(key)
        if older is not None:
            states.append(older.settle(self._monitor, now))
        recalled = self._monitor.recall(version_id)
        if recalled is not None:
            states.append(recalled)
        if not states and isinstance(details, (list, tuple)) and details and details[0] is not None:
            with contextlib.suppress(Exception):
                states.append(AutoscalerState.model_validate(details[0]))
        state = max(states, key=lambda st: st.lastRecordAt or float("-inf"), default=None)
        live = _LiveAutoscaler(
            Autoscaler(
                watch.settings,
                watch.nvcf,
                max_request_concurrency=watch.maxRequestConcurrency,
                min_instances=watch.minInstances,
                max_instances=watch.maxInstances,
                state=state,
            ),
            version_id=version_id,
        )
        self._live[key] = live
        return live

    def _look_at_load(
        self, live: _LiveAutoscaler, watch: AutoscalingWatch, version_id: str, now: float
    ) -> _LoadStep:
        """Record the version's load and decide; say when to look again if the count stays."""
        scaler = live.scaler
        if not self._monitor.reachable:
            # No gateway answered: no data is not zero load, so decide nothing until one answers (the
            # monitor reports a change of reachability as a load change).
            live.zeros_known = False
            return _LoadStep()
        load = self._monitor.load(version_id)
        if live.zeros_known and live.outages == self._monitor.outages:
            scaler.record_zero_until(now)
        scaler.record(now, float(load.total))
        live.zeros_known, live.outages = True, self._monitor.outages
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
        load_changed: asyncio.Event | None,
    ) -> None:
        """Sleep until a backend reports a change, the load changes (or is polled), or `seconds` pass."""
        waits: list[asyncio.Task[object]] = [
            asyncio.create_task(backend.wait_for_change(request.ref, seconds)) for backend in backends
        ]
        if load_changed is not None:
            waits.append(
                asyncio.create_task(self._monitor.next_tick() if every_tick else load_changed.wait())
            )
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
