"""A deploy from the API is one round trip to Temporal, and answers as before.

The deploy update's validator checks what the API used to read the version for (the account owns it, it
is live, `configuration` only for Helm charts), so `POST .../deployments/...` makes one call to
Temporal: counted here at the Temporal client's RPC layer, on a second API replica whose client counts
every RPC that names the version's workflow (the count wraps the real call; nothing is mocked).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from api.app import create_app
from tests.api.helpers import assert_problem, create, version_path
from tests.conftest import Stack, cpu_spec, echo_function, free_port
from workflows import function_version_workflow_id


def deployment_path(function: dict[str, Any]) -> str:
    return f"/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}"


@asynccontextmanager
async def counting_replica(
    stack: Stack, workflow_id: str
) -> AsyncIterator[tuple[httpx.AsyncClient, list[str]]]:
    """Serve another API replica of the stack over real HTTP; yield its client and the RPCs it made
    that name `workflow_id` (their method names, in order)."""
    client = await Client.connect(stack.settings.temporal_target, data_converter=pydantic_data_converter)
    calls: list[str] = []
    service = client.service_client
    real_call = service._rpc_call

    async def counted_call(rpc: str, req: Any, resp_type: Any, **options: Any) -> Any:
        if workflow_id.encode() in req.SerializeToString():
            calls.append(rpc)
        return await real_call(rpc, req, resp_type, **options)

    service._rpc_call = counted_call  # type: ignore[method-assign]
    settings = stack.settings.model_copy(update={"api_port": free_port()})
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, client), host="127.0.0.1", port=settings.api_port, log_level="warning"
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{settings.api_port}", headers=stack.headers(), timeout=30
        ) as http:
            yield http, calls
    finally:
        server.should_exit = True
        await task


async def test_a_deploy_is_one_round_trip_to_temporal(stack: Stack) -> None:
    function = await create(stack, echo_function("one-round-trip"))
    workflow_id = function_version_workflow_id(function["id"], function["versionId"])
    async with counting_replica(stack, workflow_id) as (http, calls):
        response = await http.post(deployment_path(function), json=cpu_spec(min_instances=0))
        assert response.status_code == 200, response.text
        deployment = response.json()["deployment"]
        assert deployment["functionStatus"] == "ACTIVE"
        assert calls == ["update_workflow_execution"]

        # The same answer as a read of the deployment afterwards (which is one query).
        calls.clear()
        read = await http.get(deployment_path(function))
        assert read.json()["deployment"]["deploymentId"] == deployment["deploymentId"]
        assert calls == ["query_workflow"]

        # A second deploy is refused by the workflow, in the same round trip, with the same answer.
        calls.clear()
        again = await http.post(deployment_path(function), json=cpu_spec(min_instances=0))
        assert_problem(again, 400, "already deployed")
        assert calls == ["update_workflow_execution"]


async def test_a_deploy_of_a_version_the_account_lacks_is_404_as_before(stack: Stack) -> None:
    function = await create(stack, echo_function("not-yours"))
    other = await stack.create_key("round-trip-other", ["register_function", "deploy_function"])
    response = await stack.http.post(
        deployment_path(function), json=cpu_spec(min_instances=0), headers=stack.headers(other)
    )
    assert_problem(response, 404, "Not found for account 'round-trip-other'", function["versionId"])

    deleted = await create(stack, echo_function("deleted-then-deployed"))
    assert (await stack.http.delete(version_path(deleted))).status_code == 204
    response = await stack.http.post(deployment_path(deleted), json=cpu_spec(min_instances=0))
    assert_problem(response, 404, "Not found for account", deleted["versionId"])


async def test_configuration_of_a_container_function_is_refused_as_before(stack: Stack) -> None:
    function = await create(stack, echo_function("no-configuration"))
    body = cpu_spec(min_instances=0, configuration={"replicaCount": 2})
    response = await stack.http.post(deployment_path(function), json=body)
    assert_problem(response, 400, "configuration is only allowed for Helm-chart functions")
    # And a placement no cluster group offers is still a 400, after the version was found.
    wrong = await stack.http.post(
        deployment_path(function), json=cpu_spec(min_instances=0, instanceType="NO.SUCH.TYPE")
    )
    assert wrong.status_code == 400, wrong.text
    missing = {**function, "versionId": "00000000-0000-4000-8000-000000000000"}
    lost = await stack.http.post(
        deployment_path(missing), json=cpu_spec(min_instances=0, instanceType="NO.SUCH.TYPE")
    )
    assert_problem(lost, 404, "Not found for account")
