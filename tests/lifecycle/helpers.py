"""Helpers shared by the lifecycle tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHistory

from tests.conftest import Stack, eventually

HISTORIES = Path(__file__).resolve().parent.parent / "histories"
RECORD_HISTORIES = "GPUFN_RECORD_HISTORIES"
"""Set to 1 to (re)record the histories `tests/test_replay.py` replays, from the tests that reach them."""


def record_history(history: WorkflowHistory, name: str) -> None:
    """Save a workflow history under tests/histories when recording is asked for (else do nothing).

    Recorded histories are committed; replaying them proves that a code change keeps running
    workflows of that shape working (or needs `workflow.patched`).
    """
    if os.environ.get(RECORD_HISTORIES) == "1":
        (HISTORIES / f"{name}.json").write_text(history.to_json() + "\n")


async def create(stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    response = await stack.http.post("/v2/nvcf/functions", json=body)
    assert response.status_code == 200, response.text
    function: dict[str, Any] = response.json()["function"]
    return function


def deployment_path(function: dict[str, Any]) -> str:
    return f"/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}"


def workflow_id(function: dict[str, Any]) -> str:
    return f"function:{function['id']}:{function['versionId']}"


async def deployment(stack: Stack, function: dict[str, Any]) -> dict[str, Any]:
    response = await stack.http.get(deployment_path(function))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()["deployment"]
    return body


async def wait_status(
    stack: Stack, function: dict[str, Any], status: str, timeout: float = 30
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        body = await deployment(stack, function)
        return body if body["functionStatus"] == status else None

    result: dict[str, Any] = await eventually(check, timeout=timeout)
    return result


async def wait_running(
    stack: Stack, function: dict[str, Any], count: int, timeout: float = 30
) -> dict[str, Any]:
    """Wait until exactly `count` instances are RUNNING and no other instance exists."""

    last: list[dict[str, Any]] = []

    async def check() -> dict[str, Any] | None:
        body = await deployment(stack, function)
        last[:] = [body]
        running = [i for i in body["instances"] if i["status"] == "RUNNING"]
        return body if len(running) == count == len(body["instances"]) else None

    try:
        result: dict[str, Any] = await eventually(check, timeout=timeout)
    except AssertionError as err:
        raise AssertionError(f"not {count} running instances; last deployment: {last}") from err
    return result


def instance_records(stack: Stack, function: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the local backend's records of the version's instances."""
    records = []
    for path in (stack.settings.home / "instances").glob("*.json"):
        record = json.loads(path.read_text())
        if record["versionId"] == function["versionId"]:
            records.append(record)
    return records


def pexec(function: dict[str, Any]) -> str:
    """Return the function-level invocation path."""
    return f"/v2/nvcf/pexec/functions/{function['id']}"


async def deploy(stack: Stack, function: dict[str, Any], body: dict[str, Any]) -> None:
    """Deploy a version and assert the API accepted it."""
    response = await stack.http.post(deployment_path(function), json=body)
    assert response.status_code == 200, response.text


async def undeploy(stack: Stack, function: dict[str, Any]) -> None:
    """Undeploy a version at once and assert the API accepted it."""
    response = await stack.http.delete(deployment_path(function))
    assert response.status_code == 200, response.text
