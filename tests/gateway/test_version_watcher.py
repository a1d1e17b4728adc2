"""The version watcher (`watch_version`) as an activity, reading a real gateway's load over HTTP.

Its backend is an in-test stand-in whose version has no instances and never changes: these tests are
about the load side, the hand-over between watchers and shutdown; the lifecycle and autoscaling
suites run the watcher with real backends inside real workflows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import timedelta
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.backend import BackendActivities
from activities.gateway import LoadMonitor
from activities.watcher import WatchActivities
from gpufn.autoscaling import AutoscalerSettings, AutoscalerState
from tests.gateway.helpers import Served, free_port, route, serve_gateway, uid
from tests.gateway.test_queue import submit
from workflows.models import (
    AutoscalingWatch,
    DeploymentSpecification,
    EnsureInstancesInput,
    InstanceRecord,
    PrepareInput,
    PrepareResult,
    VersionRef,
    WatchInput,
    WatchResult,
)


class StillBackend:
    """A backend whose versions have no instances and never change; counts how often it is asked."""

    def __init__(self) -> None:
        self.observed = 0

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        raise NotImplementedError

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        raise NotImplementedError

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        self.observed += 1
        return []

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        await asyncio.sleep(max_wait)

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        return None


def environment(workflow_id: str, beats: list[Any]) -> ActivityEnvironment:
    """An activity context like a watcher's, with a 1 s heartbeat timeout so it beats every 0.8 s."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info, workflow_id=workflow_id, heartbeat_timeout=timedelta(seconds=1), heartbeat_details=[]
    )
    env.on_heartbeat = lambda *details: beats.append(details)
    return env


def watch(version_id: str, *, current: int, minimum: int, maximum: int) -> WatchInput:
    spec = DeploymentSpecification(
        gpu="CPU", instanceType="LOCAL.CPU", minInstances=minimum, maxInstances=maximum
    )
    return WatchInput(
        ref=VersionRef(accountId="acct", functionId="fn", versionId=version_id),
        specs=[spec],
        autoscaling=AutoscalingWatch(
            maxRequestConcurrency=4,
            minInstances=minimum,
            maxInstances=maximum,
            current=current,
            ready=current,
            settings=AutoscalerSettings(
                stableWindowSeconds=10, panicWindowSeconds=2, scaleDownDelaySeconds=2
            ),
        ),
    )


@pytest.fixture
async def watched(echo_urls: list[str]) -> Any:
    async with serve_gateway() as gw:
        monitor = LoadMonitor([gw.url], "key-admin")
        backend = StillBackend()
        try:
            yield gw, monitor, backend, WatchActivities(BackendActivities({"local": backend}), monitor)
        finally:
            await monitor.close()


async def test_a_newer_watcher_takes_over_the_older_ones_history(
    watched: tuple[Served, LoadMonitor, StillBackend, WatchActivities], echo_urls: list[str]
) -> None:
    gw, _, _, activities = watched
    version, function = uid("ver"), uid()
    gw.apply(route(version, echo_urls[:1], function_id=function, concurrency=4))
    request = watch(version, current=1, minimum=1, maximum=1)
    older = asyncio.create_task(environment("wf-1", []).run(activities.watch_version, request))
    await submit(gw, function, {"delaySeconds": 3})
    await submit(gw, function, {"delaySeconds": 3})
    await asyncio.sleep(1.5)

    beats: list[Any] = []
    beaten = asyncio.Event()
    newer_env = environment("wf-1", beats)

    def beat(*details: Any) -> None:
        beats.append(details)
        beaten.set()

    newer_env.on_heartbeat = beat
    handed_over_at = time.time()
    newer = asyncio.create_task(newer_env.run(activities.watch_version, request))
    # The older watcher ends at once, with nothing to report (the workflow no longer waits on it).
    assert await asyncio.wait_for(older, timeout=2) == WatchResult()
    await asyncio.wait_for(beaten.wait(), timeout=5)
    state = AutoscalerState.model_validate(beats[0][0])
    # The newer watcher's first heartbeat already holds the load the older one saw before it started.
    assert state.firstRecordAt is not None and state.firstRecordAt < handed_over_at - 1
    assert any(second < handed_over_at - 1 and load > 0 for second, load, _ in state.buckets)
    newer_env.cancel()
    with pytest.raises(BaseException):  # noqa: B017 - cancelled, as the workflow cancels it
        await newer


async def test_a_watcher_fails_retryably_when_its_worker_shuts_down(
    watched: tuple[Served, LoadMonitor, StillBackend, WatchActivities], echo_urls: list[str]
) -> None:
    gw, _, _, activities = watched
    version = uid("ver")
    gw.apply(route(version, echo_urls[:1], function_id=uid()))
    env = environment("wf-2", [])
    running = asyncio.create_task(
        env.run(activities.watch_version, watch(version, current=1, minimum=1, maximum=2))
    )
    await asyncio.sleep(1)
    env.worker_shutdown()
    env.cancel()
    with pytest.raises(ApplicationError) as failure:
        await running
    assert failure.value.type == "WorkerShutdown" and not failure.value.non_retryable


async def test_without_a_gateway_the_watcher_decides_nothing_and_sleeps(echo_urls: list[str]) -> None:
    """No data is not zero load: a version with instances is not scaled in while no gateway answers."""
    monitor = LoadMonitor([f"http://127.0.0.1:{free_port()}"], "key-admin")
    backend = StillBackend()
    activities = WatchActivities(BackendActivities({"local": backend}), monitor)
    try:
        running = asyncio.create_task(
            environment("wf-3", []).run(
                activities.watch_version, watch(uid("ver"), current=2, minimum=0, maximum=4)
            )
        )
        done, _ = await asyncio.wait([running], timeout=4)
        assert not done, running.result()
        # Woken by its heartbeats (every 0.8 s here), not by every load poll (0.5 s) or in a loop.
        assert backend.observed <= 8, backend.observed
        running.cancel()
    finally:
        await monitor.close()
