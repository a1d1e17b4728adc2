"""Deployment lifecycle on the local backend: real dev server, real worker process, real instances."""

from __future__ import annotations

import os
import signal

import httpx

from tests.conftest import Stack, cpu_spec, echo_function, eventually
from tests.lifecycle.helpers import create, deployment, deployment_path, wait_status


async def test_deploy_to_active_and_serve(stack: Stack) -> None:
    function = await create(stack, echo_function("deploy-active"))
    response = await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    assert response.status_code == 200, response.text
    assert response.json()["deployment"]["functionStatus"] == "DEPLOYING"
    body = await wait_status(stack, function, "ACTIVE")
    [instance] = body["instances"]
    assert instance["status"] == "RUNNING"
    async with httpx.AsyncClient() as client:
        answer = await client.post(instance["address"] + "/echo", json={"hello": "world"})
    assert answer.json() == {"hello": "world"}


async def test_command_that_exits_ends_in_error_with_its_output(stack: Stack) -> None:
    function = await create(
        stack,
        echo_function("exits-at-once", containerArgs="python -c \"print('model weights missing'); exit(3)\""),
    )
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    body = await wait_status(stack, function, "ERROR")
    [info] = body["healthInfo"]
    assert "exited with code 3" in info["error"]
    assert "model weights missing" in info["error"]
    assert info["gpu"] == "CPU" and info["instanceType"] == "LOCAL.CPU"


async def test_killed_instance_degrades_then_heals(stack: Stack) -> None:
    function = await create(stack, echo_function("heals"))
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    body = await wait_status(stack, function, "ACTIVE")
    [instance] = body["instances"]
    record = (stack.settings.home / "instances" / f"{instance['instanceId']}.json").read_text()
    import json

    os.killpg(json.loads(record)["pid"], signal.SIGKILL)
    seen: list[str] = []

    async def healed() -> bool:
        current = await deployment(stack, function)
        seen.append(current["functionStatus"])
        running = [i for i in current["instances"] if i["status"] == "RUNNING"]
        return (
            current["functionStatus"] == "ACTIVE"
            and bool(running)
            and running[0]["instanceId"] != instance["instanceId"]
        )

    await eventually(healed, timeout=30, interval=0.05)
    assert "DEGRADED" in seen, seen


async def test_undeploy_and_redeploy(stack: Stack) -> None:
    function = await create(stack, echo_function("redeploy"))
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    await wait_status(stack, function, "ACTIVE")
    response = await stack.http.delete(deployment_path(function))
    assert response.status_code == 200, response.text
    assert response.json()["function"]["status"] == "INACTIVE"
    assert not list((stack.settings.home / "instances").glob(f"{function['versionId'][:8]}-*.json"))
    response = await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    assert response.status_code == 200, response.text
    await wait_status(stack, function, "ACTIVE")


async def test_numpy_model_example_deploys_and_classifies(stack: Stack) -> None:
    body = echo_function(
        "iris-model",
        inferenceUrl="/infer",
        containerArgs="python examples/numpy_model/server.py",
        containerImage="example.com/iris:1.0",
    )
    function = await create(stack, body)
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    await wait_status(stack, function, "ACTIVE")
    answer = await stack.http.post(
        f"/v2/nvcf/pexec/functions/{function['id']}",
        json={"inputs": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]},
        headers={"NVCF-POLL-SECONDS": "30"},
    )
    assert answer.status_code == 200, answer.text
    assert [o["label"] for o in answer.json()["outputs"]] == ["setosa", "virginica"]
    bad = await stack.http.post(f"/v2/nvcf/pexec/functions/{function['id']}", json={"inputs": [[1, 2]]})
    assert bad.status_code == 400
    assert bad.headers["NVCF-STATUS"] == "errored"
    assert "bad input" in bad.json()["detail"]


async def test_a_command_that_exits_before_it_is_watched_still_fails_fast(stack: Stack) -> None:
    # `false` can exit before the supervisor reads its start time; its exit code must still count.
    function = await create(stack, echo_function("exits-instantly", containerArgs="false"))
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    body = await wait_status(stack, function, "ERROR", timeout=10)
    assert "exited with code 1" in body["healthInfo"][0]["error"]


async def test_a_deployment_is_read_and_patched_by_its_ids(stack: Stack) -> None:
    """NVCF's OSS forms: GET /deployments/{id} and PATCH of one GPU specification."""
    function = await create(stack, echo_function("by-deployment-id"))
    created = await stack.http.post(deployment_path(function), json=cpu_spec(0, 1, maxRequestConcurrency=2))
    assert created.status_code == 200, created.text
    deployment_id = created.json()["deployment"]["deploymentId"]
    spec_id = created.json()["deployment"]["deploymentSpecifications"][0]["gpuSpecificationId"]

    by_id = await stack.http.get(f"/v2/nvcf/deployments/{deployment_id}")
    assert by_id.status_code == 200, by_id.text
    assert by_id.json()["deployment"]["functionVersionId"] == function["versionId"]
    assert by_id.json()["deployment"]["deploymentId"] == deployment_id

    spec_path = f"/v2/nvcf/deployments/{deployment_id}/gpu-specifications/{spec_id}"
    patched = await stack.http.patch(
        spec_path, json={"gpu": "CPU", "instanceType": "LOCAL.CPU", "minInstances": 0, "maxInstances": 3}
    )
    assert patched.status_code == 200, patched.text
    spec = patched.json()["gpuSpecification"]
    assert (spec["maxInstances"], spec["gpuSpecificationId"]) == (3, spec_id)
    assert (await deployment(stack, function))["deploymentSpecifications"][0]["maxInstances"] == 3

    moved = await stack.http.patch(
        spec_path, json={"gpu": "H100", "instanceType": "LOCAL.CPU", "minInstances": 0, "maxInstances": 3}
    )
    assert moved.status_code == 400 and moved.headers["content-type"].startswith("application/problem+json")
    inverted = await stack.http.patch(
        spec_path, json={"gpu": "CPU", "instanceType": "LOCAL.CPU", "minInstances": 4, "maxInstances": 3}
    )
    assert inverted.status_code == 400
    unknown_spec = await stack.http.patch(
        f"/v2/nvcf/deployments/{deployment_id}/gpu-specifications/nope",
        json={"gpu": "CPU", "instanceType": "LOCAL.CPU", "minInstances": 0, "maxInstances": 1},
    )
    assert unknown_spec.status_code == 404
    assert (await stack.http.get("/v2/nvcf/deployments/not-a-deployment")).status_code == 404

    await stack.http.delete(deployment_path(function))
    assert (await stack.http.get(f"/v2/nvcf/deployments/{deployment_id}")).status_code == 404
