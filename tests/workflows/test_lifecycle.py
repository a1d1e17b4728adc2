"""The function-version workflow in time-skipping: deadlines, backoff, drains, idle timers, worker restarts
and activity faults, each in about a second of wall time or less.

Continue-as-new is covered on the real dev server (`tests/lifecycle/test_history.py`): in the Java test
server the new run's first task was never answered (queries timed out), with or without sticky workers.

The workflow is the real one; the activities are fakes under the real names (see `harness.py`), because
the real ones start processes and read gateways.
"""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from gpufn.autoscaling import AutoscalerSettings
from tests.workflows.harness import Lifecycle, deploy_request, deployment_spec
from workflows import errors
from workflows.function_version import ANSWER_WITHIN, FunctionVersionWorkflow
from workflows.models import (
    DeleteRequest,
    FunctionStatus,
    InstanceStatus,
    UndeployRequest,
    VersionState,
)


def running(state: VersionState) -> list[str]:
    return [i.instanceId for i in state.instances if i.status == InstanceStatus.RUNNING]


async def deployed(lifecycle: Lifecycle, **request: float | None) -> VersionState:
    """Register and deploy a version; return its state once the update answered."""
    await lifecycle.start()
    assert lifecycle.handle is not None
    view = await lifecycle.handle.execute_update(FunctionVersionWorkflow.deploy, deploy_request(**request))
    return view.state


async def test_deploy_timeout_ends_in_error_after_the_configured_time(lifecycle: Lifecycle) -> None:
    """Instances that never pass their health check: ERROR after the configured deadline, not 900 s."""
    lifecycle.cluster.start_status = InstanceStatus.STARTING
    async with lifecycle.worker():
        state = await deployed(lifecycle, timeout_seconds=30)
        assert state.status == FunctionStatus.DEPLOYING
        assert state.deployment is not None and state.deployment.deployTimeoutSeconds == 30
        await lifecycle.until(lambda s: len(s.instances) == 1)
        await lifecycle.skip(25)
        assert (await lifecycle.state()).status == FunctionStatus.DEPLOYING
        await lifecycle.record("deploying_health_check_pending")
        await lifecycle.skip(10)
        failed = await lifecycle.until(lambda s: s.status == FunctionStatus.ERROR)
        assert any("within 30 s" in h.error for h in failed.healthInfo), failed.healthInfo
        # An ERROR deployment keeps nothing running.
        await lifecycle.until(lambda s: s.instances == [] and not lifecycle.cluster.instances)


async def test_deploy_deadline_fires_while_an_activity_hangs(lifecycle: Lifecycle) -> None:
    """A backend call that never returns cannot hold the deadline back: it is cancelled at the deadline."""
    lifecycle.cluster.ensure_hangs = True
    async with lifecycle.worker():
        await deployed(lifecycle, timeout_seconds=20)
        await lifecycle.until(lambda s: "ensure_instances" in lifecycle.cluster.calls)
        await lifecycle.skip(25)
        failed = await lifecycle.until(lambda s: s.status == FunctionStatus.ERROR)
        assert failed.healthInfo and "20 s" in failed.healthInfo[0].error
        await lifecycle.until(lambda s: "ensure_instances" in lifecycle.cluster.cancelled)


async def test_heal_after_instance_loss_backs_off(lifecycle: Lifecycle) -> None:
    """A lost instance is replaced after 1 s, a replacement that fails again after 2 s, and so on."""
    cluster = lifecycle.cluster
    async with lifecycle.worker():
        await deployed(lifecycle)
        state = await lifecycle.until(lambda s: s.status == FunctionStatus.ACTIVE)
        first = running(state)[0]
        cluster.start_status = InstanceStatus.ERRORED
        cluster.lose(first)
        lost = await lifecycle.until(lambda s: s.status == FunctionStatus.DEGRADED)
        assert lost.failures[0].consecutive == 1
        await lifecycle.until(lambda s: not cluster.instances)
        await lifecycle.skip(1.5)
        # The replacement failed too: the next try waits 2 s.
        second = await lifecycle.until(lambda s: s.failures[0].consecutive == 2)
        assert second.failures[0].retryNotBefore is not None
        cluster.start_status = InstanceStatus.RUNNING
        await lifecycle.skip(1)
        assert (await lifecycle.state()).failures[0].consecutive == 2
        assert not running(await lifecycle.state())
        await lifecycle.skip(1.5)
        healed = await lifecycle.until(lambda s: s.status == FunctionStatus.ACTIVE)
        assert len(running(healed)) == 1 and first not in running(healed)
        assert healed.failures[0].consecutive == 0


async def test_graceful_undeploy_with_nothing_queued_completes_within_the_call(lifecycle: Lifecycle) -> None:
    """NGC SDK `restart()`: graceful undeploy, then at once the same deploy."""
    async with lifecycle.worker():
        await deployed(lifecycle)
        await lifecycle.until(lambda s: s.status == FunctionStatus.ACTIVE)
        assert lifecycle.handle is not None
        view = await lifecycle.handle.execute_update(
            FunctionVersionWorkflow.undeploy, UndeployRequest(graceful=True)
        )
        assert view.state.status == FunctionStatus.INACTIVE and view.state.deployment is None
        assert lifecycle.cluster.calls[-2:] == ["wait_drained", "teardown"]
        again = await lifecycle.handle.execute_update(FunctionVersionWorkflow.deploy, deploy_request())
        assert again.state.status == FunctionStatus.DEPLOYING
        await lifecycle.until(lambda s: s.status == FunctionStatus.ACTIVE)


async def test_graceful_undeploy_drains_pending_work_before_removing(lifecycle: Lifecycle) -> None:
    """With requests queued: the undeploy answers at once, a deploy is refused until the drain ends."""
    cluster = lifecycle.cluster
    async with lifecycle.worker():
        await deployed(lifecycle)
        await lifecycle.until(lambda s: s.status == FunctionStatus.ACTIVE)
        assert lifecycle.handle is not None
        cluster.queued = 2
        view = await lifecycle.handle.execute_update(
            FunctionVersionWorkflow.undeploy, UndeployRequest(graceful=True)
        )
        assert view.state.status == FunctionStatus.INACTIVE
        assert view.state.deployment is not None and view.state.deployment.draining
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await lifecycle.handle.execute_update(FunctionVersionWorkflow.deploy, deploy_request())
        assert isinstance(refused.value.cause, ApplicationError)
        assert refused.value.cause.type == errors.DEPLOYMENT_FINISHING
        assert refused.value.cause.message == "Wait for current deployment to be gracefully completed."
        assert cluster.instances, "removed before the queue drained"
        await lifecycle.record("graceful_undeploy_draining")
        cluster.queued = 0
        await lifecycle.until(lambda s: s.deployment is None and not cluster.instances)
        assert cluster.calls[-1] == "teardown"


async def test_scale_to_zero_after_the_idle_timeout(lifecycle: Lifecycle) -> None:
    """minInstances 0: load starts an instance; after scaleToZeroIdleSeconds without load it goes."""
    cluster = lifecycle.cluster
    settings = AutoscalerSettings(scaleToZeroIdleSeconds=40)
    async with lifecycle.worker():
        await lifecycle.start()
        assert lifecycle.handle is not None
        spec = deployment_spec(0, 1, autoscaler=settings)
        view = await lifecycle.handle.execute_update(FunctionVersionWorkflow.deploy, deploy_request(spec))
        assert view.state.status == FunctionStatus.ACTIVE and view.state.instances == []
        cluster.load = 1.0
        await lifecycle.until(lambda s: len(running(s)) == 1)
        cluster.load = 0.0
        await lifecycle.skip(20)
        assert len(running(await lifecycle.state())) == 1
        await lifecycle.skip(30)
        idle = await lifecycle.until(lambda s: s.instances == [] and not cluster.instances)
        assert idle.status == FunctionStatus.ACTIVE
        assert idle.scaling.lastDecision is not None and idle.scaling.lastDecision.desired == 0
        await lifecycle.record("scaled_to_zero_after_idle")


async def test_worker_restart_mid_deploy_continues_the_deployment(lifecycle: Lifecycle) -> None:
    """A worker that stops while an instance is being started: the next worker finishes the deploy."""
    cluster = lifecycle.cluster
    cluster.ensure_hangs = True
    async with lifecycle.worker(sticky=False):
        await deployed(lifecycle)
        await lifecycle.until(lambda s: "ensure_instances" in cluster.calls, wall_seconds=15)
    cluster.ensure_hangs = False
    async with lifecycle.worker():
        # The stopped worker's call is retried once its heartbeat timeout (10 s) passed; the new worker
        # replays the history (nothing cached) and carries on.
        active = await lifecycle.until_skipping(lambda s: s.status == FunctionStatus.ACTIVE, seconds=60)
        assert len(running(active)) == 1


async def test_permanent_fault_ends_the_deploy_in_error_at_once(lifecycle: Lifecycle) -> None:
    """`containerArgs: "python 'unterminated"`: no retry, ERROR with the cause in healthInfo."""
    lifecycle.cluster.ensure_fault = ValueError("No closing quotation")
    async with lifecycle.worker():
        await deployed(lifecycle)
        failed = await lifecycle.until(lambda s: s.status == FunctionStatus.ERROR)
        assert "No closing quotation" in failed.healthInfo[0].error
        assert "ensure_instances" in failed.healthInfo[0].error
        assert lifecycle.cluster.calls.count("ensure_instances") == 1


async def test_transient_fault_retries_on_a_bounded_schedule(lifecycle: Lifecycle) -> None:
    """A connection error is retried 8 times, then shown in healthInfo; the deadline still decides."""
    cluster = lifecycle.cluster
    cluster.ensure_fault = ConnectionError("connection refused")
    async with lifecycle.worker():
        await deployed(lifecycle, timeout_seconds=120)
        await lifecycle.skip(50)
        shown = await lifecycle.until(lambda s: bool(s.healthInfo))
        assert "connection refused" in shown.healthInfo[0].error
        assert shown.status == FunctionStatus.DEPLOYING
        # Attempts 1 to 8, then the workflow's own heal backoff starts a new call (attempt 1 again).
        assert max(cluster.attempts) == 8 and cluster.attempts[:8] == list(range(1, 9))
        await lifecycle.skip(80)
        await lifecycle.until(lambda s: s.status == FunctionStatus.ERROR)


@pytest.mark.parametrize("request_kind", ["undeploy", "delete"])
async def test_undeploy_or_delete_during_a_hung_activity_answers_quickly(
    lifecycle: Lifecycle, request_kind: str
) -> None:
    """The running backend call is cancelled; the answer comes at once and the removal completes."""
    cluster = lifecycle.cluster
    cluster.ensure_hangs = True
    async with lifecycle.worker():
        await deployed(lifecycle)
        await lifecycle.until(lambda s: "ensure_instances" in cluster.calls)
        assert lifecycle.handle is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        if request_kind == "undeploy":
            view = await lifecycle.handle.execute_update(FunctionVersionWorkflow.undeploy, UndeployRequest())
            assert view.state.status == FunctionStatus.INACTIVE
        else:
            view = await lifecycle.handle.execute_update(FunctionVersionWorkflow.delete, DeleteRequest())
            assert view.state.status == FunctionStatus.DELETED
        assert loop.time() - started < ANSWER_WITHIN.total_seconds()
        assert "ensure_instances" in cluster.cancelled
        assert view.state.deployment is None, "the teardown should finish within the call"
        assert cluster.calls[-1] == "teardown"
        if request_kind == "delete":
            await lifecycle.handle.result()


async def test_a_real_deploy_timeout_still_ends_in_error_while_the_platform_runs(
    lifecycle: Lifecycle,
) -> None:
    """Instances that never pass their health check, deadline longer than the workflow's re-check timer:
    ERROR after the configured 150 s (the re-checks are not mistaken for a stopped platform)."""
    lifecycle.cluster.start_status = InstanceStatus.STARTING
    async with lifecycle.worker():
        await deployed(lifecycle, timeout_seconds=150)
        await lifecycle.until(lambda s: len(s.instances) == 1)
        await lifecycle.skip(140)
        deploying = await lifecycle.state()
        assert deploying.status == FunctionStatus.DEPLOYING
        assert deploying.deployment is not None and deploying.deployment.deployPausedSeconds == 0
        await lifecycle.skip(15)
        failed = await lifecycle.until(lambda s: s.status == FunctionStatus.ERROR)
        assert any("within 150 s" in h.error for h in failed.healthInfo), failed.healthInfo
        assert not any("platform was stopped" in h.error for h in failed.healthInfo), failed.healthInfo
