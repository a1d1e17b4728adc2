"""Operating a deployment: scaling by PUT, degraded states, worker crashes, operator signals, bad specs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from typing import Any

import pytest
from temporalio.client import WorkflowHistory

from gpufn.stack import temporal_cli
from tests.conftest import Stack, cpu_spec, echo_function, eventually
from tests.lifecycle.helpers import (
    create,
    deployment,
    deployment_path,
    instance_records,
    wait_running,
    wait_status,
    workflow_id,
)
from workflows.function_version import FunctionVersionWorkflow
from workflows.models import DrainInstanceSignal, ManualInstancesSignal, ReconcileSignal


def live_pids(records: list[dict[str, Any]]) -> list[int]:
    pids = []
    for record in records:
        pid = record.get("pid")
        if (
            pid
            and os.path.exists(f"/proc/{pid}")
            and "Z" not in open(f"/proc/{pid}/stat").read().split(")")[-1][:3]
        ):
            pids.append(pid)
    return pids


async def test_put_changes_min_and_max(stack: Stack) -> None:
    function = await create(stack, echo_function("put-scale"))
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    await wait_running(stack, function, 1)
    response = await stack.http.put(deployment_path(function), json=cpu_spec(2, 3, maxRequestConcurrency=4))
    assert response.status_code == 200, response.text
    spec = response.json()["deployment"]["deploymentSpecifications"][0]
    assert (spec["minInstances"], spec["maxInstances"], spec["maxRequestConcurrency"]) == (2, 3, 4)
    await wait_running(stack, function, 2)
    response = await stack.http.put(deployment_path(function), json=cpu_spec(1, 1))
    assert response.status_code == 200, response.text
    body = await wait_running(stack, function, 1)
    assert body["functionStatus"] == "ACTIVE"
    assert len(live_pids(instance_records(stack, function))) == 1


async def test_losing_one_of_two_instances_is_degrading(stack: Stack) -> None:
    function = await create(stack, echo_function("degrading"))
    await stack.http.post(deployment_path(function), json=cpu_spec(2, 2))
    body = await wait_running(stack, function, 2)
    victim = body["instances"][0]["instanceId"]
    [record] = [r for r in instance_records(stack, function) if r["instanceId"] == victim]
    seen: list[str] = []

    async def healed() -> bool:
        current = await deployment(stack, function)
        seen.append(current["functionStatus"])
        ids = {i["instanceId"] for i in current["instances"] if i["status"] == "RUNNING"}
        return current["functionStatus"] == "ACTIVE" and len(ids) == 2 and victim not in ids

    os.killpg(record["pid"], signal.SIGKILL)
    await eventually(healed, timeout=30, interval=0.05)
    assert "DEGRADING" in seen and "DEGRADED" not in seen, seen


async def test_worker_killed_during_deploy_resumes_with_exactly_min_instances(stack: Stack) -> None:
    body = echo_function("worker-crash", containerEnvironment=[{"key": "ECHO_START_SECONDS", "value": "2"}])
    function = await create(stack, body)
    response = await stack.http.post(deployment_path(function), json=cpu_spec(3, 3))
    assert response.status_code == 200
    await eventually(lambda: asyncio.sleep(0, result=len(instance_records(stack, function)) >= 1), timeout=10)
    stack.kill_worker()
    await asyncio.sleep(1)
    stack.restart_worker()
    await wait_running(stack, function, 3, timeout=60)
    records = instance_records(stack, function)
    assert len(records) == 3
    assert len(live_pids(records)) == 3


async def test_instances_survive_a_worker_crash(stack: Stack) -> None:
    function = await create(stack, echo_function("survives"))
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    before = await wait_running(stack, function, 1)
    stack.kill_worker()
    stack.restart_worker()
    await asyncio.sleep(3)
    after = await wait_running(stack, function, 1)
    assert after["instances"][0]["instanceId"] == before["instances"][0]["instanceId"]
    assert after["functionStatus"] == "ACTIVE"


async def test_signals_manual_count_drain_and_reconcile(stack: Stack) -> None:
    function = await create(stack, echo_function("signals"))
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 3))
    body = await wait_running(stack, function, 1)
    handle = stack.client.get_workflow_handle(workflow_id(function))

    await handle.signal(FunctionVersionWorkflow.set_manual_instances, ManualInstancesSignal(count=3))
    body = await wait_running(stack, function, 3)
    assert body["scaling"]["manualInstances"] == 3

    victim = body["instances"][0]["instanceId"]
    await handle.signal(FunctionVersionWorkflow.drain_instance, DrainInstanceSignal(instanceId=victim))

    async def replaced() -> bool:
        current = await deployment(stack, function)
        ids = {i["instanceId"] for i in current["instances"] if i["status"] == "RUNNING"}
        return len(ids) == 3 and victim not in ids

    await eventually(replaced, timeout=90)

    await handle.signal(FunctionVersionWorkflow.set_manual_instances, ManualInstancesSignal(count=None))
    await handle.signal(FunctionVersionWorkflow.reconcile_now, ReconcileSignal())
    body = await deployment(stack, function)
    view = await handle.query(FunctionVersionWorkflow.describe)
    assert view.state.scaling.manualInstances is None
    # Each instance has its own address: a loopback one, or its network namespace's when isolated.
    addresses = [i.address for i in view.state.instances]
    assert all(a and a.startswith(("http://127.", "http://10.")) for a in addresses)
    assert len(set(addresses)) == len(addresses)


async def test_signal_from_the_temporal_cli(stack: Stack) -> None:
    function = await create(stack, echo_function("cli-signal"))
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 2))
    await wait_running(stack, function, 1)
    result = subprocess.run(
        [
            temporal_cli(),
            "workflow",
            "signal",
            "--address",
            stack.settings.temporal_target,
            "--workflow-id",
            workflow_id(function),
            "--name",
            "set_manual_instances",
            "--input",
            json.dumps({"count": 2}),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    await wait_running(stack, function, 2)
    query = subprocess.run(
        [
            temporal_cli(),
            "workflow",
            "query",
            "--address",
            stack.settings.temporal_target,
            "--workflow-id",
            workflow_id(function),
            "--type",
            "describe",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "RUNNING" in query.stdout and "manualInstances" in query.stdout


async def test_reconcile_signal_reobserves_now(stack: Stack) -> None:
    function = await create(stack, echo_function("reconcile"))
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    await wait_running(stack, function, 1)
    handle = stack.client.get_workflow_handle(workflow_id(function))
    before = len((await handle.fetch_history()).events)
    await handle.signal(FunctionVersionWorkflow.reconcile_now, ReconcileSignal())

    async def observed_again() -> bool:
        history: WorkflowHistory = await handle.fetch_history()
        names = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events[before:]
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
        return "observe_instances" in names

    await eventually(observed_again, timeout=10)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"gpu": "CPU", "instanceType": "LOCAL.CPU", "minInstances": 3, "maxInstances": 2}, "minInstances"),
        ({"gpu": "CPU", "instanceType": "LOCAL.CPU", "minInstances": 0, "maxInstances": 0}, "maxInstances"),
        ({"gpu": "CPU", "instanceType": "LOCAL.CPU", "minInstances": -1, "maxInstances": 1}, "minInstances"),
        ({"gpu": "B300", "instanceType": "LOCAL.CPU", "minInstances": 1, "maxInstances": 1}, "GPU"),
        (
            {"gpu": "CPU", "instanceType": "NCP.GPU.H100_1x", "minInstances": 1, "maxInstances": 1},
            "InstanceType",
        ),
        (
            {
                "gpu": "CPU",
                "instanceType": "LOCAL.CPU",
                "minInstances": 1,
                "maxInstances": 1,
                "backend": "local",
                "clusters": ["local"],
            },
            "clusters",
        ),
        (
            {
                "gpu": "CPU",
                "instanceType": "LOCAL.CPU",
                "minInstances": 1,
                "maxInstances": 1,
                "configuration": {"replicas": 2},
            },
            "configuration",
        ),
        (
            {
                "gpu": "CPU",
                "instanceType": "LOCAL.CPU",
                "minInstances": 1,
                "maxInstances": 1,
                "maxRequestConcurrency": 0,
            },
            "maxRequestConcurrency",
        ),
        ({"gpu": "CPU", "minInstances": 1, "maxInstances": 1}, "instanceType"),
    ],
)
async def test_invalid_deployment_specs_are_rejected(
    stack: Stack, spec: dict[str, Any], fragment: str
) -> None:
    function = await create(stack, echo_function("invalid-spec"))
    response = await stack.http.post(deployment_path(function), json={"deploymentSpecifications": [spec]})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert fragment in response.json()["detail"]
    follow = await stack.http.get(f"/v2/nvcf/functions/{function['id']}/versions/{function['versionId']}")
    assert follow.json()["function"]["status"] == "INACTIVE"


async def test_state_rules_of_deployment_operations(stack: Stack) -> None:
    function = await create(stack, echo_function("state-rules"))
    response = await stack.http.put(deployment_path(function), json=cpu_spec(1, 1))
    assert response.status_code == 400
    response = await stack.http.delete(deployment_path(function))
    assert response.status_code == 404
    response = await stack.http.post(deployment_path(function), json={"deploymentSpecifications": []})
    assert response.status_code == 400
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    again = await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    assert again.status_code == 400
    assert "PUT" in again.json()["detail"]
    other_gpu = await stack.http.put(
        deployment_path(function),
        json={
            "deploymentSpecifications": [
                {"gpu": "H100", "instanceType": "x", "minInstances": 1, "maxInstances": 1}
            ]
        },
    )
    assert other_gpu.status_code == 400


async def test_all_min_zero_goes_straight_to_active(stack: Stack) -> None:
    function = await create(stack, echo_function("min-zero"))
    response = await stack.http.post(deployment_path(function), json=cpu_spec(0, 2))
    assert response.json()["deployment"]["functionStatus"] == "ACTIVE"
    body = await deployment(stack, function)
    assert body["functionStatus"] == "ACTIVE" and body["instances"] == []


async def test_error_deployment_must_be_deleted_before_redeploy(stack: Stack) -> None:
    function = await create(stack, echo_function("error-redeploy", containerArgs="false"))
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    await wait_status(stack, function, "ERROR")
    again = await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    assert again.status_code == 400
    assert "errors" in again.json()["detail"]
    removed = await stack.http.delete(deployment_path(function))
    assert removed.json()["function"]["status"] == "INACTIVE"


async def test_graceful_undeploy_lets_running_requests_finish(stack: Stack) -> None:
    body = echo_function("graceful")
    function = await create(stack, body)
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1, maxRequestConcurrency=2))
    await wait_running(stack, function, 1)
    invoke = f"/v2/nvcf/pexec/functions/{function['id']}/versions/{function['versionId']}"
    running = asyncio.create_task(
        stack.http.post(invoke, json={"delaySeconds": 3, "done": True}, headers={"NVCF-POLL-SECONDS": "30"})
    )
    await asyncio.sleep(0.5)
    undeployed = await stack.http.delete(deployment_path(function) + "?graceful=true")
    assert undeployed.status_code == 200, undeployed.text
    assert undeployed.json()["function"]["status"] == "INACTIVE"
    refused = await stack.http.post(invoke, json={"late": True}, headers={"NVCF-POLL-SECONDS": "1"})
    assert refused.status_code == 404
    redeploy = await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    assert redeploy.status_code == 400 and "gracefully" in redeploy.json()["detail"]
    answer = await running
    assert answer.status_code == 200 and answer.json() == {"delaySeconds": 3, "done": True}

    async def torn_down() -> bool:
        gone = (await stack.http.get(deployment_path(function))).status_code == 404
        return gone and not instance_records(stack, function)

    await eventually(torn_down, timeout=30)
    again = await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    assert again.status_code == 200, again.text


async def test_deploy_sent_while_the_worker_is_down_completes_when_it_returns(stack: Stack) -> None:
    function = await create(stack, echo_function("worker-down"))
    stack.kill_worker()
    try:
        pending = asyncio.create_task(stack.http.post(deployment_path(function), json=cpu_spec(1, 1)))
        await asyncio.sleep(2)
        assert not pending.done()
    finally:
        stack.restart_worker()
    response = await pending
    assert response.status_code == 200, response.text
    await wait_running(stack, function, 1, timeout=60)


async def test_rate_limit_set_enforced_and_lifted(stack: Stack) -> None:
    """PUT /ratelimit reaches the gateway in a second; over the limit is a 429 problem; DELETE lifts it."""
    function = await create(stack, echo_function("rate-limited"))
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    await wait_running(stack, function, 1)
    limit_path = f"/v2/nvcf/ratelimit/functions/{function['id']}/versions/{function['versionId']}"
    set_limit = await stack.http.put(limit_path, json={"rateLimit": "2-M", "perUserRate": "5-M"})
    assert set_limit.status_code == 200, set_limit.text
    assert set_limit.json()["function"]["rateLimit"]["rateLimit"] == "2-M"
    invoke = f"/v2/nvcf/pexec/functions/{function['id']}"

    async def refused() -> bool:
        return (await stack.http.post(invoke, json={"n": 1})).status_code == 429

    await eventually(refused, timeout=10, interval=0.1)
    answer = await stack.http.post(invoke, json={"n": 2})
    assert answer.status_code == 429
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert int(answer.headers["retry-after"]) >= 1

    bad = await stack.http.put(limit_path, json={"rateLimit": "2 a minute"})
    assert bad.status_code == 400 and bad.headers["content-type"].startswith("application/problem+json")
    assert (await stack.http.delete(limit_path)).status_code == 204
    described = await stack.http.get(f"/v2/nvcf/functions/{function['id']}/versions/{function['versionId']}")
    assert described.json()["function"].get("rateLimit") is None

    async def admitted() -> bool:
        return (await stack.http.post(invoke, json={"n": 3})).status_code == 200

    await eventually(admitted, timeout=10, interval=0.1)
