"""Part of the version workflow: the steps that call the backends (prepare, observe, converge, drain,
teardown), run by its main loop.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from workflows import activity_contracts as contract
from workflows import reconcile
from workflows.lifecycle_options import (
    ACTION_HEARTBEAT,
    ACTION_TIMEOUT,
    GRACEFUL_CHECK_SECONDS,
    PREPARE_RETRY,
    QUICK_RETRY,
    TEARDOWN_RETRY_AFTER_SECONDS,
    raise_if_cancelled,
)
from workflows.models import (
    Deployment,
    DeploymentSpecification,
    DrainInput,
    DrainResult,
    EnsureInstancesInput,
    FunctionStatus,
    HealthInfo,
    InstanceRecord,
    InstanceStatus,
    ObserveInput,
    PrepareInput,
    PrepareResult,
    TeardownInput,
)
from workflows.version_watching import VersionWatching


class VersionSteps(VersionWatching):
    """The reconcile and removal steps of the main loop."""

    _drain_busy: bool

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
            raise_if_cancelled(err)
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
                raise_if_cancelled(err)
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
                    raise_if_cancelled(err)
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
                raise_if_cancelled(err)
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
