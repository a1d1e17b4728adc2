"""Part of the version workflow: waiting for something to change (the watcher activities, the heal
backoff and deploy deadline timers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

from workflows import activity_contracts as contract
from workflows.lifecycle_options import (
    DEADLINE_CHECK,
    DEADLINE_DOWNTIME_PATCH,
    LEGACY_WATCH_HEARTBEAT,
    LEGACY_WATCH_MAX_WAIT_SECONDS,
    ONE_WATCHER_PATCH,
    PLATFORM_STOP_MARGIN,
    QUICK_RETRY,
    WATCH_HEARTBEAT,
    WATCH_MAX_WAIT_SECONDS,
)
from workflows.models import (
    AutoscalingWatch,
    Deployment,
    FunctionStatus,
    ObservedInstances,
    ObserveInput,
    WatchInput,
    WatchLoadResult,
    WatchResult,
)
from workflows.version_status import VersionStatusKeeper


class VersionWatching(VersionStatusKeeper):
    """Starts, waits on and stops the version's watcher activities."""

    _dirty: bool
    _observer: asyncio.Task[ObservedInstances] | None
    _load_watcher: asyncio.Task[WatchLoadResult] | None
    _watcher: asyncio.Task[WatchResult] | None
    _skips_downtime: bool | None

    async def _wait_for_change(self) -> None:
        """Wait until an instance changes, the autoscaler wants another count, a handler ran, or a timer."""
        if not workflow.patched(ONE_WATCHER_PATCH):
            await self._wait_for_change_legacy()
            return
        deployment = self._state.deployment
        assert deployment is not None
        if self._watcher is None:
            self._watcher = contract.start(
                contract.WATCH_VERSION,
                self._watch_input(deployment),
                start_to_close_timeout=timedelta(seconds=WATCH_MAX_WAIT_SECONDS + 120),
                heartbeat_timeout=WATCH_HEARTBEAT,
                retry_policy=QUICK_RETRY,
            )
        watcher = self._watcher
        try:
            await self._wait_counting_downtime(
                lambda: self._dirty or watcher.done(), lambda: self._next_timer(deployment)
            )
        except TimeoutError:
            return
        if not watcher.done():
            return
        if self._watcher is watcher:
            self._watcher = None
        # A watcher cancelled by a handler (undeploy, delete, a new autoscaling setting) while this loop
        # waited is done but has no result; it was already replaced or is no longer wanted.
        if watcher.cancelled():
            return
        try:
            result = watcher.result()
        except ActivityError as err:
            workflow.logger.warning("Version watcher failed, restarting it: %s", err)
            return
        if result.instances is not None:
            self._apply_observation(result.instances)
        if result.decision is not None:
            self._record_decision(result.decision)

    def _watch_input(self, deployment: Deployment) -> WatchInput:
        autoscaling = None
        if self._autoscaling_enabled(deployment):
            load = self._watch_load_input(deployment)
            autoscaling = AutoscalingWatch(
                maxRequestConcurrency=load.maxRequestConcurrency,
                minInstances=load.minInstances,
                maxInstances=load.maxInstances,
                current=load.current,
                ready=load.ready,
                settings=load.settings,
                nvcf=load.nvcf,
            )
        return WatchInput(
            ref=self._ref(),
            specs=deployment.specifications,
            known=self._state.instances,
            autoscaling=autoscaling,
            maxWaitSeconds=WATCH_MAX_WAIT_SECONDS,
        )

    async def _wait_for_change_legacy(self) -> None:
        """The two-watcher wait of versions started before `ONE_WATCHER_PATCH`."""
        deployment = self._state.deployment
        assert deployment is not None
        if self._observer is None:
            self._observer = contract.start(
                contract.OBSERVE_INSTANCES,
                ObserveInput(
                    ref=self._ref(),
                    specs=deployment.specifications,
                    known=self._state.instances,
                    waitForChange=True,
                    maxWaitSeconds=LEGACY_WATCH_MAX_WAIT_SECONDS,
                ),
                start_to_close_timeout=timedelta(seconds=LEGACY_WATCH_MAX_WAIT_SECONDS + 120),
                heartbeat_timeout=LEGACY_WATCH_HEARTBEAT,
                retry_policy=QUICK_RETRY,
            )
        if self._load_watcher is None and self._autoscaling_enabled(deployment):
            self._load_watcher = contract.start(
                contract.WATCH_LOAD,
                self._watch_load_input(deployment),
                start_to_close_timeout=timedelta(seconds=LEGACY_WATCH_MAX_WAIT_SECONDS + 120),
                heartbeat_timeout=LEGACY_WATCH_HEARTBEAT,
                retry_policy=QUICK_RETRY,
            )
        observer, load_watcher = self._observer, self._load_watcher
        try:
            await workflow.wait_condition(
                lambda: self._dirty or observer.done() or (load_watcher is not None and load_watcher.done()),
                timeout=self._next_timer(deployment),
            )
        except TimeoutError:
            return
        # A watcher cancelled by a handler (undeploy, delete, a new autoscaling setting) while this loop
        # waited is done but has no result; it was already replaced or is no longer wanted.
        if observer.done():
            if self._observer is observer:
                self._observer = None
            if not observer.cancelled():
                try:
                    self._apply_observation(observer.result().instances)
                except ActivityError as err:
                    workflow.logger.warning("Instance watcher failed, restarting it: %s", err)
        if load_watcher is not None and load_watcher.done():
            if self._load_watcher is load_watcher:
                self._load_watcher = None
            decision = None
            if not load_watcher.cancelled():
                try:
                    decision = load_watcher.result().decision
                except ActivityError as err:
                    workflow.logger.warning("Load watcher failed, restarting it: %s", err)
            if decision is not None:
                self._record_decision(decision)

    def _next_timer(self, deployment: Deployment) -> timedelta | None:
        """Return the time until the next deadline: a heal backoff ending, or the deploy deadline."""
        now = workflow.now()
        deadlines: list[datetime] = [
            f.retryNotBefore
            for f in self._state.failures
            if f.retryNotBefore is not None and f.retryNotBefore > now
        ]
        if self._state.status == FunctionStatus.DEPLOYING:
            deadlines.append(deployment.deploy_deadline())
        if not deadlines:
            return None
        return max(timedelta(milliseconds=10), min(deadlines) - now)

    def _skips_platform_downtime(self) -> bool:
        """Return whether this run keeps platform downtime off the deploy deadline, decided once."""
        if self._skips_downtime is None:
            self._skips_downtime = self._uses_steps() and workflow.patched(DEADLINE_DOWNTIME_PATCH)
        return self._skips_downtime

    def _counts_downtime(self) -> bool:
        """Return whether a wait now must notice platform downtime (DEPLOYING, with the patch)."""
        deployment = self._state.deployment
        return (
            deployment is not None
            and self._state.status == FunctionStatus.DEPLOYING
            and not deployment.draining
            and not deployment.removing
            and self._skips_platform_downtime()
        )

    async def _wait_counting_downtime(
        self, condition: Callable[[], bool], time_left: Callable[[], timedelta | None]
    ) -> None:
        """Wait until `condition()` holds; raise `TimeoutError` when the timer `time_left()` fires.

        While DEPLOYING (with `DEADLINE_DOWNTIME_PATCH`) the wait is a series of timers of at most
        `DEADLINE_CHECK`. While the worker and Temporal run, the workflow wakes at the latest when such
        a timer is due; a wake-up later than that by more than `PLATFORM_STOP_MARGIN` means nothing ran
        the workflow (worker or Temporal stopped), and that lateness is added to the deployment's
        `deployPausedSeconds`, which moves the deploy deadline. A stopped worker holds no activity
        attempt back either: a retry waits in the task queue without a timeout until a worker takes it.
        """
        while True:
            left = time_left()
            if not self._counts_downtime():
                await workflow.wait_condition(condition, timeout=left)
                return
            if condition():
                return
            if left is not None and left <= timedelta(0):
                raise TimeoutError()
            check = DEADLINE_CHECK if left is None else min(left, DEADLINE_CHECK)
            started = workflow.now()
            try:
                await workflow.wait_condition(condition, timeout=check)
            except TimeoutError:
                self._note_platform_downtime(started, check)
                if check == left:
                    raise
                continue
            self._note_platform_downtime(started, check)
            return

    def _note_platform_downtime(self, started: datetime, timer: timedelta) -> None:
        """Count the time since the workflow last ran (`started`) as paused, if its wake-up was late.

        A wake-up later than its timer `timer` (set at `started`) by more than the margin means the
        platform stopped at some moment after `started`; when is unknown, so the whole interval is
        counted: the function gets the benefit of the doubt (at most one `DEADLINE_CHECK` more than the
        stop), instead of losing the part of the stop that fell before the timer was due.
        """
        deployment = self._state.deployment
        now = workflow.now()
        if deployment is None or now - started - timer <= PLATFORM_STOP_MARGIN:
            return
        paused = (now - started).total_seconds()
        deployment.deployPausedSeconds += paused
        workflow.logger.warning(
            "The platform was stopped for up to %.0f s while deploying; the deploy deadline moves by that",
            paused,
        )

    async def _stop_watchers(self) -> None:
        for task in (self._observer, self._load_watcher, self._watcher):
            if task is not None and not task.done():
                task.cancel()
        self._observer = None
        self._load_watcher = None
        self._watcher = None

    def _restart_load_watcher(self) -> None:
        """Restart whatever watches the load, because what the autoscaler works with changed."""
        for task in (self._load_watcher, self._watcher):
            if task is not None and not task.done():
                task.cancel()
        self._load_watcher = None
        self._watcher = None
