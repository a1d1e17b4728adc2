"""A small HTTP/1.1 keep-alive client for talking to function instances (and to peer gateways).

Why not aiohttp: on the 2-core benchmark machine, a gateway forwarding through one `aiohttp.ClientSession`
reached about half the requests per second of the same gateway forwarding through this client (see
docs/performance.md, "Invocation gateway"). The gateway needs little of a general client: one request
at a time per connection, a body it already holds in memory, the response either buffered (with a size
cap) or relayed chunk by chunk. So this client writes each request with one `transport.write` and parses
responses with httptools (the C parser uvicorn uses), which also handles chunked encoding.

It also knows exactly whether a request was sent: a failure to connect happens before any byte of the
request left the gateway (safe to retry elsewhere), anything later may have reached the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

HeaderList = list[tuple[bytes, bytes]]

_STREAM_HIGH_WATER = 1 << 20
"""Bytes of a relayed response held before reading from the instance pauses (backpressure)."""


class UpstreamError(Exception):
    """The instance did not answer.

    Attributes:
        sent: Whether the request may have reached the instance. A request that was not sent can be
            retried on another instance; one that was sent cannot (it may have run).
    """

    def __init__(self, detail: str, *, sent: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.sent = sent


class ResponseTooLarge(UpstreamError):
    """The response body exceeded the inline limit."""


class UpstreamTimeout(UpstreamError):
    """The instance did not answer before the request's deadline."""


class Endpoint:
    """Where an instance (or a peer gateway) listens, parsed once from its base URL."""

    __slots__ = ("host", "host_header", "key", "port", "ssl", "url")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Unsupported instance address {url!r}")
        self.url = url
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.ssl else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = f"{host}:{self.port}".encode()
        self.key = (self.host, self.port, self.ssl)

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r})"


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, response buffered or read chunk by chunk."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool]) -> None:
        self._pool = pool
        self.key = key
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._busy = False
        self._status = 0
        self._headers: HeaderList = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._size = 0
        self._limit: int | None = None
        self._complete = False
        self._keep_alive = False
        self._error: UpstreamError | None = None
        self._paused = False
        self.idle_since = 0.0

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:  # noqa: D102
        if not self._busy:
            # Nothing was asked: bytes on an idle connection mean it cannot be trusted for the next request.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError(f"Invalid HTTP response from the instance: {exc}", sent=True))

    def eof_received(self) -> bool:  # noqa: D102
        # Returning False closes the transport; connection_lost then settles any request in flight.
        return False

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._closed = True
        self._pool.discard(self)
        if self._busy and not self._complete and self._error is None:
            if self._status and not self._has_length():
                # A response without Content-Length or chunked encoding ends when the connection does.
                self._complete = True
            else:
                reason = f": {exc}" if exc else ""
                self._error = UpstreamError(
                    f"The instance closed the connection before answering completely{reason}", sent=True
                )
        self._wake()

    def pause_writing(self) -> None:  # noqa: D102
        # Request bodies are at most a few MiB and written at once; the kernel buffer absorbs them.
        pass

    def resume_writing(self) -> None:  # noqa: D102
        pass

    # --- httptools callbacks ----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:  # noqa: D102
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:  # noqa: D102
        status = self._parser.get_status_code()
        if status < 200:
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            self._headers = []
            return
        self._status = status
        self._wake()

    def on_body(self, body: bytes) -> None:  # noqa: D102
        if self._error is not None:
            return
        self._size += len(body)
        if self._limit is not None and self._size > self._limit:
            self.fail(
                ResponseTooLarge(
                    f"The response exceeds the inline limit of {self._limit} bytes "
                    "(NVCF-MAX-RESPONSE-SIZE-BYTES)",
                    sent=True,
                )
            )
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._limit is None and self._buffered > _STREAM_HIGH_WATER and not self._paused:
            # A relayed stream whose client reads slower than the instance writes: stop reading.
            self._paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:  # noqa: D102
        if not self._status:
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()

    # --- client side ------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Return whether the connection is open and idle."""
        return not self._closed and not self._busy and self._transport is not None

    def send(self, data: bytes, limit: int | None) -> None:
        """Write a whole request; the response body may grow to `limit` bytes (None: no limit)."""
        assert self._transport is not None
        self._busy = True
        self._status = 0
        self._headers = []
        self._chunks.clear()
        self._buffered = 0
        self._size = 0
        self._limit = limit
        self._complete = False
        self._error = None
        self._transport.write(data)

    def send_more(self, data: bytes) -> None:
        """Write more of the request (a large body after its head, without copying it)."""
        assert self._transport is not None
        self._transport.write(data)

    async def read_head(self) -> tuple[int, HeaderList]:
        """Wait for the status and headers of the response."""
        while not self._status:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._status, self._headers

    async def read_body(self) -> bytes:
        """Wait for the whole response body."""
        while not self._complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        if self._error is not None:
            raise self._error
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return body

    async def read_chunk(self) -> bytes | None:
        """Return the next part of the body as it arrives, or None once the body is complete."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            await self._wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    def stream(self) -> None:
        """Lift the size limit: the body is relayed as it arrives, never held whole."""
        self._limit = None

    def fail(self, error: UpstreamError) -> None:
        """Abort the request in flight with `error` (timeout, size limit, client gone); never reused."""
        if self._error is None and not self._complete:
            self._error = error
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        self._wake()

    def finish(self) -> None:
        """Return the connection to its pool if it can carry another request, else close it."""
        self._busy = False
        if self._complete and self._keep_alive and not self._closed and self._error is None:
            self._pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        """Close the connection."""
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def _has_length(self) -> bool:
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                return True
        return False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        await self._waiter


class UpstreamPool:
    """Idle keep-alive connections per endpoint, reused last-in first-out.

    Args:
        connect_timeout: Seconds to wait for a TCP (and TLS) connection.
        idle_seconds: A connection idle longer than this is not reused. Kept below common server
            keep-alive timeouts (uvicorn's is 5 s) so a request is not written to a connection the
            instance is closing at that very moment, which would look like a failure after sending.
    """

    def __init__(self, connect_timeout: float = 5.0, idle_seconds: float = 4.0) -> None:
        self._connect_timeout = connect_timeout
        self._idle_seconds = idle_seconds
        self._idle: dict[tuple[str, int, bool], list[UpstreamConnection]] = {}
        self._ssl: ssl_module.SSLContext | None = None
        self._closed = False

    async def acquire(self, endpoint: Endpoint) -> UpstreamConnection:
        """Return an idle connection to `endpoint`, or open one.

        Raises:
            UpstreamError: The connection could not be opened (with `sent=False`).
        """
        idle = self._idle.get(endpoint.key)
        if idle:
            oldest_usable = time.monotonic() - self._idle_seconds
            while idle:
                conn = idle.pop()
                if conn.usable and conn.idle_since >= oldest_usable:
                    return conn
                conn.close()
        return await self._connect(endpoint)

    async def _connect(self, endpoint: Endpoint) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        ssl_context: ssl_module.SSLContext | None = None
        if endpoint.ssl:
            self._ssl = self._ssl or ssl_module.create_default_context()
            ssl_context = self._ssl
        factory: Callable[[], UpstreamConnection] = lambda: UpstreamConnection(self, endpoint.key)  # noqa: E731
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    factory,
                    endpoint.host,
                    endpoint.port,
                    ssl=ssl_context,
                    server_hostname=endpoint.host if ssl_context else None,
                )
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise UpstreamError(f"Could not connect to {endpoint.url}: {reason}", sent=False) from exc
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Keep an idle connection for the next request to the same endpoint."""
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget a connection that closed."""
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def forget(self, endpoint: Endpoint) -> None:
        """Close the idle connections to an endpoint that left the routes or failed."""
        for conn in self._idle.pop(endpoint.key, []):
            conn.close()

    def prune(self) -> None:
        """Close connections idle for longer than they may be reused."""
        oldest_usable = time.monotonic() - self._idle_seconds
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if c.usable and c.idle_since >= oldest_usable]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    async def close(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        # Let the transports run their close callbacks before the loop may stop.
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
