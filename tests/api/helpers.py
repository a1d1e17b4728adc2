"""Helpers shared by the API tests: calls that must succeed, and checks of problem+json answers."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import httpx
from google.protobuf.json_format import MessageToDict
from temporalio.client import Client

from tests.conftest import Stack

FUNCTIONS = "/v2/nvcf/functions"


def version_path(function: dict[str, Any], prefix: str = "/v2/nvcf") -> str:
    return f"{prefix}/functions/{function['id']}/versions/{function['versionId']}"


def metadata_path(function: dict[str, Any], prefix: str = "/v2/nvcf") -> str:
    return f"{prefix}/metadata/functions/{function['id']}/versions/{function['versionId']}"


async def create(stack: Stack, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    """Create a function and return its `function` object."""
    response = await stack.http.post(FUNCTIONS, json=body, headers=stack.headers(key))
    assert response.status_code == 200, response.text
    function: dict[str, Any] = response.json()["function"]
    return function


def assert_problem(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    """Check an RFC 9457 answer with NVCF's URN type; return its body. `words` must be in `detail`."""
    assert response.status_code == status, f"{response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:nv-boot:problem-details:")
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    for word in words:
        assert word in body["detail"], f"{word!r} not in detail {body['detail']!r}"
    return body


def _decoded_payloads(node: Any, out: list[str]) -> None:
    """Collect every base64 `data` field of a proto-JSON tree, decoded as the Web UI shows it."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str):
                try:
                    out.append(base64.b64decode(value).decode("utf-8", errors="replace"))
                except (binascii.Error, ValueError):
                    pass
            _decoded_payloads(value, out)
    elif isinstance(node, list):
        for item in node:
            _decoded_payloads(item, out)


async def workflow_text(client: Client, workflow_id: str) -> str:
    """Return all a person can read of a workflow: its history and description, payloads decoded."""
    handle = client.get_workflow_handle(workflow_id)
    history = (await handle.fetch_history()).to_json_dict()
    description = MessageToDict((await handle.describe()).raw_description)
    decoded: list[str] = []
    _decoded_payloads(history, decoded)
    _decoded_payloads(description, decoded)
    return "\n".join([json.dumps(history), json.dumps(description), *decoded])
