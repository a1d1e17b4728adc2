"""One invocation's life in the gateway, its answer, and the store of answers waiting for their poll."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from api.problems import PROBLEM_CONTENT_TYPE, problem_bytes

if TYPE_CHECKING:
    from api.gateway.routes import Instance, VersionRoute
    from api.observability.records import RequestRecord

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
HeaderList = list[tuple[bytes, bytes]]

FULFILLED = b"fulfilled"
IN_PROGRESS = b"in-progress"
ERRORED = b"errored"

QUEUED = 0
RUNNING = 1
DONE = 2
CANCELLED = 3

_REQID = b"nvcf-reqid"
_STATUS = b"nvcf-status"
_EXPOSE = (b"access-control-expose-headers", b"nvcf-reqid")
_PROBLEM_TYPE = (b"content-type", PROBLEM_CONTENT_TYPE.encode())

RESULT_OVERHEAD_BYTES = 512
"""What a stored result costs besides its body (headers, bookkeeping), for the memory bound."""


class Result:
    """A finished answer, ready to send: status, every header (NVCF ones included) and body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: HeaderList, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def size(self) -> int:
        """Return roughly the memory this answer holds."""
        return len(self.body) + RESULT_OVERHEAD_BYTES

    async def send(self, send: Send) -> None:
        """Send the answer on an ASGI connection."""
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


class Outcome:
    """What a waiting handler is woken with besides a `Result`."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Outcome({self.name})"


POLL_EXPIRED = Outcome("poll-expired")
"""The poll window ended first: answer 202."""
STREAMED = Outcome("streamed")
"""The answer was relayed as a stream on the handler's connection: nothing left to send."""
STREAM_BROKEN = Outcome("stream-broken")
"""A relayed stream broke after it started: the handler must end without completing the response."""
CLAIMED = Outcome("claimed")
"""Another poll of the same request took the answer."""
CLIENT_GONE = Outcome("client-gone")
"""The client disconnected before the request started; it left the queue."""


class Waiter:
    """A handler waiting for an invocation's answer (the invoking POST, or a status poll)."""

    __slots__ = ("future", "receive", "send", "timer")

    def __init__(
        self,
        future: asyncio.Future[Result | Outcome],
        send: Send | None = None,
        receive: Receive | None = None,
    ) -> None:
        self.future = future
        self.send = send
        """Set for the invoking POST of a client that accepts a stream: where to relay it."""
        self.receive = receive
        self.timer: asyncio.TimerHandle | None = None

    def wake(self, outcome: Result | Outcome) -> bool:
        """Hand the outcome to the handler; return False when it no longer waits."""
        if self.future.done():
            return False
        if self.timer is not None:
            self.timer.cancel()
        self.future.set_result(outcome)
        return True


class Invocation:
    """One request from its arrival until its answer is delivered, dropped, or expires."""

    __slots__ = (
        "accept_stream",
        "account",
        "attempts",
        "body",
        "client_headers",
        "created",
        "deadline",
        "detached",
        "durable",
        "fetched",
        "id",
        "id_bytes",
        "instance",
        "observed",
        "state",
        "subject",
        "version",
        "waiters",
    )

    def __init__(
        self,
        request_id: str,
        version: VersionRoute,
        account: str,
        subject: bytes,
        body: bytes,
        client_headers: bytes,
        accept_stream: bool,
        timeout: float,
    ) -> None:
        self.id = request_id
        self.id_bytes = request_id.encode()
        self.version = version
        self.account = account
        self.subject = subject
        self.body = body
        self.client_headers = client_headers
        """The client's headers to forward, already filtered and serialized."""
        self.accept_stream = accept_stream
        self.created = time.monotonic()
        self.deadline = self.created + timeout
        self.state = QUEUED
        self.attempts = 0
        self.instance: Instance | None = None
        self.waiters: list[Waiter] = []
        self.detached = False
        """A 202 told the client its id: the answer is kept for a poll when nobody waits."""
        self.observed: RequestRecord | None = None
        """Its request record, kept by the gateway's observer (metrics, GET /v2/gpufn/requests/{id})."""

        self.durable = False
        """Its record is in the invocation plane: its answer is persisted there, not kept in memory."""
        self.fetched: Any = None
        """The plane's `QueuedRequest` it was pulled as, until it is claimed (started) by this replica."""

    def ncaid_headers(self) -> bytes:
        """Return the per-request NVCF header lines that name the request and its caller."""
        return b"nvcf-reqid: %s\r\nnvcf-ncaid: %s\r\nnvcf-sub: %s\r\n" % (
            self.id_bytes,
            self.account.encode(),
            self.subject,
        )

    def answer(self, status: int, headers: HeaderList, body: bytes, nvcf_status: bytes) -> Result:
        """Return a result carrying this request's NVCF-REQID and NVCF-STATUS."""
        headers.append((_REQID, self.id_bytes))
        headers.append((_STATUS, nvcf_status))
        headers.append(_EXPOSE)
        headers.append((b"content-length", b"%d" % len(body)))
        return Result(status, headers, body)

    def problem(self, status: int, detail: str) -> Result:
        """Return an errored answer raised by the gateway itself (problem details)."""
        body = problem_bytes(status, detail, self.id, requestId=self.id)
        return self.answer(status, [_PROBLEM_TYPE], body, ERRORED)

    def instance_error(self, status: int, body: bytes) -> Result:
        """Re-wrap an instance's error answer as NVCF does (reference 5.5), keeping the function's message.

        The detail is the JSON body's `error` (NVCF) or `detail` (FastAPI and others) member: a string as
        it is, an object or a list as compact JSON; "Inference error" when the body has neither.
        """
        detail = _error_message(body) or "Inference error"
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown Error"
        kind = phrase.lower().replace(" ", "-").replace("'", "")
        problem = {
            "type": f"urn:inference-service:problem-details:{kind}",
            "title": phrase,
            "status": status,
            "detail": detail,
            "requestId": self.id,
        }
        return self.answer(status, [_PROBLEM_TYPE], json.dumps(problem).encode(), ERRORED)

    def in_progress_headers(self) -> HeaderList:
        """Return the headers of a 202 for this request."""
        return [(_REQID, self.id_bytes), (_STATUS, IN_PROGRESS), _EXPOSE, (b"content-length", b"0")]


MAX_ERROR_DETAIL = 4096
"""Longest function error message carried into the problem's detail (characters)."""


def _error_message(body: bytes) -> str | None:
    """Return the message of a function's JSON error body (`error` or `detail`), or None."""
    if body[:1] != b"{":
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    for key in ("error", "detail"):
        value = parsed.get(key)
        if isinstance(value, str) and value:
            return value[:MAX_ERROR_DETAIL]
        if isinstance(value, (dict, list)) and value:
            return json.dumps(value, separators=(",", ":"))[:MAX_ERROR_DETAIL]
    return None


class _Stored:
    __slots__ = ("account", "expires", "function_id", "result", "version_id")

    def __init__(self, result: Result, invocation: Invocation, expires: float) -> None:
        self.result = result
        self.account = invocation.account
        self.function_id = invocation.version.function_id
        self.version_id = invocation.version.version_id
        self.expires = expires


class ResultStore:
    """Answers that finished after their client was told to poll, kept until polled, expired or evicted.

    Args:
        ttl: Seconds an answer waits for its poll.
        max_bytes: Memory bound; storing beyond it evicts the oldest answers first.
    """

    def __init__(self, ttl: float, max_bytes: int) -> None:
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._items: OrderedDict[str, _Stored] = OrderedDict()
        self._bytes = 0
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._items

    @property
    def bytes(self) -> int:
        """Return the memory the stored answers hold, as counted against the bound."""
        return self._bytes

    def put(self, invocation: Invocation, result: Result) -> None:
        """Keep an answer for its poll."""
        self._items[invocation.id] = _Stored(result, invocation, time.monotonic() + self._ttl)
        self._bytes += result.size
        while self._bytes > self._max_bytes and self._items:
            _, oldest = self._items.popitem(last=False)
            self._bytes -= oldest.result.size
            self.evicted += 1

    def take(self, request_id: str, account: str | None) -> Result | None:
        """Remove and return the answer, if it is there, unexpired, and `account`'s (None: any)."""
        stored = self._items.get(request_id)
        if stored is None or (account is not None and stored.account != account):
            return None
        del self._items[request_id]
        self._bytes -= stored.result.size
        if stored.expires < time.monotonic():
            self.expired += 1
            return None
        return stored.result

    def owner(self, request_id: str) -> tuple[str, str, str] | None:
        """Return (account, function id, version id) of a stored answer."""
        stored = self._items.get(request_id)
        return None if stored is None else (stored.account, stored.function_id, stored.version_id)

    def expire(self) -> None:
        """Drop answers whose time is up (oldest first: they were stored in expiry order)."""
        now = time.monotonic()
        items = self._items
        while items:
            request_id, stored = next(iter(items.items()))
            if stored.expires >= now:
                break
            del items[request_id]
            self._bytes -= stored.result.size
            self.expired += 1


def new_request_id(tag: str) -> str:
    """Return a random UUID-shaped (version 4) request id whose last group is the replica's tag."""
    rand = os.urandom(9).hex()
    variant = "89ab"[int(rand[15], 16) & 3]
    return f"{rand[:8]}-{rand[8:12]}-4{rand[12:15]}-{variant}{rand[16:]}{rand[15]}-{tag}"
