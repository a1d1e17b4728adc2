"""Bad input gets a 4xx problem, never a 5xx or a hang (issue: no input wedges anything).

Against a whole stack over real HTTP: the API process's own HTTP protocol, gateway and Temporal.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from gpufn.stack import temporal_cli
from tests.conftest import ADMIN_KEY, Stack, cpu_spec, echo_function, running_stack
from workflows import search_attributes as sa

PROBLEM = "application/problem+json"


async def raw_request(stack: Stack, head: bytes) -> tuple[int, bytes]:
    """Send a hand-written request (no client library would send these) and return status and response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.settings.api_port)
    try:
        writer.write(head)
        await writer.drain()
    except ConnectionError:
        pass  # the server may close while the request is still being written
    data = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    return int(data.split(b" ", 2)[1]), data


async def test_an_oversized_header_is_refused_431(stack: Stack) -> None:
    head = b"GET /v2/nvcf/functions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\nx-big: %s\r\n\r\n" % (
        ADMIN_KEY.encode(),
        b"a" * (8 * 1024 * 1024),
    )
    status, data = await raw_request(stack, head)
    assert status == 431
    assert PROBLEM.encode() in data


async def test_too_many_headers_are_refused_431(stack: Stack) -> None:
    lines = b"".join(b"x-h%d: 1\r\n" % n for n in range(500))
    status, _ = await raw_request(stack, b"GET /health HTTP/1.1\r\nhost: x\r\n" + lines + b"\r\n")
    assert status == 431


async def test_a_huge_poll_seconds_value_is_a_400(stack: Stack) -> None:
    response = await stack.http.post(
        f"/v2/nvcf/pexec/functions/{uuid.uuid4()}", json={}, headers={"NVCF-POLL-SECONDS": "9" * 5000}
    )
    assert response.status_code in (400, 404)  # an unknown function may be refused first
    assert response.headers["content-type"] == PROBLEM


async def test_control_characters_in_ids_are_a_404_not_a_5xx(stack: Stack) -> None:
    for path in (
        "/v2/nvcf/functions/a%00b/versions",
        "/v2/nvcf/functions/a%00b/versions/c%00d",
        "/v2/nvcf/deployments/functions/a%00b/versions/c%00d",
        "/v2/nvcf/deployments/x%00y",
        "/v2/nvcf/queues/functions/a%00b",
    ):
        response = await stack.http.get(path)
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
        assert response.headers["content-type"] == PROBLEM
    response = await stack.http.post("/v2/nvcf/pexec/functions/a%00b", json={})
    assert response.status_code == 404


async def test_temporal_going_away_mid_use_is_a_503_with_retry_after(tmp_path: Path) -> None:
    """The control plane dies under a running API: calls answer 503 + Retry-After, never a 500."""
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=temporal_cli(),
        search_attributes=list(sa.ALL),
        ui=False,
        dev_server_log_level="error",
    )
    address = env.client.service_client.config.target_host
    try:
        async with running_stack(address, tmp_path) as stack:
            created = await stack.http.post("/v2/nvcf/functions", json=echo_function("doomed"))
            assert created.status_code == 200
            function = created.json()["function"]
            await env.shutdown()
            deploy = await stack.http.post(
                f"/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}",
                json=cpu_spec(),
            )
            assert deploy.status_code == 503, deploy.text
            assert deploy.headers["retry-after"]
            assert deploy.headers["content-type"] == PROBLEM
            listed = await stack.http.get("/v2/nvcf/functions")
            assert listed.status_code == 503
    finally:
        with contextlib.suppress(Exception):
            await env.shutdown()
