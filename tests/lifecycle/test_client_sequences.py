"""Sequences of calls that NVCF clients make back to back, against a whole stack (real Temporal, worker,
API over HTTP, real instances).

ACTIVE means invocable: a client that polls a version until it reads ACTIVE and invokes at once must be
served, on every API replica; after an undeploy is answered, no replica routes new requests to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, Stack, cpu_spec, echo_function, free_port, running_stack, serve_api

LOOPS = 200
PARALLEL = 8
TINY_ECHO = "python tests/lifecycle/tiny_echo.py"  # starts in milliseconds: the loop measures the race


async def deploy_and_invoke_at_once(deployer: httpx.AsyncClient, invoker: httpx.AsyncClient, n: int) -> int:
    """Create, deploy, poll the version until ACTIVE, invoke at once; return the invocation's status."""
    created = await deployer.post(
        "/v2/nvcf/functions", json=echo_function(f"race-{n}", containerArgs=TINY_ECHO)
    )
    assert created.status_code == 200, created.text
    function = created.json()["function"]
    fid, vid = function["id"], function["versionId"]
    deployed = await deployer.post(f"/v2/nvcf/deployments/functions/{fid}/versions/{vid}", json=cpu_spec())
    assert deployed.status_code == 200, deployed.text
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        version = await deployer.get(f"/v2/nvcf/functions/{fid}/versions/{vid}")
        status = version.json()["function"]["status"]
        if status == "ACTIVE":
            break
        assert status == "DEPLOYING", f"loop {n}: {version.text}"
        if loop.time() > deadline:
            stuck = await deployer.get(f"/v2/nvcf/deployments/functions/{fid}/versions/{vid}")
            raise AssertionError(f"loop {n}: not ACTIVE within 60 s: {stuck.text}")
        await asyncio.sleep(0.02)
    answer = await invoker.post(f"/v2/nvcf/pexec/functions/{fid}", json={"n": n})
    assert answer.status_code == 200, f"loop {n}: {answer.status_code} {answer.text}"
    deleted = await deployer.delete(f"/v2/nvcf/functions/{fid}/versions/{vid}")
    assert deleted.status_code == 204, deleted.text
    return answer.status_code


async def run_loops(deployer: httpx.AsyncClient, invoker: httpx.AsyncClient) -> list[int]:
    statuses: list[int] = []

    async def lane(first: int) -> None:
        for n in range(first, LOOPS, PARALLEL):
            statuses.append(await deploy_and_invoke_at_once(deployer, invoker, n))

    await asyncio.gather(*(lane(first) for first in range(PARALLEL)))
    return statuses


@contextlib.asynccontextmanager
async def two_replicas(temporal_address: str, home: Path) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    """A stack whose API has two replicas that know each other (as the Helm chart's StatefulSet does)."""
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    peers = {"api-a": url_a, "api-b": url_b}
    async with running_stack(
        temporal_address, home, api_port=port_a, replica_id="api-a", peers=peers, gateway_urls=[url_a, url_b]
    ) as stack:
        settings_b = stack.settings.model_copy(update={"api_port": port_b, "replica_id": "api-b"})
        server, task = await serve_api(settings_b)
        try:
            async with httpx.AsyncClient(
                base_url=url_b, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
            ) as http_b:
                yield stack, http_b
        finally:
            server.should_exit = True
            await task


async def test_active_means_invocable_at_once(stack: Stack) -> None:
    statuses = await run_loops(stack.http, stack.http)
    assert len(statuses) == LOOPS
    assert [s for s in statuses if s != 200] == []


@pytest.fixture(scope="module")
async def replicas(
    temporal_address: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    async with two_replicas(temporal_address, tmp_path_factory.mktemp("gpufn-replicas")) as pair:
        yield pair


async def test_active_through_one_replica_is_invocable_through_the_other(
    replicas: tuple[Stack, httpx.AsyncClient],
) -> None:
    stack, other = replicas
    statuses = await run_loops(stack.http, other)
    assert len(statuses) == LOOPS
    assert [s for s in statuses if s != 200] == []


async def test_undeployed_through_one_replica_is_not_routed_by_the_other(
    replicas: tuple[Stack, httpx.AsyncClient],
) -> None:
    stack, other = replicas
    created = await stack.http.post("/v2/nvcf/functions", json=echo_function("undeploy-race"))
    function: dict[str, Any] = created.json()["function"]
    fid, vid = function["id"], function["versionId"]
    path = f"/v2/nvcf/deployments/functions/{fid}/versions/{vid}"
    assert (await stack.http.post(path, json=cpu_spec())).status_code == 200
    for _ in range(600):
        if (await stack.http.get(path)).json()["deployment"]["functionStatus"] == "ACTIVE":
            break
        await asyncio.sleep(0.05)
    assert (await other.post(f"/v2/nvcf/pexec/functions/{fid}", json={})).status_code == 200

    undeployed = await stack.http.delete(path)
    assert undeployed.status_code == 200
    assert undeployed.json()["function"]["status"] == "INACTIVE"
    after = await other.post(f"/v2/nvcf/pexec/functions/{fid}", json={})
    assert after.status_code == 404
    assert (await stack.http.delete(f"/v2/nvcf/functions/{fid}/versions/{vid}")).status_code == 204


async def test_a_stream_that_waits_for_a_cold_start_is_not_answered_202(stack: Stack) -> None:
    """LangChain's NVIDIA chat client streams with the default poll window (5 s) and fails on a 202."""
    await stream_through_a_cold_start(stack)


@pytest.fixture(scope="module")
async def plane_stack(
    temporal_address: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """A stack whose gateway runs on the NATS invocation plane, as `make up`'s does."""
    async with running_stack(temporal_address, tmp_path_factory.mktemp("plane-home"), nats_url=nats_url) as s:
        yield s


async def test_a_stream_waits_for_a_cold_start_on_the_invocation_plane(plane_stack: Stack) -> None:
    """A stream is never persisted (it is never 202'd): it waits in the replica's memory, and the replica
    must still lease the new instance's slots for it (it once waited until its timeout)."""
    await stream_through_a_cold_start(plane_stack)


async def stream_through_a_cold_start(stack: Stack) -> None:
    """Stream from a version scaled to zero whose instance takes 6 s to start: 200 with every event."""
    body = echo_function("slow-start", containerEnvironment=[{"key": "ECHO_START_SECONDS", "value": "6"}])
    created = await stack.http.post("/v2/nvcf/functions", json=body)
    function: dict[str, Any] = created.json()["function"]
    fid, vid = function["id"], function["versionId"]
    path = f"/v2/nvcf/deployments/functions/{fid}/versions/{vid}"
    deployed = await stack.http.post(path, json=cpu_spec(min_instances=0, max_instances=1))
    assert deployed.json()["deployment"]["functionStatus"] == "ACTIVE"  # scaled to zero

    async with stack.http.stream(
        "POST",
        f"/v2/nvcf/pexec/functions/{fid}",
        json={"stream": 3, "intervalSeconds": 0.05},
        headers={"Accept": "text/event-stream"},
        timeout=120,
    ) as response:
        raw = await response.aread()

    assert response.status_code == 200, raw
    data = [line for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert len(data) == 3
    assert (await stack.http.delete(f"/v2/nvcf/functions/{fid}/versions/{vid}")).status_code == 204
