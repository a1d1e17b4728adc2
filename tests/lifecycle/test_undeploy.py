"""Undeploy and delete over HTTP: the NGC SDK's restart (graceful DELETE, then POST at once), a spec that
cannot start, and undeploy/delete answered quickly whatever the version is doing."""

from __future__ import annotations

import asyncio

from tests.conftest import Stack, cpu_spec, echo_function, eventually
from tests.lifecycle.helpers import (
    create,
    deploy,
    deployment,
    deployment_path,
    instance_records,
    wait_running,
    wait_status,
)


async def test_restart_graceful_undeploy_then_immediate_redeploy(stack: Stack) -> None:
    """`deployments.restart()`: DELETE ?graceful=true, then at once POST of the same specifications."""
    function = await create(stack, echo_function("restarted"))
    specs = cpu_spec(1, 1)
    await deploy(stack, function, specs)
    await wait_running(stack, function, 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    undeployed = await stack.http.delete(deployment_path(function) + "?graceful=true")
    assert undeployed.status_code == 200, undeployed.text
    assert undeployed.json()["function"]["status"] == "INACTIVE"
    redeployed = await stack.http.post(deployment_path(function), json=specs)
    elapsed = loop.time() - started
    assert redeployed.status_code == 200, redeployed.text
    assert redeployed.json()["deployment"]["functionStatus"] == "DEPLOYING"
    # Nothing to drain: the DELETE completed the undeploy before it answered (a few seconds at most).
    assert elapsed < 5, elapsed
    await wait_status(stack, function, "ACTIVE")
    running = await wait_running(stack, function, 1)
    # The first deployment's instance is gone: the local backend keeps only the new one.
    records = {record["instanceId"] for record in instance_records(stack, function)}
    assert records == {i["instanceId"] for i in running["instances"]}


async def test_unsplittable_command_line_is_refused_at_creation(stack: Stack) -> None:
    """A command line shlex cannot split is refused with a 400 naming the cause; nothing is created.

    (Were it to reach a backend, the same fault is permanent and ends the deploy in ERROR at once: the
    time-skipping tests in tests/workflows cover that path.)
    """
    response = await stack.http.post(
        "/v2/nvcf/functions", json=echo_function("unterminated", containerArgs="python 'unterminated")
    )
    assert response.status_code == 400
    assert "No closing quotation" in response.json()["detail"]


async def test_a_version_in_error_undeploys_and_deletes_at_once(stack: Stack) -> None:
    """An instance that exits at once fails the deploy into ERROR; undeploy and delete still answer fast."""
    exits = echo_function("exits-at-once", containerArgs="python -c 'raise SystemExit(3)'")
    function = await create(stack, exits)
    await deploy(stack, function, cpu_spec(1, 1))
    failed = await wait_status(stack, function, "ERROR", timeout=60)
    assert failed["healthInfo"], failed
    loop = asyncio.get_running_loop()
    started = loop.time()
    removed = await stack.http.delete(deployment_path(function))
    assert removed.status_code == 200, removed.text
    assert removed.json()["function"]["status"] == "INACTIVE"
    assert loop.time() - started < 5
    deleted = await stack.http.delete(f"/v2/nvcf/functions/{function['id']}/versions/{function['versionId']}")
    assert deleted.status_code == 204, deleted.text
    assert loop.time() - started < 10


async def test_graceful_undeploy_of_a_deploying_version_answers_quickly(stack: Stack) -> None:
    """An instance that never becomes healthy keeps the version DEPLOYING; undeploy still answers at once."""
    never_ready = echo_function("never-ready", containerArgs="sleep 600")
    function = await create(stack, never_ready)
    await deploy(stack, function, cpu_spec(1, 1))
    body = await deployment(stack, function)
    assert body["functionStatus"] == "DEPLOYING"
    loop = asyncio.get_running_loop()
    started = loop.time()
    undeployed = await stack.http.delete(deployment_path(function) + "?graceful=true")
    assert undeployed.status_code == 200, undeployed.text
    assert loop.time() - started < 5

    async def torn_down() -> bool:
        gone = (await stack.http.get(deployment_path(function))).status_code == 404
        return gone and not instance_records(stack, function)

    await eventually(torn_down, timeout=15)
