"""Part of the version workflow: waiting for something to change (the watcher activities, the heal
backoff and deploy deadline timers).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

from workflows import activity_contracts as contract
from workflows.lifecycle_options import (
    LEGACY_WATCH_HEARTBEAT,
    LEGACY_WATCH_MAX_WAIT_SECONDS,
    ONE_WATCHER_PATCH,
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
            await workflow.wait_condition(
                lambda: self._dirty or watcher.done(), timeout=self._next_timer(deployment)
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
            deadlines.append(deployment.deployStartedAt + timedelta(seconds=deployment.deployTimeoutSeconds))
        if not deadlines:
            return None
        return max(timedelta(milliseconds=10), min(deadlines) - now)

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
