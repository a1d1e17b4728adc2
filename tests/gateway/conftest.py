"""Fixtures of the gateway tests (see helpers.py for what is real and what is mocked)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web

from tests.gateway.helpers import EchoProcess, Recorder, Served, free_port, serve_gateway, settings


@pytest.fixture(scope="session")
def echo_urls() -> Iterator[list[str]]:
    """Two echo instances, started once for the session."""
    procs = [EchoProcess("127.0.21.1"), EchoProcess("127.0.21.2")]
    try:
        for proc in procs:
            proc.wait()
        yield [p.url for p in procs]
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def dead_url() -> str:
    """An address where nothing listens (connections are refused)."""
    return f"http://127.0.21.9:{free_port('127.0.21.9')}"


@pytest.fixture(scope="session")
async def recorder() -> AsyncIterator[Recorder]:
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        seen.append(headers)
        if request.query.get("fail") == "text":
            return web.Response(status=500, text="it broke")
        return web.json_response({"headers": headers, "body": body.decode(errors="replace")})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/record", record)
    runner = web.AppRunner(app)
    await runner.setup()
    host = "127.0.21.3"
    port = free_port(host)
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        yield Recorder(f"http://{host}:{port}", seen)
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
async def gw() -> AsyncIterator[Served]:
    """The gateway most tests share (default settings, short maintenance interval)."""
    async with serve_gateway(settings(maintenance_interval_seconds=0.2)) as served:
        yield served
