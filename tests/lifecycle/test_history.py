"""Bounded histories: a long-lived deployment continues as new and keeps its whole state."""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime

from temporalio.common import SearchAttributePair, TypedSearchAttributes

from tests.conftest import Stack, cpu_spec, eventually
from tests.lifecycle.helpers import (
    deployment,
    deployment_path,
    instance_records,
    record_history,
    wait_running,
)
from workflows import function_version_workflow_id
from workflows import search_attributes as sa
from workflows.function_version import FunctionVersionWorkflow
from workflows.models import FunctionVersionInput, FunctionVersionSpec, Health, VersionState
from workflows.routes import route_memo, summary_memo


async def test_deployment_continues_as_new_and_keeps_its_state(stack: Stack) -> None:
    # Started directly (not through the API) only to set a tiny history limit; everything after is the API.
    spec = FunctionVersionSpec(
        id="0c7f6a0e-1111-4d2c-9a51-3b8e2f6c0001",
        versionId="0c7f6a0e-2222-4d2c-9a51-3b8e2f6c0002",
        ncaId=stack.settings.admin_account,
        name="long-lived",
        description="long-lived",
        inferenceUrl="/echo",
        health=Health(uri="/health"),
        healthUri="/health",
        containerImage="example.com/echo:1",
        containerArgs="python examples/echo/server.py",
        createdAt=datetime.now(UTC),
    )

    state = VersionState(spec=spec)
    workflow_id = function_version_workflow_id(spec.id, spec.versionId)
    handle = await stack.client.start_workflow(
        FunctionVersionWorkflow.run,
        FunctionVersionInput(state=state, continueAsNewAfterEvents=40),
        id=workflow_id,
        task_queue=stack.settings.task_queue,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(sa.ACCOUNT, spec.ncaId),
                SearchAttributePair(sa.FUNCTION_ID, spec.id),
                SearchAttributePair(sa.VERSION_ID, spec.versionId),
                SearchAttributePair(sa.STATUS, "INACTIVE"),
            ]
        ),
        memo={"summary": summary_memo(state), "route": route_memo(state)},
    )
    function = {"id": spec.id, "versionId": spec.versionId}
    first_run = handle.result_run_id
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 1))
    await wait_running(stack, function, 1)
    for _ in range(4):
        [record] = instance_records(stack, function)
        os.killpg(record["pid"], signal.SIGKILL)

        async def replaced(old: str = record["instanceId"]) -> bool:
            body = await deployment(stack, function)
            ids = [i["instanceId"] for i in body["instances"] if i["status"] == "RUNNING"]
            return body["functionStatus"] == "ACTIVE" and len(ids) == 1 and ids[0] != old

        await eventually(replaced, timeout=30)
    described = await stack.client.get_workflow_handle(workflow_id).describe()
    assert described.run_id != first_run
    assert described.raw_description.workflow_execution_info.history_length < 200
    body = await deployment(stack, function)
    assert body["functionStatus"] == "ACTIVE"
    view = await stack.client.get_workflow_handle(workflow_id).query(FunctionVersionWorkflow.describe)
    assert view.state.failures[0].total == 4
    first = await stack.client.get_workflow_handle(workflow_id, run_id=first_run).fetch_history()
    record_history(first, "continued_as_new_after_heals")
    assert json.loads(view.state.spec.model_dump_json())["name"] == "long-lived"
