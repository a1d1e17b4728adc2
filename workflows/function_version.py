"""The entity workflow of one function version: registry record, deployment, healing and scaling loop.

One workflow per version, ID `function:{functionId}:{versionId}`, running from registration until the
version is deleted. Its state (`VersionState`) is the only copy of the version; the API reads it with
the `describe` query and changes it with validated updates. While deployed, the workflow waits on one
heartbeating watcher activity (`watch_version`: instances and, when autoscaling, load) that returns
only when something changed, so a deployed version at rest writes nothing to its history.

This module holds the main loop, the updates, signals and the query; its parts are base classes, one
job each: `version_status.py` (observations, status, healthInfo, publication), `version_watching.py`
(waiting for a change), `version_steps.py` (the steps that call the backends), with the activity
options and patch names in `lifecycle_options.py`. Temporal knows the workflow by its class name
(`FunctionVersionWorkflow`), which recorded histories name; it must not change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows import errors, reconcile
    from workflows.lifecycle_options import raise_if_cancelled
    from workflows.models import (
        BUSY_STATUSES,
        DeleteRequest,
        Deployment,
        DeployRequest,
        DrainInstanceSignal,
        FunctionStatus,
        FunctionVersionInput,
        ManualInstancesSignal,
        ObservedInstances,
        ReconcileSignal,
        SpecFailures,
        UndeployRequest,
        UpdateDeploymentRequest,
        UpdateSecretsRequest,
        UpdateTagsRequest,
        VersionState,
        VersionView,
        WatchLoadResult,
        WatchResult,
    )
    from workflows.version_steps import VersionSteps


ANSWER_WITHIN = timedelta(seconds=4)
"""Undeploy and delete wait this long at most for the teardown before they answer (it goes on after)."""
DEFAULT_DEPLOY_TIMEOUT_SECONDS = 900.0
"""The deploy deadline of a deploy request that does not carry one (sent by an API older than it)."""


@workflow.defn
class FunctionVersionWorkflow(VersionSteps):
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
        self._skips_downtime: bool | None = None
        """Whether this run keeps platform downtime off the deploy deadline (`DEADLINE_DOWNTIME_PATCH`)."""

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
            while True:
                try:
                    await self._wait_counting_downtime(step.done, lambda: self._deploy_deadline(deployment))
                    break
                except TimeoutError:
                    left = self._deploy_deadline(deployment)
                    if self._skips_downtime and left is not None and left > timedelta(0):
                        # The deadline timer fired late because the platform was stopped: it moved.
                        continue
                    if self._state.status == FunctionStatus.DEPLOYING:
                        # The deadline fires whatever the step waits for (an activity retrying, a slow
                        # backend).
                        step.cancel()
                        await workflow.wait([step])
                        self._refresh_status()
                        return False
                    # The step itself decided the deployment meanwhile (ERROR, ACTIVE): let it finish.
                    await workflow.wait_condition(step.done)
                    break
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
            raise_if_cancelled(err)
            self._note_backend_refusal(deployment, 0, err)

    def _deploy_deadline(self, deployment: Deployment) -> timedelta | None:
        """Return the time left until DEPLOYING turns into ERROR (None when not deploying)."""
        if self._state.status != FunctionStatus.DEPLOYING or deployment.draining or deployment.removing:
            return None
        return max(timedelta(0), deployment.deploy_deadline() - workflow.now())

    def _cancel_step(self) -> None:
        """Cancel the running step (its activity too), so an undeploy or delete does not wait for it."""
        if self._step is not None and not self._step.done():
            self._step.cancel()

    async def _answer_when(self, done: Callable[[], bool]) -> None:
        """Let an update handler wait for the main loop to finish its request, at most `ANSWER_WITHIN`."""
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(done, timeout=ANSWER_WITHIN)

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        if self._history_limit is not None and info.get_current_history_length() > self._history_limit:
            return True
        return info.is_continue_as_new_suggested()

    # --- Waiting for something to change ------------------------------------------------------------

    # --- Observations and status --------------------------------------------------------------------

    # --- Scaling ------------------------------------------------------------------------------------

    # --- Publication to visibility (the Web UI, the list endpoints and the gateways) ----------------

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
        state = self._state
        if request.accountId is not None and (
            request.accountId != state.spec.ncaId
            or state.deleted
            or state.deleteRequested
            or state.status == FunctionStatus.DELETED
        ):
            raise errors.refused(errors.VERSION_NOT_FOUND, "The function version is not found.")
        self._reject_if_deleted()
        if not state.spec.helmChart and any(s.configuration for s in request.specifications):
            raise errors.refused(
                errors.INVALID_DEPLOYMENT, "configuration is only allowed for Helm-chart functions"
            )
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
