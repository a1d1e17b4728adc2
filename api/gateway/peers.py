"""Replicas without the invocation plane: route changes sent to each peer over HTTP, and status or
position polls forwarded to the replica whose tag the request id carries.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, MutableMapping
from typing import Any

from api.gateway.asgi import FORWARDED_HEADER, _Refused
from api.gateway.dispatcher import response_headers
from api.gateway.invocations import Send
from api.gateway.settings import GatewaySettings
from api.gateway.upstream import Endpoint, UpstreamError, UpstreamPool, UpstreamTimeout

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]

ROUTES_PATH = "/internal/v1/routes"
"""Where a replica takes route changes from its peers (admin keys only)."""


async def tell_peers(
    pool: UpstreamPool, peers: Iterable[Endpoint], settings: GatewaySettings, change: dict[str, Any]
) -> None:
    """Send a route change to every peer replica (used without the plane), each within its timeout."""
    peers = list(peers)
    if peers:
        body = json.dumps(change).encode()
        await asyncio.gather(*(_tell_peer(pool, settings, peer, body) for peer in peers))


async def _tell_peer(pool: UpstreamPool, settings: GatewaySettings, peer: Endpoint, body: bytes) -> None:
    head = b"POST %s HTTP/1.1\r\nhost: %s\r\nauthorization: Bearer %s\r\n%s: 1\r\n" % (
        ROUTES_PATH.encode(),
        peer.host_header,
        settings.peer_key.encode(),
        FORWARDED_HEADER,
    )
    head += b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    try:
        conn = await pool.acquire(peer)
    except UpstreamError as exc:
        log.warning("Route change not sent to replica %s: %s", peer.url, exc.detail)
        return
    conn.send(head + body, 64 * 1024)
    timer = asyncio.get_running_loop().call_later(
        settings.peer_timeout_seconds,
        conn.fail,
        UpstreamTimeout("The replica did not acknowledge the route change", sent=True),
    )
    try:
        status, _ = await conn.read_head()
        await conn.read_body()
    except UpstreamError as exc:
        log.warning("Route change not acknowledged by replica %s: %s", peer.url, exc.detail)
        return
    finally:
        timer.cancel()
        conn.finish()
    if status != 200:
        log.warning("Replica %s refused a route change with status %d", peer.url, status)


async def forward_poll(
    pool: UpstreamPool,
    max_response_bytes: int,
    peer: Endpoint,
    scope: Scope,
    headers: dict[bytes, bytes],
    poll: int,
    send: Send,
) -> None:
    """Relay a status or position poll to the replica whose id the request id carries."""
    path: bytes = scope.get("raw_path") or scope["path"].encode()
    lines = [b"GET ", path, b" HTTP/1.1\r\nhost: ", peer.host_header, b"\r\n"]
    for name in (b"authorization", b"nvcf-poll-seconds", b"accept"):
        if name in headers:
            lines.extend((name, b": ", headers[name], b"\r\n"))
    lines.append(b"%s: 1\r\ncontent-length: 0\r\n\r\n" % FORWARDED_HEADER)
    try:
        conn = await pool.acquire(peer)
    except UpstreamError as exc:
        raise _Refused(502, f"The replica holding this request is unreachable: {exc.detail}") from None
    conn.send(b"".join(lines), max_response_bytes + 64 * 1024)
    timer = asyncio.get_running_loop().call_later(
        poll + 30,
        conn.fail,
        UpstreamTimeout("The replica holding this request did not answer", sent=True),
    )
    try:
        status, response = await conn.read_head()
        body = await conn.read_body()
    except UpstreamError as exc:
        raise _Refused(502, f"The replica holding this request failed: {exc.detail}") from None
    finally:
        timer.cancel()
        conn.finish()
    out = response_headers(response)
    out.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})
