"""Helpers of the gateway tests: real echo instances (subprocesses), real uvicorn servers, real HTTP.

The one thing mocked is `authenticate`: keys live in Temporal (the key registry workflow), so a dict of
principals stands in for it. Routes are built with `workflows.routes.route_memo` itself, so the route
table is fed exactly what the lifecycle workflows publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from api.gateway import Gateway, GatewaySettings
from api.gateway.route_lookup import RouteSource
from api.principal import ALL_SCOPES, Principal
from workflows.models import (
    Deployment,
    DeploymentSpecification,
    FunctionStatus,
    FunctionVersionSpec,
    Health,
    InstanceRecord,
    InstanceStatus,
    VersionState,
)
from workflows.routes import route_memo

ROOT = Path(__file__).resolve().parents[2]
ECHO = ROOT / "examples" / "echo" / "server.py"

ACCOUNT = "acct-a"
OTHER_ACCOUNT = "acct-b"
KEY = "key-a"
KEYS: dict[str, Principal] = {
    "Bearer key-a": Principal(account=ACCOUNT, key_id="key-a", scopes=ALL_SCOPES),
    "Bearer key-b": Principal(account=OTHER_ACCOUNT, key_id="key-b", scopes=ALL_SCOPES),
    "Bearer key-queue-only": Principal(account=ACCOUNT, key_id="key-q", scopes=frozenset({"queue_details"})),
    "Bearer key-invoke-only": Principal(
        account=ACCOUNT, key_id="key-i", scopes=frozenset({"invoke_function"})
    ),
    "Bearer key-admin": Principal(account="ops", key_id="key-admin", scopes=frozenset(), admin=True),
}


PROBLEM = "application/problem+json"


def pexec(function_id: str, version_id: str | None = None) -> str:
    """Return the pexec path of a function (or of one of its versions)."""
    path = f"/v2/nvcf/pexec/functions/{function_id}"
    return f"{path}/versions/{version_id}" if version_id else path


async def submit(served: Served, function_id: str, body: dict[str, Any]) -> str:
    """Invoke without waiting (NVCF-POLL-SECONDS: 0) and return the request id of the 202."""
    response = await served.http.post(pexec(function_id), json=body, headers={"NVCF-POLL-SECONDS": "0"})
    assert response.status_code == 202, response.text
    assert response.headers["nvcf-status"] == "in-progress"
    return response.headers["nvcf-reqid"]


def authenticate(header: str | None) -> Principal | None:
    """Stand-in for the key registry (which lives in Temporal): the only mocked part."""
    return KEYS.get(header or "")


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def uid(prefix: str = "fn") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def route(
    version_id: str,
    addresses: list[str],
    *,
    function_id: str,
    status: FunctionStatus = FunctionStatus.ACTIVE,
    deployed: bool = True,
    draining: bool = False,
    concurrency: int = 1,
    routes_version: int = 1,
    account: str = ACCOUNT,
    inference_url: str = "/echo",
    name: str = "echo",
) -> dict[str, Any]:
    """Return the route dict `route_memo` publishes for a version served at `addresses`."""
    now = datetime.now(UTC)
    spec = FunctionVersionSpec(
        id=function_id,
        versionId=version_id,
        ncaId=account,
        name=name,
        description="gateway test",
        inferenceUrl=inference_url,
        health=Health(uri="/health"),
        healthUri="/health",
        createdAt=now,
    )
    deployment = None
    if deployed or draining:
        deployment = Deployment(
            deploymentId=uid("dep"),
            specifications=[
                DeploymentSpecification(
                    gpu="CPU",
                    instanceType="LOCAL.CPU",
                    minInstances=0,
                    maxInstances=4,
                    maxRequestConcurrency=concurrency,
                    backend="local",
                )
            ],
            createdAt=now,
            lastUpdatedAt=now,
            deployStartedAt=now,
            draining=draining,
        )
    state = VersionState(
        spec=spec,
        status=status,
        deployment=deployment,
        instances=[
            InstanceRecord(
                instanceId=f"{version_id}-i{n}", specIndex=0, status=InstanceStatus.RUNNING, address=address
            )
            for n, address in enumerate(addresses)
        ],
        routesVersion=routes_version,
    )
    return route_memo(state)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


class EchoProcess:
    """The echo example as a real subprocess on its own loopback address."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = free_port(host)
        env = {**os.environ, "HOST": host, "PORT": str(self.port)}
        self.proc = subprocess.Popen([sys.executable, str(ECHO)], env=env)
        self.url = f"http://{host}:{self.port}"

    def wait(self) -> EchoProcess:
        wait_listening(self.host, self.port)
        return self

    def stop(self) -> None:
        # No graceful stop: it would wait for requests the tests left sleeping in the instance.
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclass
class Recorder:
    """An in-test instance that answers with the headers and body it received."""

    url: str
    seen: list[dict[str, str]]


@dataclass
class Served:
    """A gateway served by a real uvicorn server, with an HTTP client pointed at it."""

    gateway: Gateway
    url: str
    http: httpx.AsyncClient

    def apply(self, memo: dict[str, Any]) -> None:
        self.gateway.routes.apply(memo)

    def load(self, version_id: str) -> dict[str, Any]:
        versions: dict[str, Any] = self.gateway.load_snapshot()["versions"]
        return dict(versions.get(version_id, {}))


@contextlib.asynccontextmanager
async def serve_gateway(
    settings: GatewaySettings | None = None, port: int | None = None, route_source: RouteSource | None = None
) -> AsyncIterator[Served]:
    """Serve a fresh gateway with uvicorn (httptools) on a free loopback port, on the test's loop."""
    gateway = Gateway(authenticate, settings or GatewaySettings(replica_id="test"), route_source)
    port = port or free_port()
    config = uvicorn.Config(
        gateway.asgi_app(),
        host="127.0.0.1",
        port=port,
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=30) as http:
        try:
            yield Served(gateway, url, http)
        finally:
            server.should_exit = True
            await task


def settings(**overrides: Any) -> GatewaySettings:
    return replace(GatewaySettings(replica_id="test", maintenance_interval_seconds=0.1), **overrides)


async def eventually(check: Any, timeout: float = 5.0) -> Any:
    """Wait until `check()` is truthy; fail with its last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    value = None
    while asyncio.get_running_loop().time() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met in {timeout} s; last value {value!r}")
