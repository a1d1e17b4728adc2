"""An accepted request is never lost: 202 requests across two API replica processes survive kill -9.

Real components throughout: a real nats-server with JetStream, the real Temporal dev server, a worker
process, a real echo instance, and two API replicas as separate `python -m api` processes sharing the
invocation plane. One replica and the worker are killed with SIGKILL while requests run and wait in the
queue, then restarted; every request id must then poll (on either replica) to its result or to a clear
failure, never to "not found".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    ADMIN_KEY,
    ROOT,
    Stack,
    cpu_spec,
    echo_function,
    eventually,
    free_port,
    running_stack,
    settings_env,
)
from tests.lifecycle.helpers import create, deployment_path, wait_status

REQUESTS = 200
DELAY_MS = 150


class Replica:
    """One API replica as its own process (so it can be killed with SIGKILL)."""

    def __init__(self, stack: Stack, replica_id: str, port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = settings_env(stack.settings)
        self.env.update(GPUFN_API_PORT=str(self.port), GPUFN_REPLICA_ID=replica_id)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api"], env=self.env, cwd=ROOT, stdout=out, stderr=out
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def ready(self, http: httpx.AsyncClient) -> None:
        async def answers() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get(f"{self.url}/health")).status_code == 200
            return False

        await eventually(answers, timeout=60, interval=0.2)


REPLICA_PORTS = (free_port(), free_port())
"""The two replica processes' ports, fixed for the module: the worker polls their load (autoscaling)."""


@pytest.fixture(scope="module")
async def plane_stack(
    temporal_address: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    home = tmp_path_factory.mktemp("gpufn-plane")
    api_port = free_port()
    urls = [f"http://127.0.0.1:{port}" for port in (api_port, *REPLICA_PORTS)]
    async with running_stack(
        temporal_address, home, api_port=api_port, nats_url=nats_url, gateway_urls=urls
    ) as stack:
        yield stack


@pytest.fixture
def replicas(plane_stack: Stack, tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    pair = (
        Replica(plane_stack, "api-a", REPLICA_PORTS[0], tmp_path / "api-a.log"),
        Replica(plane_stack, "api-b", REPLICA_PORTS[1], tmp_path / "api-b.log"),
    )
    for replica in pair:
        replica.start()
    try:
        yield pair
    finally:
        for replica in pair:
            replica.stop()


async def deploy_slow_echo(stack: Stack, name: str, concurrency: int) -> dict[str, Any]:
    function = await create(
        stack, echo_function(name, containerEnvironment=[{"key": "ECHO_DELAY_MS", "value": str(DELAY_MS)}])
    )
    spec = cpu_spec(maxRequestConcurrency=concurrency)
    deployed = await stack.http.post(deployment_path(function), json=spec)
    assert deployed.status_code == 200, deployed.text
    await wait_status(stack, function, "ACTIVE", timeout=90)
    return function


async def test_accepted_requests_survive_kill_of_a_replica_and_the_worker(
    plane_stack: Stack, replicas: tuple[Replica, Replica]
) -> None:
    stack = plane_stack
    a, b = replicas
    function = await deploy_slow_echo(stack, "plane-faults", concurrency=4)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "NVCF-POLL-SECONDS": "0"}
    async with httpx.AsyncClient(headers=headers, timeout=60) as http:
        await a.ready(http)
        await b.ready(http)
        invoke = f"/v2/nvcf/pexec/functions/{function['id']}"

        for replica in replicas:

            async def routed(replica: Replica = replica) -> bool:
                response = await http.post(replica.url + invoke, json={"warm": 1})
                return response.status_code in (200, 202)

            await eventually(routed, timeout=30)

        async def accept(index: int) -> str:
            replica = replicas[index % 2]
            response = await http.post(replica.url + invoke, json={"n": index})
            assert response.status_code == 202, (response.status_code, response.text)
            request_id: str = response.headers["nvcf-reqid"]
            return request_id

        accepted = list(await asyncio.gather(*(accept(i) for i in range(REQUESTS))))
        assert len(set(accepted)) == REQUESTS

        # Mid-way: some requests ran, some run, most wait in the shared queue.
        await asyncio.sleep(1.0)
        a.kill()
        stack.kill_worker()
        await asyncio.sleep(1.0)
        a.start()
        stack.restart_worker()
        await a.ready(http)

        outcomes: Counter[str] = Counter()

        async def settle(index: int, request_id: str) -> None:
            replica = replicas[index % 2]
            for _ in range(600):
                response = await http.get(
                    f"{replica.url}/v2/nvcf/pexec/status/{request_id}", headers={"NVCF-POLL-SECONDS": "2"}
                )
                if response.status_code == 202:
                    continue
                if response.status_code == 200:
                    assert response.json() == {"n": index}
                    outcomes["result"] += 1
                elif response.status_code == 404:
                    outcomes["not found"] += 1
                else:
                    assert response.headers["nvcf-status"] == "errored", response.text
                    assert "may or may not have run" in response.json()["detail"], response.text
                    outcomes["failed (replica died while running it)"] += 1
                return
            outcomes["still pending"] += 1

        await asyncio.gather(*(settle(i, rid) for i, rid in enumerate(accepted)))
        print(f"\n{REQUESTS} accepted requests after kill -9 of a replica and the worker: {dict(outcomes)}")
        assert outcomes["not found"] == 0
        assert outcomes["still pending"] == 0
        assert sum(outcomes.values()) == REQUESTS
        assert outcomes["result"] >= REQUESTS // 2
        # A result is returned once: a second poll says so, on either replica.
        again = await http.get(f"{b.url}/v2/nvcf/pexec/status/{accepted[-1]}")
        assert again.status_code == 404


COUNTING_ECHO = "python tests/gateway/counting_echo.py"
CLIENTS = 40
ROUNDS = 3


async def test_max_request_concurrency_holds_across_replicas_and_positions_agree(
    plane_stack: Stack, replicas: tuple[Replica, Replica]
) -> None:
    stack = plane_stack
    a, b = replicas
    function = await create(
        stack,
        echo_function(
            "plane-concurrency",
            containerArgs=COUNTING_ECHO,
            containerEnvironment=[{"key": "COUNTING_DELAY_MS", "value": "100"}],
        ),
    )
    deployed = await stack.http.post(deployment_path(function), json=cpu_spec(maxRequestConcurrency=2))
    assert deployed.status_code == 200, deployed.text
    await wait_status(stack, function, "ACTIVE", timeout=90)
    invoke = f"/v2/nvcf/pexec/functions/{function['id']}"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as http:
        await a.ready(http)
        await b.ready(http)
        for replica in replicas:

            async def routed(replica: Replica = replica) -> bool:
                response = await http.post(replica.url + invoke, json={})
                return response.status_code == 200

            await eventually(routed, timeout=30)

        seen: list[int] = []

        async def client(index: int) -> None:
            replica = replicas[index % 2]
            for round_ in range(ROUNDS):
                response = await http.post(
                    replica.url + invoke, json={"c": index, "r": round_}, headers={"NVCF-POLL-SECONDS": "60"}
                )
                assert response.status_code == 200, (response.status_code, response.headers, response.text)
                seen.append(response.json()["concurrent"])

        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        print(f"\nmost concurrent requests the instance saw: {max(seen)} (of {len(seen)} answers)")
        assert len(seen) == CLIENTS * ROUNDS
        assert max(seen) <= 2
        assert max(seen) == 2  # both slots were used: the limit was reached, not merely unused

        # Queue positions: one global queue, so both replicas place a request the same.
        accepted = []
        for index in range(30):
            response = await http.post(
                replicas[index % 2].url + invoke, json={"q": index}, headers={"NVCF-POLL-SECONDS": "0"}
            )
            assert response.status_code == 202, response.text
            accepted.append(response.headers["nvcf-reqid"])
        last = accepted[-1]

        async def position(replica: Replica) -> int:
            response = await http.get(f"{replica.url}/v2/nvcf/queues/{last}/position")
            assert response.status_code == 200, response.text
            place: int = response.json()["positionInQueue"]
            return place

        first_a = await position(a)
        at_b = await position(b)
        then_a = await position(a)
        print(f"position of the last request: a={first_a}, b={at_b}, a again={then_a}")
        assert first_a > 1
        assert first_a >= at_b >= then_a

        async def finished(request_id: str, index: int) -> None:
            for _ in range(120):
                response = await http.get(
                    f"{replicas[index % 2].url}/v2/nvcf/pexec/status/{request_id}",
                    headers={"NVCF-POLL-SECONDS": "5"},
                )
                if response.status_code != 202:
                    assert response.status_code == 200, response.text
                    seen.append(response.json()["concurrent"])
                    return
            raise AssertionError(f"request {request_id} did not finish")

        await asyncio.gather(*(finished(rid, i) for i, rid in enumerate(accepted)))
        assert max(seen) <= 2


async def test_a_request_to_a_version_scaled_to_zero_waits_in_the_shared_queue_and_is_served(
    plane_stack: Stack, replicas: tuple[Replica, Replica]
) -> None:
    """Scale from zero through the plane: the queued request is the autoscaler's signal, then it runs."""
    stack = plane_stack
    a, _ = replicas
    function = await create(stack, echo_function("plane-from-zero", containerArgs=COUNTING_ECHO))
    spec = cpu_spec(min_instances=0, max_instances=1)
    deployed = await stack.http.post(deployment_path(function), json=spec)
    assert deployed.status_code == 200, deployed.text
    await wait_status(stack, function, "ACTIVE", timeout=90)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as http:
        await a.ready(http)
        response = await http.post(
            f"{a.url}/v2/nvcf/pexec/functions/{function['id']}",
            json={"cold": True},
            headers={"NVCF-POLL-SECONDS": "90"},
        )
        assert response.status_code == 200, (response.status_code, response.text)
        assert json.loads(response.json()["body"]) == {"cold": True}
