"""Autoscaling end to end: real gateway load, the scaling loop in the workflow, real instances."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from temporalio.api.enums.v1 import PendingActivityState

from tests.conftest import Stack, echo_function, eventually
from tests.lifecycle.helpers import (
    create,
    deployment,
    deployment_path,
    instance_records,
    wait_running,
    workflow_id,
)
from workflows.models import WatchResult

FAST = {
    "stableWindowSeconds": 4,
    "panicWindowSeconds": 1,
    "scaleDownDelaySeconds": 2,
    "scaleToZeroIdleSeconds": 3,
    "drainTimeoutSeconds": 20,
    "targetUtilization": 1.0,
}


def spec(min_instances: int, max_instances: int, concurrency: int = 1, **autoscaler: Any) -> dict[str, Any]:
    return {
        "deploymentSpecifications": [
            {
                "gpu": "CPU",
                "instanceType": "LOCAL.CPU",
                "minInstances": min_instances,
                "maxInstances": max_instances,
                "maxRequestConcurrency": concurrency,
                "gpufnAutoscaler": {**FAST, **autoscaler},
            }
        ]
    }


class Load:
    """Closed-loop clients invoking a function through the gateway, counting every outcome."""

    def __init__(self, stack: Stack, function: dict[str, Any]) -> None:
        self.stack = stack
        self.path = f"/v2/nvcf/pexec/functions/{function['id']}"
        self.ok = 0
        self.failures: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def _loop(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(
            base_url=self.stack.api_url, headers=self.stack.headers(), timeout=120
        ) as http:
            while not stop.is_set():
                try:
                    response = await http.post(self.path, json={"n": 1}, headers={"NVCF-POLL-SECONDS": "60"})
                    while response.status_code == 202:
                        response = await http.get(
                            f"/v2/nvcf/pexec/status/{response.headers['NVCF-REQID']}",
                            headers={"NVCF-POLL-SECONDS": "60"},
                        )
                    if response.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{response.status_code} {response.text[:300]}")
                except httpx.HTTPError as err:
                    self.failures.append(repr(err))

    def start(self, clients: int) -> asyncio.Event:
        stop = asyncio.Event()
        self.tasks += [asyncio.create_task(self._loop(stop)) for _ in range(clients)]
        return stop

    async def stop(self, stop: asyncio.Event) -> None:
        stop.set()
        await asyncio.gather(*self.tasks)
        self.tasks = []


def slow_echo(name: str, request_ms: int = 300, start_seconds: float = 0) -> dict[str, Any]:
    return echo_function(
        name,
        containerEnvironment=[
            {"key": "ECHO_DELAY_MS", "value": str(request_ms)},
            {"key": "ECHO_START_SECONDS", "value": str(start_seconds)},
        ],
    )


async def running_count(stack: Stack, function: dict[str, Any]) -> int:
    body = await deployment(stack, function)
    return sum(1 for i in body["instances"] if i["status"] == "RUNNING")


async def test_scales_up_under_load_and_down_without_losing_requests(stack: Stack) -> None:
    function = await create(stack, slow_echo("scale-up-down"))
    await stack.http.post(deployment_path(function), json=spec(1, 4))
    await wait_running(stack, function, 1)
    load = Load(stack, function)
    heavy = load.start(6)
    await eventually(lambda: _at_least(stack, function, 3), timeout=30)
    body = await deployment(stack, function)
    decision = body["scaling"]["lastDecision"]
    assert decision["desired"] >= 3 and decision["rule"] in ("panic", "stable", "bounds"), decision
    assert "load" in decision["reason"]
    await load.stop(heavy)
    light = load.start(1)
    await eventually(lambda: _at_most(stack, function, 2), timeout=40)
    await load.stop(light)
    assert load.failures == [], load.failures[:5]
    assert load.ok > 20
    # Every decision is in the history (what the Web UI shows): a watcher's result carrying it.
    history = await stack.client.get_workflow_handle(workflow_id(function)).fetch_history()
    watchers = {
        e.event_id
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == "watch_version"
    }
    decisions = []
    for event in history.events:
        completed = event.activity_task_completed_event_attributes
        if (
            event.HasField("activity_task_completed_event_attributes")
            and completed.scheduled_event_id in watchers
        ):
            payloads = completed.result.payloads
            (result,) = await stack.client.data_converter.decode(payloads, [WatchResult])
            if isinstance(result, WatchResult) and result.decision is not None:
                decisions.append(result.decision)
    assert any(d.desired >= 3 for d in decisions), decisions
    assert any(d.desired < d.current for d in decisions), decisions


async def _at_least(stack: Stack, function: dict[str, Any], count: int) -> bool:
    return await running_count(stack, function) >= count


async def _at_most(stack: Stack, function: dict[str, Any], count: int) -> bool:
    body = await deployment(stack, function)
    live = [i for i in body["instances"] if i["status"] in ("RUNNING", "STARTING")]
    return len(live) <= count and body["scaling"]["desired"] <= count


async def test_scales_to_zero_and_serves_the_next_request_from_cold(stack: Stack) -> None:
    function = await create(stack, slow_echo("to-zero", request_ms=10, start_seconds=1))
    response = await stack.http.post(deployment_path(function), json=spec(0, 2))
    assert response.json()["deployment"]["functionStatus"] == "ACTIVE"
    path = f"/v2/nvcf/pexec/functions/{function['id']}"
    first = await stack.http.post(path, json={"cold": 1}, headers={"NVCF-POLL-SECONDS": "0"})
    assert first.status_code == 202, first.text
    request_id = first.headers["NVCF-REQID"]
    answer = await stack.http.get(f"/v2/nvcf/pexec/status/{request_id}", headers={"NVCF-POLL-SECONDS": "30"})
    while answer.status_code == 202:
        answer = await stack.http.get(
            f"/v2/nvcf/pexec/status/{request_id}", headers={"NVCF-POLL-SECONDS": "30"}
        )
    assert answer.status_code == 200 and answer.json() == {"cold": 1}
    assert await running_count(stack, function) == 1

    async def at_zero() -> bool:
        body = await deployment(stack, function)
        return body["instances"] == [] and body["scaling"]["desired"] == 0

    await eventually(at_zero, timeout=30)
    body = await deployment(stack, function)
    assert body["functionStatus"] == "ACTIVE"
    assert body["scaling"]["lastDecision"]["rule"] == "scale-to-zero"
    again = await stack.http.post(path, json={"warm": 2}, headers={"NVCF-POLL-SECONDS": "30"})
    while again.status_code == 202:
        again = await stack.http.get(
            f"/v2/nvcf/pexec/status/{again.headers['NVCF-REQID']}", headers={"NVCF-POLL-SECONDS": "30"}
        )
    assert again.status_code == 200 and again.json() == {"warm": 2}


async def test_worker_restart_in_the_middle_of_a_scale_up(stack: Stack) -> None:
    function = await create(stack, slow_echo("restart-mid-scale", start_seconds=3))
    await stack.http.post(deployment_path(function), json=spec(1, 3))
    await wait_running(stack, function, 1, timeout=30)
    load = Load(stack, function)
    heavy = load.start(6)

    async def scaling_up() -> bool:
        return len(instance_records(stack, function)) >= 2

    await eventually(scaling_up, timeout=30, interval=0.05)
    stack.kill_worker()
    await asyncio.sleep(0.5)
    stack.restart_worker()
    await eventually(lambda: _at_least(stack, function, 3), timeout=60)
    await load.stop(heavy)
    records = instance_records(stack, function)
    assert len(records) == 3, records
    assert load.failures == [], load.failures[:5]


async def test_manual_override_wins_over_the_autoscaler(stack: Stack) -> None:
    from workflows.function_version import FunctionVersionWorkflow
    from workflows.models import ManualInstancesSignal

    function = await create(stack, slow_echo("manual-wins", request_ms=50))
    await stack.http.post(deployment_path(function), json=spec(1, 3))
    await wait_running(stack, function, 1)
    handle = stack.client.get_workflow_handle(workflow_id(function))
    await handle.signal(FunctionVersionWorkflow.set_manual_instances, ManualInstancesSignal(count=2))
    await wait_running(stack, function, 2)
    await asyncio.sleep(4)  # idle load: the autoscaler alone would go back to 1
    assert await running_count(stack, function) == 2
    await handle.signal(FunctionVersionWorkflow.set_manual_instances, ManualInstancesSignal(count=None))
    await wait_running(stack, function, 1, timeout=40)


async def test_gateway_exposes_per_version_metrics(stack: Stack) -> None:
    function = await create(stack, slow_echo("metrics", request_ms=2000))
    await stack.http.post(deployment_path(function), json=spec(1, 1, concurrency=1))
    await wait_running(stack, function, 1)
    path = f"/v2/nvcf/pexec/functions/{function['id']}"
    calls = [
        asyncio.create_task(stack.http.post(path, json={"n": n}, headers={"NVCF-POLL-SECONDS": "0"}))
        for n in range(3)
    ]
    await asyncio.gather(*calls)
    text = (await stack.http.get("/metrics")).text
    version = function["versionId"]
    assert f'gpufn_gateway_in_flight{{version_id="{version}"}} 1' in text
    assert f'gpufn_gateway_queue_depth{{version_id="{version}"}} 2' in text
    assert f'gpufn_gateway_ready_instances{{version_id="{version}"}} 1' in text
    forbidden = await stack.http.get("/metrics", headers={"Authorization": "Bearer nvapi-nobody"})
    assert forbidden.status_code == 401


async def test_a_worker_that_stops_hands_its_watchers_over_at_once(stack: Stack) -> None:
    """A gracefully stopped worker's watcher resumes on another worker in seconds, not after the 5-minute
    heartbeat timeout, and the version still scales from zero for the next request."""
    function = await create(stack, slow_echo("handover", request_ms=10))
    await stack.http.post(deployment_path(function), json=spec(0, 2))
    handle = stack.client.get_workflow_handle(workflow_id(function))

    async def running_watcher() -> tuple[str, str] | None:
        description = await handle.describe()
        for pending in description.raw_description.pending_activities:
            if (
                pending.activity_type.name == "watch_version"
                and pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
            ):
                return pending.activity_id, pending.last_worker_identity
        return None

    before = await eventually(running_watcher, timeout=15)
    first = stack.worker
    assert first is not None
    second = stack.start_worker()
    # The new worker re-attaches every deployed version when it starts, which restarts the watcher.
    await eventually(lambda: _watcher_other_than(running_watcher, before[0]), timeout=30, interval=0.2)
    watcher = await running_watcher()
    assert watcher is not None
    stopping, survivor = (first, second) if watcher[1].startswith(f"{first.pid}@") else (second, first)
    stopping.send_signal(signal.SIGTERM)
    assert stopping.wait(timeout=30) == 0
    stack.worker = survivor

    async def moved() -> bool:
        now = await running_watcher()
        return now is not None and now[1].startswith(f"{survivor.pid}@")

    await eventually(moved, timeout=15, interval=0.2)
    path = f"/v2/nvcf/pexec/functions/{function['id']}"
    answer = await stack.http.post(path, json={"after": 1}, headers={"NVCF-POLL-SECONDS": "30"})
    while answer.status_code == 202:
        answer = await stack.http.get(
            f"/v2/nvcf/pexec/status/{answer.headers['NVCF-REQID']}", headers={"NVCF-POLL-SECONDS": "30"}
        )
    assert answer.status_code == 200 and answer.json() == {"after": 1}


async def _watcher_other_than(
    running_watcher: Callable[[], Awaitable[tuple[str, str] | None]], activity_id: str
) -> bool:
    now = await running_watcher()
    return now is not None and now[0] != activity_id
