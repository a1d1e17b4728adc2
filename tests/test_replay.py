"""Replay: the current workflow code must replay recorded histories (a change that would break running
workflows fails here and needs `workflow.patched`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.conftest import Stack, cpu_spec, echo_function
from tests.lifecycle.helpers import create, deployment_path, wait_running, workflow_id
from workflows.function_version import FunctionVersionWorkflow
from workflows.key_registry import KeyRegistryWorkflow

HISTORIES = Path(__file__).parent / "histories"


def replayer() -> Replayer:
    return Replayer(
        workflows=[FunctionVersionWorkflow, KeyRegistryWorkflow], data_converter=pydantic_data_converter
    )


@pytest.mark.parametrize("path", sorted(HISTORIES.glob("*.json")), ids=lambda p: p.stem)
async def test_recorded_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, json.loads(path.read_text()))
    await replayer().replay_workflow(history)


async def test_a_fresh_lifecycle_history_replays(stack: Stack) -> None:
    function = await create(stack, echo_function("replayed"))
    await stack.http.post(deployment_path(function), json=cpu_spec(1, 2))
    await wait_running(stack, function, 1)
    await stack.http.put(deployment_path(function), json=cpu_spec(2, 2))
    await wait_running(stack, function, 2)
    undeployed = await stack.http.delete(deployment_path(function))
    assert undeployed.json()["function"]["status"] == "INACTIVE"
    history = await stack.client.get_workflow_handle(workflow_id(function)).fetch_history()
    await replayer().replay_workflow(history)
