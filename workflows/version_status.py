"""Part of the version workflow: what it makes of observations (failures, status, healthInfo, scaling
targets) and what it publishes to visibility (search attributes and memo).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate

from gpufn.autoscaling import AutoscalerSettings, ScalingDecision
from workflows import reconcile
from workflows import search_attributes as sa
from workflows.lifecycle_options import (
    ACTION_RETRY,
    FAILURES_BEFORE_HEALTH_INFO,
    LEGACY_WATCH_MAX_WAIT_SECONDS,
    LIFECYCLE_STEPS_PATCH,
    QUICK_RETRY,
    spec_failure_text,
)
from workflows.models import (
    Deployment,
    DeploymentSpecification,
    FunctionStatus,
    HealthInfo,
    InstanceRecord,
    InstanceStatus,
    SpecFailures,
    VersionRef,
    VersionState,
    WatchLoadInput,
)
from workflows.routes import route_memo, summary_memo


class VersionStatusKeeper:
    """The version's state and what follows from it; no activity is called here."""

    _state: VersionState
    _published: tuple[Any, ...] | None
    _steps: bool | None

    def _uses_steps(self) -> bool:
        """Return whether this run uses cancellable steps (`LIFECYCLE_STEPS_PATCH`), decided once."""
        if self._steps is None:
            self._steps = workflow.patched(LIFECYCLE_STEPS_PATCH)
        return self._steps

    def _retry(self) -> RetryPolicy:
        return ACTION_RETRY if self._uses_steps() else QUICK_RETRY

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
                failures.lastError = spec_failure_text(spec, instance)
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
            past_deadline = workflow.now() >= deployment.deploy_deadline()
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
                if deployment.deployPausedSeconds:
                    paused = deployment.deployPausedSeconds
                    failures.lastError += f" (not counting {paused:.0f} s while the platform was stopped)"
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

    def _record_decision(self, decision: ScalingDecision) -> None:
        self._state.scaling.lastDecision = decision
        self._state.scaling.decidedAt = workflow.now()
        self._state.scaling.desired = decision.desired
