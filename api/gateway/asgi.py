"""What the gateway's ASGI handlers share: JSON and problem answers, refusals, header helpers, and the
SSE keep-alive of a waiting stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

from api.gateway.invocations import HeaderList, Result, Send
from api.problems import PROBLEM_CONTENT_TYPE, problem_bytes

FORWARDED_HEADER = b"x-gpufn-forwarded"
"""Marks a status or position poll forwarded by another replica (never forwarded again)."""

_JSON = (b"content-type", b"application/json")
_PROBLEM = (b"content-type", PROBLEM_CONTENT_TYPE.encode())
_DEFAULT_CONTENT_TYPE = b"content-type: application/json\r\n"

# Client headers that never reach the instance: hop-by-hop ones, those the gateway sets itself, the
# caller's key, and the NVCF headers the platform owns (reference 5.8).
_DROPPED_REQUEST_HEADERS = frozenset(
    {
        b"authorization",
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"host",
        b"content-length",
        b"nvcf-reqid",
        b"nvcf-sub",
        b"nvcf-ncaid",
        b"nvcf-function-name",
        b"nvcf-function-id",
        b"nvcf-function-version-id",
        b"nvcf-asset-dir",
        b"nvcf-large-output-dir",
        b"nvcf-max-response-size-bytes",
        b"nvcf-nspectid",
        b"nvcf-backend",
        b"nvcf-instancetype",
        b"nvcf-region",
        b"nvcf-env",
        b"nvcf-invocation-region",
        b"nvcf-poll-seconds",
        b"nvcf-function-asset-ids",
        FORWARDED_HEADER,
    }
)


async def send_json(send: Send, status: int, body: Any, headers: HeaderList | None = None) -> None:
    """Send a JSON answer."""
    data = json.dumps(body).encode()
    out = [_JSON, (b"content-length", b"%d" % len(data))]
    if headers:
        out.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": data})


async def send_problem(
    send: Send, status: int, detail: str, headers: HeaderList | None = None, request_id: str | None = None
) -> None:
    """Send a problem-details answer; `request_id` names the request it is about, when there is one."""
    extra = {"requestId": request_id} if request_id else {}
    data = problem_bytes(status, detail, **extra)
    out = [_PROBLEM, (b"content-length", b"%d" % len(data))]
    if headers:
        out.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": data})


class _Refused(Exception):
    """An expected refusal, answered with problem details."""

    def __init__(
        self, status: int, detail: str, headers: HeaderList | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers
        self.request_id = request_id


class _StreamKeepAlive:
    """Keeps a waiting event-stream client's connection busy with SSE comments until its answer comes.

    After `interval` seconds without an answer it starts the response (200, `text/event-stream`) and
    sends a comment line every `interval` seconds. The dispatcher relays the instance's stream through
    `send`, which stops the comments and drops the relay's own response start once one went out; an
    answer that is not a stream ends a started response as one SSE event (`event: error` for a status of
    400 and above).
    """

    def __init__(self, send: Send, interval: float, request_id: bytes) -> None:
        self._send = send
        self._request_id = request_id
        self.started = False
        self._relaying = False
        self._task = asyncio.get_running_loop().create_task(self._run(interval))

    async def _run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self._relaying:
                return
            if not self.started:
                self.started = True
                headers = [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                    (b"nvcf-reqid", self._request_id),
                    (b"access-control-expose-headers", b"nvcf-reqid"),
                ]
                await self._send({"type": "http.response.start", "status": 200, "headers": headers})
            await self._send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})

    async def send(self, message: MutableMapping[str, Any]) -> None:
        """Relay the instance's stream: stop the comments; skip the response start if one went out."""
        if not self._relaying:
            self._relaying = True
            self._task.cancel()
        if message["type"] == "http.response.start" and self.started:
            return
        await self._send(message)

    def stop(self) -> None:
        """Send no more comments."""
        self._task.cancel()

    async def finish(self, result: Result) -> None:
        """End the started stream with an answer that is not a stream, as one SSE event."""
        lines = result.body.replace(b"\r\n", b"\n").split(b"\n")
        event = b"event: error\n" if result.status >= 400 else b""
        data = b"".join(b"data: %s\n" % line for line in lines)
        await self._send({"type": "http.response.body", "body": event + data + b"\n", "more_body": False})


def _small_int(value: bytes) -> int | None:
    """Return the ASCII decimal `value` as an int; None for anything else, or for over 15 digits."""
    if not value.isdigit() or len(value) > 15:
        return None
    return int(value)


def _headers(scope: MutableMapping[str, Any]) -> dict[bytes, bytes]:
    return dict(scope["headers"])


def _drop_connection_tokens(forwarded: list[bytes], tokens: bytes) -> list[bytes]:
    """Remove the headers that the client's Connection header names (hop-by-hop by declaration)."""
    names = {t.strip().lower() for t in tokens.split(b",")} - {b"close", b"keep-alive", b""}
    if not names:
        return forwarded
    kept: list[bytes] = []
    for index in range(0, len(forwarded), 4):
        if forwarded[index] not in names:
            kept.extend(forwarded[index : index + 4])
    return kept
