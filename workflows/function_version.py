"""The entity workflow of one function version: registry record, deployment, healing and scaling loop.

One workflow per version, ID `function:{functionId}:{versionId}`, running from registration until the
version is deleted. Its state (`VersionState`) is the only copy of the version; the API reads it with
the `describe` query and changes it with validated updates. While deployed, the workflow waits on one
heartbeating watcher activity (`watch_version`: instances and, when autoscaling, load) that returns
only when something changed, so a deployed version at rest writes nothing to its history.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from gpufn.autoscaling import AutoscalerSettings, ScalingDecision
    from workflows import activity_contracts as contract
    from workflows import errors, reconcile
    from workflows import search_attributes as sa
    from workflows.models import (
        BUSY_STATUSES,
        AutoscalingWatch,
        DeleteRequest,
        Deployment,
        DeploymentSpecification,
        DeployRequest,
        DrainInput,
        DrainInstanceSignal,
        DrainResult,
        EnsureInstancesInput,
        FunctionStatus,
        FunctionVersionInput,
        HealthInfo,
        InstanceRecord,
        InstanceStatus,
        ManualInstancesSignal,
        ObservedInstances,
        ObserveInput,
        PrepareInput,
        PrepareResult,
        ReconcileSignal,
        SpecFailures,
        TeardownInput,
        UndeployRequest,
        UpdateDeploymentRequest,
        UpdateSecretsRequest,
        UpdateTagsRequest,
        VersionRef,
        VersionState,
        VersionView,
        WatchInput,
        WatchLoadInput,
        WatchLoadResult,
        WatchResult,
    )
    from workflows.routes import route_memo, summary_memo

# Activity options, chosen deliberately: every call has a heartbeat timeout short enough that a killed
# worker is noticed in seconds, and retries back off to at most 10 s.
QUICK_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10))
"""Unbounded: only the watchers (restarted anyway) and versions started before `LIFECYCLE_STEPS_PATCH`."""
ACTION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10), maximum_attempts=8
)
"""A transient fault is retried for about 45 s (1+2+4+8+10+10+10 s); then the workflow decides: a heal
backoff and a line in healthInfo, and the deploy deadline still fires. A permanent fault (a non-retryable
`ApplicationError`, see `activities.backend.classified_faults`) is not retried at all."""
PREPARE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10), maximum_attempts=6
)
"""A registry still unreachable after about 30 s ends the deployment in ERROR with the reason."""
ACTION_TIMEOUT = timedelta(minutes=10)
ACTION_HEARTBEAT = timedelta(seconds=10)
WATCH_MAX_WAIT_SECONDS = 86400.0
"""A watcher with nothing to report still returns once a day, so none runs forever."""
WATCH_HEARTBEAT = timedelta(minutes=5)
"""The watcher runs as long as a version is deployed and every heartbeat is a write on the Temporal
server, so it beats rarely (every 0.8 x this). A restarted worker does not wait for a dead worker's
watchers to time out: it sends `reconcile_now` to every deployed version, which restarts them."""
LEGACY_WATCH_MAX_WAIT_SECONDS = 3600.0
LEGACY_WATCH_HEARTBEAT = timedelta(seconds=60)
ONE_WATCHER_PATCH = "one-version-watcher"
"""Versions started before it wait on two watchers (instances, load); they keep doing so until they
continue as new. Remove the old path with `workflow.deprecate_patch` once none is left."""
FAILURES_BEFORE_HEALTH_INFO = 3
"""Consecutive failures of a spec's instances after which the failure is shown in healthInfo."""
LIFECYCLE_STEPS_PATCH = "cancellable-lifecycle-steps"
"""Versions started with it run each reconcile step as a task that undeploy, delete and the deploy
deadline cancel; only the main loop runs backend activities, and handlers hold no lock across one.
Versions started before it keep the old path (handlers tearing down under a lock) until they continue
as new. The choice is made once per run, at its start, so a run never mixes the two."""
ANSWER_WITHIN = timedelta(seconds=4)
"""Undeploy and delete wait this long at most for the teardown before they answer (it goes on after)."""
GRACEFUL_CHECK_SECONDS = 5.0
"""A graceful undeploy first asks the gateways this long at most whether anything is queued or running."""
TEARDOWN_RETRY_AFTER_SECONDS = 30.0
"""A teardown that failed after its retries is tried again after this long, for as long as it fails."""
DEFAULT_DEPLOY_TIMEOUT_SECONDS = 900.0
"""The deploy deadline of a deploy request that does not carry one (sent by an API older than it)."""


def _raise_if_cancelled(err: ActivityError) -> None:
    """Re-raise an activity ended by the workflow's own cancellation as a cancellation of the caller.

    A cancelled activity surfaces as an `ActivityError`; it is no fault of the activity, and the step
    that awaited it must end cancelled instead of recording a failure.
    """
    if isinstance(err.cause, CancelledError):
        raise asyncio.CancelledError() from err


def _spec_failure_text(spec: DeploymentSpecification, instance: InstanceRecord) -> str:
    text = instance.error or f"instance {instance.instanceId} failed"
    if instance.logTail:
        text = f"{text}\nLast log lines of {instance.instanceId}:\n{instance.logTail}"
    return text


@workflow.defn
class FunctionVersionWorkflow:
    """Registry record and deployment lifecycle of one function version."""

    @workflow.init
    def __init__(self, input: FunctionVersionInput) -> None:
        self._state: VersionState = input.state
        self._history_limit = input.continueAsNewAfterEvents
        self._dirty = True
        self._lock = asyncio.Lock()
        self._observer: asyncio.Task[ObservedInstances] | None = None
        self._load_watcher: asyncio.Task[WatchLoadResult] | None = None
        self._watcher: asyncio.Task[WatchResult] | None = None
        self._published: tuple[Any, ...] | None = None
        self._reattach_watchers = False
        self._steps: bool | None = None
        self._step: asyncio.Task[None] | None = None
        self._drain_busy = False
        """The running graceful undeploy found requests to wait for (its DELETE can answer now)."""

    def _uses_steps(self) -> bool:
        """Return whether this run uses cancellable steps (`LIFECYCLE_STEPS_PATCH`), decided once."""
        if self._steps is None:
            self._steps = workflow.patched(LIFECYCLE_STEPS_PATCH)
        return self._steps

    def _retry(self) -> RetryPolicy:
        return ACTION_RETRY if self._uses_steps() else QUICK_RETRY

    # --- Main loop ----------------------------------------------------------------------------------

    @workflow.run
    async def run(self, input: FunctionVersionInput) -> None:
        """Keep the version's instances as its deployment asks, until the version is deleted."""
        steps = self._uses_steps()
        self._publish()
        while not self._state.deleted:
            if steps:
                await self._run_once()
            elif self._state.deployment is None:
                await self._stop_watchers()
                await workflow.wait_condition(lambda: self._dirty)
                self._dirty = False
            else:
                self._dirty = False
                if self._reattach_watchers:
                    # The watchers may belong to a worker that died: start fresh ones on a live worker
                    # now instead of waiting for their heartbeats to time out.
                    self._reattach_watchers = False
                    await self._stop_watchers()
                async with self._lock:
                    if self._state.deployment is not None:
                        await self._reconcile(self._state.deployment)
                if self._state.deployment is not None and not self._dirty:
                    await self._wait_for_change()
            if self._should_continue_as_new() and not (steps and self._removal_pending()):
                await self._stop_watchers()
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    FunctionVersionInput(state=self._state, continueAsNewAfterEvents=self._history_limit)
                )
        await self._stop_watchers()
        await workflow.wait_condition(workflow.all_handlers_finished)

    def _removal_pending(self) -> bool:
        """Return whether an undeploy or delete is still under way (a handler may be waiting for it)."""
        deployment = self._state.deployment
        removing = deployment is not None and (deployment.removing or deployment.draining)
        return removing or (self._state.deleteRequested and not self._state.deleted)

    async def _run_once(self) -> None:
        """One turn of the main loop: remove what is to go, or reconcile and wait for the next change."""
        deployment = self._state.deployment
        if self._state.deleteRequested or (deployment is not None and deployment.removing):
            await self._remove()
            return
        if deployment is None:
            await self._stop_watchers()
            await workflow.wait_condition(lambda: self._dirty)
            self._dirty = False
            return
        self._dirty = False
        if self._reattach_watchers:
            # The watchers may belong to a worker that died: start fresh ones on a live worker now
            # instead of waiting for their heartbeats to time out.
            self._reattach_watchers = False
            await self._stop_watchers()
        if not await self._run_step(deployment):
            return
        if self._state.deployment is deployment and not self._removal_pending() and not self._dirty:
            await self._wait_for_change()

    async def _run_step(self, deployment: Deployment) -> bool:
        """Run one reconcile (or drain) step as a task a handler can cancel, racing the deploy deadline.

        Returns whether the step ran to its end (False: cancelled by a handler or by the deadline).
        """
        if self._deploy_deadline(deployment) == timedelta(0):
            self._refresh_status()
        step = asyncio.create_task(self._step_body(deployment))
        self._step = step
        try:
            await workflow.wait_condition(step.done, timeout=self._deploy_deadline(deployment))
        except TimeoutError:
            if self._state.status == FunctionStatus.DEPLOYING:
                # The deadline fires whatever the step waits for (an activity retrying, a slow backend).
                step.cancel()
                await workflow.wait([step])
                self._refresh_status()
                return False
            # The step itself decided the deployment meanwhile (ERROR, ACTIVE): let it finish.
            await workflow.wait_condition(step.done)
        finally:
            if self._step is step:
                self._step = None
        if step.cancelled():
            return False
        step.result()
        return True

    async def _step_body(self, deployment: Deployment) -> None:
        try:
            if deployment.draining:
                await self._drain_then_remove(deployment)
            else:
                await self._reconcile(deployment)
        except ActivityError as err:
            _raise_if_cancelled(err)
            self._note_backend_refusal(deployment, 0, err)

    def _deploy_deadline(self, deployment: Deployment) -> timedelta | None:
        """Return the time left until DEPLOYING turns into ERROR (None when not deploying)."""
        if self._state.status != FunctionStatus.DEPLOYING or deployment.draining or deployment.removing:
            return None
        deadline = deployment.deployStartedAt + timedelta(seconds=deployment.deployTimeoutSeconds)
        return max(timedelta(0), deadline - workflow.now())

    def _cancel_step(self) -> None:
        """Cancel the running step (its activity too), so an undeploy or delete does not wait for it."""
        if self._step is not None and not self._step.done():
            self._step.cancel()

    async def _drain_then_remove(self, deployment: Deployment) -> None:
        """Graceful undeploy: remove at once when nothing is queued or running, else after the drain."""
        self._drain_busy = False
        timeout = self._autoscaler_settings(deployment.specifications[0]).drainTimeoutSeconds
        try:
            first = await self._wait_drained(deployment, min(timeout, GRACEFUL_CHECK_SECONDS), True)
            if not first.drained:
                self._drain_busy = True
                await self._wait_drained(deployment, timeout, False)
        except ActivityError as err:
            _raise_if_cancelled(err)
            # Without the gateways' word the drain cannot be confirmed; the undeploy still completes.
            workflow.logger.warning("Drain of the version failed, removing it anyway: %s", err)
        await self._undeploy_now(deployment)

    async def _wait_drained(
        self, deployment: Deployment, within_seconds: float, stop_when_busy: bool
    ) -> DrainResult:
        return await contract.execute(
            contract.WAIT_DRAINED,
            DrainInput(
                ref=self._ref(),
                wholeVersion=True,
                routesVersion=self._state.routesVersion,
                timeoutSeconds=within_seconds,
                stopWhenBusy=stop_when_busy,
            ),
            start_to_close_timeout=timedelta(seconds=within_seconds + 60),
            heartbeat_timeout=ACTION_HEARTBEAT,
            retry_policy=self._retry(),
        )

    async def _remove(self) -> None:
        """Tear the deployment down (forced undeploy or delete); then complete a requested delete."""
        deployment = self._state.deployment
        if deployment is not None:
            try:
                await self._undeploy_now(deployment)
            except ActivityError as err:
                _raise_if_cancelled(err)
                message = err.cause.message if isinstance(err.cause, ApplicationError) else str(err)
                workflow.logger.warning("Teardown failed, trying again: %s", message)
                self._state.healthInfo = [
                    HealthInfo(
                        gpu=spec.gpu,
                        backend=spec.backend or spec.clusterGroup,
                        instanceType=spec.instanceType,
                        error=f"Removing the instances failed (trying again): {message}",
                    )
                    for spec in deployment.specifications
                ]
                self._publish()
                await asyncio.sleep(TEARDOWN_RETRY_AFTER_SECONDS)
                return
        if self._state.deleteRequested:
            self._state.deleted = True
            self._set_status(FunctionStatus.DELETED)
            self._publish()

    async def _answer_when(self, done: Callable[[], bool]) -> None:
        """Let an update handler wait for the main loop to finish its request, at most `ANSWER_WITHIN`."""
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(done, timeout=ANSWER_WITHIN)

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        if self._history_limit is not None and info.get_current_history_length() > self._history_limit:
            return True
        return info.is_continue_as_new_suggested()

    async def _reconcile(self, deployment: Deployment) -> None:
        """Bring the instances to the desired counts and recompute the status (runs under the lock)."""
        if deployment.draining:
            await self._finish_graceful_undeploy(deployment)
            return
        if deployment.prepared is None:
            prepared = await self._prepare(deployment)
            if prepared is None:
                return
            deployment.prepared = prepared
        observed = await contract.execute(
            contract.OBSERVE_INSTANCES,
            ObserveInput(ref=self._ref(), specs=deployment.specifications),
            start_to_close_timeout=ACTION_TIMEOUT,
            heartbeat_timeout=ACTION_HEARTBEAT,
            retry_policy=self._retry(),
        )
        self._apply_observation(observed.instances)
        if self._state.status == FunctionStatus.ERROR:
            await self._teardown(deployment)
            self._state.instances = []
            self._publish()
            return
        await self._converge(deployment)
        self._refresh_status()

    async def _converge(self, deployment: Deployment) -> None:
        """Remove failed and drained instances, scale down through a drain, and scale up."""
        now = workflow.now()
        desired = self._desired_per_spec(deployment)
        self._state.desiredPerSpec = desired
        for index, spec in enumerate(deployment.specifications):
            mine = [i for i in self._state.instances if i.specIndex == index]
            failed = [
                i.instanceId for i in mine if i.status in (InstanceStatus.ERRORED, InstanceStatus.TERMINATED)
            ]
            live = [i for i in mine if i.status in reconcile.LIVE_STATUSES]
            to_drain = [i for i in live if i.instanceId in self._state.drainingInstanceIds]
            serving = [i for i in live if i.instanceId not in self._state.drainingInstanceIds]
            surplus = len(serving) - desired[index]
            if surplus > 0:
                # Instances still starting go first: they serve nobody yet. Then the newest serving ones.
                ranked = sorted(
                    serving,
                    key=lambda i: (i.status != InstanceStatus.STARTING, -(i.createdAt or now).timestamp()),
                )
                to_drain += ranked[:surplus]
                serving = ranked[surplus:]
            drained = await self._drain(deployment, spec, to_drain) if to_drain else []
            failures = self._failures(index)
            count = len(serving)
            if count < desired[index]:
                if failures.retryNotBefore is None or failures.retryNotBefore <= now:
                    count = desired[index]
            if failed or drained or count != len(serving) + len(to_drain) - len(drained):
                try:
                    observed = await contract.execute(
                        contract.ENSURE_INSTANCES,
                        EnsureInstancesInput(
                            ref=self._ref(),
                            spec=self._state.spec,
                            deploymentSpec=spec,
                            specIndex=index,
                            count=count + (len(to_drain) - len(drained)),
                            remove=failed + drained,
                            prepared=(deployment.prepared or [PrepareResult()] * (index + 1))[index],
                        ),
                        start_to_close_timeout=ACTION_TIMEOUT,
                        heartbeat_timeout=ACTION_HEARTBEAT,
                        retry_policy=self._retry(),
                        # A cancelled start must be over before a teardown runs, or it could leave an
                        # instance behind the teardown.
                        cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    )
                except ActivityError as err:
                    _raise_if_cancelled(err)
                    self._note_backend_refusal(deployment, index, err)
                    continue
                self._state.drainingInstanceIds = [
                    d for d in self._state.drainingInstanceIds if d not in drained
                ]
                self._apply_observation(observed.instances, spec_index=index)

    def _note_backend_refusal(self, deployment: Deployment, index: int, err: ActivityError) -> None:
        """Record a backend's permanent refusal to provision (quota, permissions, an invalid object).

        While deploying it ends the deployment in ERROR, as NVCF does; afterwards it is shown in
        healthInfo and retried after the heal backoff. With `LIFECYCLE_STEPS_PATCH`, only a permanent
        fault (non-retryable) ends a deployment at once; a transient one that outlived its retries backs
        off like an instance failure, and the deploy deadline decides.
        """
        cause = err.cause
        message = cause.message if isinstance(cause, ApplicationError) else str(err)
        permanent = isinstance(cause, ApplicationError) and cause.non_retryable
        if self._uses_steps() and err.activity_type and err.activity_type not in message:
            message = f"{err.activity_type}: {message}"
        failures = self._failures(index)
        failures.consecutive += 1
        failures.total += 1
        failures.lastError = message
        failures.retryNotBefore = workflow.now() + timedelta(
            seconds=reconcile.heal_backoff_seconds(failures.consecutive)
        )
        self._refresh_health_info(deployment, force=True)
        if self._state.status == FunctionStatus.DEPLOYING and (permanent or not self._uses_steps()):
            self._set_status(FunctionStatus.ERROR)
            self._publish()
        elif self._uses_steps():
            self._publish()

    async def _drain(
        self, deployment: Deployment, spec: DeploymentSpecification, instances: list[InstanceRecord]
    ) -> list[str]:
        """Stop routing to `instances`, wait for their in-flight requests, and return their IDs."""
        ids = [i.instanceId for i in instances]
        for instance in instances:
            if instance.instanceId not in self._state.drainingInstanceIds:
                self._state.drainingInstanceIds.append(instance.instanceId)
        self._bump_routes()
        self._publish()
        serving = [i for i in instances if i.status != InstanceStatus.STARTING]
        if serving:
            await contract.execute(
                contract.WAIT_DRAINED,
                DrainInput(
                    ref=self._ref(),
                    instanceIds=[i.instanceId for i in serving],
                    routesVersion=self._state.routesVersion,
                    timeoutSeconds=self._autoscaler_settings(spec).drainTimeoutSeconds,
                ),
                start_to_close_timeout=timedelta(
                    seconds=self._autoscaler_settings(spec).drainTimeoutSeconds + 60
                ),
                heartbeat_timeout=ACTION_HEARTBEAT,
                retry_policy=self._retry(),
            )
        return ids

    async def _prepare(self, deployment: Deployment) -> list[PrepareResult] | None:
        """Resolve and pull each spec's artifacts; on a permanent error, end in ERROR with the reason."""
        results: list[PrepareResult] = []
        for spec in deployment.specifications:
            try:
                result = await contract.execute(
                    contract.PREPARE,
                    PrepareInput(ref=self._ref(), spec=self._state.spec, deploymentSpec=spec),
                    start_to_close_timeout=ACTION_TIMEOUT,
                    heartbeat_timeout=ACTION_HEARTBEAT,
                    retry_policy=PREPARE_RETRY,
                )
            except ActivityError as err:
                _raise_if_cancelled(err)
                cause = err.cause
                message = cause.message if isinstance(cause, ApplicationError) else str(err)
                self._state.healthInfo = [
                    HealthInfo(
                        gpu=spec.gpu,
                        backend=spec.backend or spec.clusterGroup,
                        instanceType=spec.instanceType,
                        error=message,
                    )
                ]
                self._set_status(FunctionStatus.ERROR)
                return None
            results.append(result)
        return results

    async def _finish_graceful_undeploy(self, deployment: Deployment) -> None:
        """Wait for the version's queued and in-flight requests, then tear everything down."""
        spec = deployment.specifications[0]
        await contract.execute(
            contract.WAIT_DRAINED,
            DrainInput(
                ref=self._ref(),
                wholeVersion=True,
                routesVersion=self._state.routesVersion,
                timeoutSeconds=self._autoscaler_settings(spec).drainTimeoutSeconds,
            ),
            start_to_close_timeout=timedelta(
                seconds=self._autoscaler_settings(spec).drainTimeoutSeconds + 60
            ),
            heartbeat_timeout=ACTION_HEARTBEAT,
            retry_policy=QUICK_RETRY,
        )
        await self._undeploy_now(deployment)

    async def _undeploy_now(self, deployment: Deployment) -> None:
        await self._stop_watchers()
        await self._teardown(deployment)
        self._state.deployment = None
        self._state.instances = []
        self._state.drainingInstanceIds = []
        self._state.desiredPerSpec = []
        self._state.failures = []
        self._state.scaling.current = 0
        self._state.scaling.desired = 0
        self._state.scaling.manualInstances = None
        if self._state.status != FunctionStatus.DELETED:
            self._set_status(FunctionStatus.INACTIVE)
        self._bump_routes()
        self._publish()

    async def _teardown(self, deployment: Deployment) -> None:
        await contract.execute(
            contract.TEARDOWN,
            TeardownInput(ref=self._ref(), specs=deployment.specifications),
            start_to_close_timeout=ACTION_TIMEOUT,
            heartbeat_timeout=ACTION_HEARTBEAT,
            retry_policy=self._retry(),
        )

    # --- Waiting for something to change ------------------------------------------------------------

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

    def _record_decision(self, decision: ScalingDecision) -> None:
        self._state.scaling.lastDecision = decision
        self._state.scaling.decidedAt = workflow.now()
        self._state.scaling.desired = decision.desired

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

    # --- Observations and status --------------------------------------------------------------------

    def _apply_observation(self, instances: list[InstanceRecord], spec_index: int | None = None) -> None:
        """Take the backend's view of the instances (all, or one spec's) and update failures and status."""
        if spec_index is None:
            previous = {i.instanceId: i for i in self._state.instances}
            self._state.instances = instances
        else:
            previous = {i.instanceId: i for i in self._state.instances if i.specIndex == spec_index}
            others = [i for i in self._state.instances if i.specIndex != spec_index]
            self._state.instances = others + [i for i in instances if i.specIndex == spec_index]
        deployment = self._state.deployment
        if deployment is None:
            return
        now = workflow.now()
        for instance in self._state.instances:
            before = previous.get(instance.instanceId)
            failures = self._failures(instance.specIndex)
            if instance.status == InstanceStatus.RUNNING and (
                before is None or before.status != instance.status
            ):
                failures.consecutive = 0
                failures.retryNotBefore = None
            if instance.status == InstanceStatus.ERRORED and (
                before is None or before.status != instance.status
            ):
                spec = deployment.specifications[instance.specIndex]
                failures.consecutive += 1
                failures.total += 1
                failures.lastError = _spec_failure_text(spec, instance)
                failures.retryNotBefore = now + timedelta(
                    seconds=reconcile.heal_backoff_seconds(failures.consecutive)
                )
        self._refresh_health_info(deployment)
        self._refresh_status()

    def _refresh_status(self) -> None:
        deployment = self._state.deployment
        if deployment is None or deployment.draining:
            return
        self._state.scaling.current = sum(
            1
            for i in self._state.instances
            if i.status in reconcile.LIVE_STATUSES and i.instanceId not in self._state.drainingInstanceIds
        )
        deploy_failed = False
        if self._state.status == FunctionStatus.DEPLOYING:
            total_min = reconcile.default_total(deployment.specifications)
            tried = [i for i in self._state.instances]
            all_failed = len(tried) >= max(1, total_min) and all(
                i.status in (InstanceStatus.ERRORED, InstanceStatus.TERMINATED) for i in tried
            )
            past_deadline = workflow.now() >= deployment.deployStartedAt + timedelta(
                seconds=deployment.deployTimeoutSeconds
            )
            deploy_failed = all_failed or past_deadline
            if past_deadline and not all_failed:
                self._note_deadline(deployment)
        status = reconcile.next_status(
            self._state.status, deployment.specifications, self._state.instances, deploy_failed
        )
        self._set_status(status)
        self._publish()

    def _note_deadline(self, deployment: Deployment) -> None:
        for index in range(len(deployment.specifications)):
            failures = self._failures(index)
            if failures.lastError is None:
                seconds = deployment.deployTimeoutSeconds
                failures.lastError = f"Instances did not pass their health check within {seconds:.0f} s"
        self._refresh_health_info(deployment, force=True)

    def _refresh_health_info(self, deployment: Deployment, force: bool = False) -> None:
        """Show each spec's last failure once it repeats (or at once while deploying)."""
        entries: list[HealthInfo] = []
        deploying = self._state.status == FunctionStatus.DEPLOYING
        for index, spec in enumerate(deployment.specifications):
            failures = self._failures(index)
            waiting = [
                i
                for i in self._state.instances
                if i.specIndex == index and i.status == InstanceStatus.STARTING and i.error
            ]
            if waiting and (failures.lastError is None or deploying):
                # Instances that cannot start yet (no free GPU, unschedulable, image pull) say why.
                entries.append(
                    HealthInfo(
                        gpu=spec.gpu,
                        backend=spec.backend or spec.clusterGroup,
                        instanceType=spec.instanceType,
                        error=waiting[0].error or "",
                    )
                )
                continue
            if failures.lastError is None:
                continue
            if force or deploying or failures.consecutive >= FAILURES_BEFORE_HEALTH_INFO:
                entries.append(
                    HealthInfo(
                        gpu=spec.gpu,
                        backend=spec.backend or spec.clusterGroup,
                        instanceType=spec.instanceType,
                        error=failures.lastError,
                    )
                )
        if entries or self._state.status != FunctionStatus.ERROR:
            self._state.healthInfo = entries

    def _set_status(self, status: FunctionStatus) -> None:
        if status != self._state.status:
            workflow.logger.info("Status %s -> %s", self._state.status, status)
            self._state.status = status
            self._bump_routes()

    def _failures(self, index: int) -> SpecFailures:
        while len(self._state.failures) <= index:
            self._state.failures.append(SpecFailures())
        return self._state.failures[index]

    # --- Scaling ------------------------------------------------------------------------------------

    def _autoscaler_settings(self, spec: DeploymentSpecification) -> AutoscalerSettings:
        return spec.gpufnAutoscaler or AutoscalerSettings()

    def _autoscaling_enabled(self, deployment: Deployment) -> bool:
        if self._state.scaling.manualInstances is not None:
            return False
        return any(s.maxInstances > s.minInstances for s in deployment.specifications)

    def _watch_load_input(self, deployment: Deployment) -> WatchLoadInput:
        specs = deployment.specifications
        first = specs[0]
        ready = sum(
            1
            for i in self._state.instances
            if i.status == InstanceStatus.RUNNING and i.instanceId not in self._state.drainingInstanceIds
        )
        return WatchLoadInput(
            ref=self._ref(),
            # The gateway sends each instance up to its spec's maxRequestConcurrency; use the smallest so
            # the target per instance is never above what an instance can take.
            maxRequestConcurrency=min(s.maxRequestConcurrency for s in specs),
            minInstances=sum(s.minInstances for s in specs),
            maxInstances=sum(s.maxInstances for s in specs),
            current=self._current_target_total(deployment),
            ready=ready,
            settings=self._autoscaler_settings(first),
            nvcf=first.autoscalingConfiguration,
            maxWaitSeconds=LEGACY_WATCH_MAX_WAIT_SECONDS,
        )

    def _current_target_total(self, deployment: Deployment) -> int:
        if self._state.scaling.manualInstances is not None:
            return reconcile.clamp_total(deployment.specifications, self._state.scaling.manualInstances)
        if self._state.scaling.lastDecision is None:
            return reconcile.default_total(deployment.specifications)
        return reconcile.clamp_total(deployment.specifications, self._state.scaling.desired)

    def _desired_per_spec(self, deployment: Deployment) -> list[int]:
        total = self._current_target_total(deployment)
        self._state.scaling.desired = total
        return reconcile.split_total(deployment.specifications, total)

    # --- Publication to visibility (the Web UI, the list endpoints and the gateways) ----------------

    def _bump_routes(self) -> None:
        self._state.routesVersion += 1

    def _publish(self) -> None:
        """Upsert the status search attribute and the memo when what they show changed."""
        summary = summary_memo(self._state)
        route = route_memo(self._state)
        key = (self._state.status, self._state.routesVersion, str(summary), str(route))
        if key == self._published:
            return
        changed_status = self._published is None or self._published[0] != self._state.status
        changed_routes = self._published is None or self._published[1:] != key[1:]
        self._published = key
        updates: list[SearchAttributeUpdate[Any]] = []
        if changed_status:
            updates.append(sa.STATUS.value_set(self._state.status.value))
        if changed_routes:
            updates.append(sa.ROUTES_UPDATED_AT.value_set(workflow.now()))
        if updates:
            workflow.upsert_search_attributes(updates)
        workflow.upsert_memo({"summary": summary, "route": route})

    def _ref(self) -> VersionRef:
        spec = self._state.spec
        return VersionRef(accountId=spec.ncaId, functionId=spec.id, versionId=spec.versionId)

    # --- Queries ------------------------------------------------------------------------------------

    @workflow.query
    def describe(self) -> VersionView:
        """Return the whole state: spec, status, deployment, instances, scaling, healthInfo."""
        return VersionView(state=self._state)

    # --- Updates ------------------------------------------------------------------------------------

    @workflow.update
    async def deploy(self, request: DeployRequest) -> VersionView:
        """Create the deployment (status DEPLOYING, or ACTIVE when every spec has minInstances 0)."""
        specs = request.specifications
        self._state.deployment = Deployment(
            deploymentId=request.deploymentId,
            specifications=specs,
            createdAt=request.requestedAt,
            lastUpdatedAt=request.requestedAt,
            deployStartedAt=workflow.now(),
            deployTimeoutSeconds=(
                request.deployTimeoutSeconds
                if request.deployTimeoutSeconds is not None
                else DEFAULT_DEPLOY_TIMEOUT_SECONDS
            ),
        )
        self._state.instances = []
        self._state.failures = [SpecFailures() for _ in specs]
        self._state.healthInfo = []
        self._state.drainingInstanceIds = []
        self._state.scaling.lastDecision = None
        self._state.scaling.manualInstances = None
        self._state.scaling.desired = reconcile.default_total(specs)
        self._state.desiredPerSpec = reconcile.split_total(specs, self._state.scaling.desired)
        self._set_status(reconcile.initial_status(specs))
        self._bump_routes()
        self._publish()
        self._dirty = True
        return VersionView(state=self._state)

    @deploy.validator
    def _validate_deploy(self, request: DeployRequest) -> None:
        self._reject_if_deleted()
        status = self._state.status
        if status == FunctionStatus.ERROR:
            raise errors.refused(
                errors.INVALID_STATE,
                "Function already has a deployment with errors. "
                "Delete the deployment before deploying again.",
            )
        if status in BUSY_STATUSES:
            raise errors.refused(
                errors.INVALID_STATE,
                f"Function is {status}: already deployed, use PUT to update the deployment.",
            )
        if self._state.deployment is not None:
            raise errors.refused(
                errors.DEPLOYMENT_FINISHING,
                "Wait for current deployment to be gracefully completed.",
                retry_can_help=True,
            )

    @workflow.update
    async def update_deployment(self, request: UpdateDeploymentRequest) -> VersionView:
        """Change min/max instances, maxRequestConcurrency and autoscaling of the deployment."""
        deployment = self._state.deployment
        assert deployment is not None
        for current, new in zip(deployment.specifications, request.specifications, strict=True):
            current.minInstances = new.minInstances
            current.maxInstances = new.maxInstances
            current.maxRequestConcurrency = new.maxRequestConcurrency
            if new.autoscalingConfiguration is not None:
                current.autoscalingConfiguration = new.autoscalingConfiguration
            if new.gpufnAutoscaler is not None:
                current.gpufnAutoscaler = new.gpufnAutoscaler
        deployment.lastUpdatedAt = request.requestedAt
        self._state.scaling.desired = reconcile.clamp_total(
            deployment.specifications, self._state.scaling.desired
        )
        self._state.desiredPerSpec = reconcile.split_total(
            deployment.specifications, self._state.scaling.desired
        )
        self._restart_load_watcher()
        self._bump_routes()
        self._refresh_status()
        self._dirty = True
        return VersionView(state=self._state)

    @update_deployment.validator
    def _validate_update_deployment(self, request: UpdateDeploymentRequest) -> None:
        self._reject_if_deleted()
        deployment = self._state.deployment
        if (
            self._state.status not in BUSY_STATUSES
            or deployment is None
            or deployment.draining
            or deployment.removing
        ):
            raise errors.refused(
                errors.INVALID_STATE,
                f"Invalid status {self._state.status}: the function version is not deployed.",
            )
        if len(request.specifications) != len(deployment.specifications):
            raise errors.refused(
                errors.INVALID_DEPLOYMENT, "The deployment specifications must match the existing deployment."
            )
        for current, new in zip(deployment.specifications, request.specifications, strict=True):
            if (current.gpu, current.instanceType, current.clusterGroup) != (
                new.gpu,
                new.instanceType,
                new.clusterGroup,
            ) or (current.clusters or []) != (new.clusters or []):
                raise errors.refused(
                    errors.INVALID_DEPLOYMENT,
                    "gpu, instanceType, backend and clusters cannot change; undeploy and deploy again.",
                )

    @workflow.update
    async def undeploy(self, request: UndeployRequest) -> VersionView:
        """Undeploy: INACTIVE at once; forced removes instances now, graceful after the queue drains.

        A graceful undeploy with nothing queued or running completes before it answers, so the same
        deployment can be created again at once (the NGC SDK's `restart()`); with work pending it
        answers while the drain goes on, and a deploy is refused until the drain ends.
        """
        deployment = self._state.deployment
        assert deployment is not None
        self._set_status(FunctionStatus.INACTIVE)
        if self._uses_steps():
            if request.graceful and not deployment.removing:
                deployment.draining = True
            else:
                deployment.removing = True
                deployment.draining = False
            self._drain_busy = False
            self._cancel_step()
            self._publish()
            self._dirty = True
            await self._answer_when(
                lambda: self._state.deployment is not deployment or (request.graceful and self._drain_busy)
            )
            return VersionView(state=self._state)
        if request.graceful:
            deployment.draining = True
            self._publish()
            self._dirty = True
            return VersionView(state=self._state)
        async with self._lock:
            if self._state.deployment is not None:
                await self._undeploy_now(self._state.deployment)
        self._dirty = True
        return VersionView(state=self._state)

    @undeploy.validator
    def _validate_undeploy(self, request: UndeployRequest) -> None:
        self._reject_if_deleted()
        if self._state.deployment is None:
            raise errors.refused(errors.NOT_DEPLOYED, "The function version is not deployed.")

    @workflow.update
    async def update_tags(self, request: UpdateTagsRequest) -> VersionView:
        """Replace the version's tags (and, when given, its rate limit)."""
        if request.tags is not None:
            self._state.spec.tags = request.tags
        if request.rateLimit is not None:
            self._state.spec.rateLimit = request.rateLimit or None
        self._publish()
        return VersionView(state=self._state)

    @update_tags.validator
    def _validate_update_tags(self, request: UpdateTagsRequest) -> None:
        self._reject_if_deleted()

    @workflow.update
    async def update_secrets(self, request: UpdateSecretsRequest) -> VersionView:
        """Merge secrets into the version's (what each backend does with new values: docs/api.md)."""
        spec = self._state.spec
        for name, sealed in request.encryptedSecrets.items():
            if name not in spec.encryptedSecrets:
                spec.secretNames.append(name)
            spec.encryptedSecrets[name] = sealed
        self._publish()
        return VersionView(state=self._state)

    @update_secrets.validator
    def _validate_update_secrets(self, request: UpdateSecretsRequest) -> None:
        self._reject_if_deleted()
        if not self._state.spec.secretNames and self._state.status != FunctionStatus.INACTIVE:
            raise errors.refused(
                errors.INVALID_STATE,
                f"Function is {self._state.status}: secrets can be added to a version without secrets "
                "only while it is INACTIVE (existing secrets can be updated in any state).",
            )

    @workflow.update
    async def delete(self, request: DeleteRequest) -> VersionView:
        """Force-undeploy and delete the version; the workflow then completes.

        Answered once the instances are gone, or after `ANSWER_WITHIN` while the teardown goes on.
        """
        if self._uses_steps():
            self._set_status(FunctionStatus.DELETED)
            self._state.deleteRequested = True
            if self._state.deployment is not None:
                self._state.deployment.removing = True
                self._state.deployment.draining = False
            self._cancel_step()
            self._publish()
            self._dirty = True
            await self._answer_when(lambda: self._state.deleted)
            return VersionView(state=self._state)
        async with self._lock:
            self._set_status(FunctionStatus.DELETED)
            if self._state.deployment is not None:
                await self._undeploy_now(self._state.deployment)
            self._state.deleted = True
            self._publish()
        self._dirty = True
        return VersionView(state=self._state)

    @delete.validator
    def _validate_delete(self, request: DeleteRequest) -> None:
        self._reject_if_deleted()

    def _reject_if_deleted(self) -> None:
        if self._state.deleted or self._state.deleteRequested:
            raise errors.refused(errors.VERSION_DELETED, "The function version is deleted.")

    # --- Signals (for operators and scripts) --------------------------------------------------------

    @workflow.signal
    def reconcile_now(self, signal: ReconcileSignal) -> None:
        """Re-observe the instances, re-apply the desired state and restart the watchers now.

        Every worker sends this to the deployed versions when it starts, so versions whose watchers ran
        on a worker that died are watched again at once.
        """
        self._reattach_watchers = True
        self._dirty = True

    @workflow.signal
    def set_manual_instances(self, signal: ManualInstancesSignal) -> None:
        """Pin the instance count, overriding the autoscaler until cleared with `count: null`."""
        if signal.count is not None and signal.count < 0:
            workflow.logger.warning("Ignoring negative manual instance count %s", signal.count)
            return
        self._state.scaling.manualInstances = signal.count
        self._restart_load_watcher()
        self._dirty = True

    @workflow.signal
    def drain_instance(self, signal: DrainInstanceSignal) -> None:
        """Stop routing to one instance, let its requests finish, then replace it."""
        known = {i.instanceId for i in self._state.instances}
        if signal.instanceId not in known:
            workflow.logger.warning("Ignoring drain of unknown instance %s", signal.instanceId)
            return
        if signal.instanceId not in self._state.drainingInstanceIds:
            self._state.drainingInstanceIds.append(signal.instanceId)
        self._dirty = True
