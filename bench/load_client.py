"""The benchmarks' load generator: keep-alive HTTP/1.1 connections sending one request back to back."""

from __future__ import annotations

import asyncio
import time
from typing import Any


class _Client(asyncio.Protocol):
    """One keep-alive connection sending the same request back to back until the deadline."""

    def __init__(self, request: bytes, latencies: list[int], stop_at: float) -> None:
        import httptools

        self.request = request
        self.latencies = latencies
        self.stop_at = stop_at
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.errors = 0
        self.sent_at = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass it
        self.fire()

    def fire(self) -> None:
        assert self.transport is not None
        if time.perf_counter() >= self.stop_at:
            self.transport.close()
            return
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() not in (200, 202):  # 202: the durable path (d)
            self.errors += 1
        else:
            self.latencies.append(time.perf_counter_ns() - self.sent_at)
        self.fire()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def run_load(
    host: str,
    port: int,
    path: str,
    concurrency: int,
    duration: float,
    warmup: float,
    key: str,
    body: bytes,
    extra: str = "",
) -> dict[str, Any]:
    """Send `body` to `path` from `concurrency` keep-alive connections; return req/s and latencies."""
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{extra}"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()

    async def phase(seconds: float, latencies: list[int]) -> tuple[float, int]:
        stop_at = time.perf_counter() + seconds
        started = time.perf_counter()
        clients = []
        for _ in range(concurrency):
            _, client = await loop.create_connection(lambda: _Client(request, latencies, stop_at), host, port)
            clients.append(client)
        await asyncio.gather(*(c.done for c in clients))
        return time.perf_counter() - started, sum(c.errors for c in clients)

    warm: list[int] = []
    await phase(warmup, warm)
    latencies: list[int] = []
    elapsed, errors = await phase(duration, latencies)
    latencies.sort()
    count = len(latencies)
    return {
        "requests": count,
        "warmup_requests": len(warm),
        "errors": errors,
        "rps": count / elapsed,
        "p50_ms": latencies[count // 2] / 1e6 if count else None,
        "p99_ms": latencies[min(count - 1, int(count * 0.99))] / 1e6 if count else None,
    }
