"""The invocation gateway's HTTP face: NVCF's pexec, status and queue endpoints, served at the ASGI level.

`Gateway.handle` runs before (and instead of) FastAPI for its paths, so an invocation costs a path split,
a few dict lookups, the `Authenticate` call and the forwarding itself: no routing tables, dependency
injection or model validation per request.

Paths (each also under /v2/orgs/{org}/ and /v2/orgs/{org}/teams/{team}/, where org must be the caller's
account):

* POST /v2/nvcf/pexec/functions/{functionId}[/versions/{versionId}]  (scope invoke_function)
* GET  /v2/nvcf/pexec/status/{requestId}                            (scope invoke_function)
* GET  /v2/nvcf/queues/functions/{functionId}[/versions/{versionId}] (scope queue_details)
* GET  /v2/nvcf/queues/{requestId}/position                         (scope queue_details)

`load_report()` is the body of GET /internal/v1/load[?since=G&epoch=E], which the API serves (admin keys
only): every version's load, or only what changed since the poller's last report.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from api.gateway.asgi import (
    _DEFAULT_CONTENT_TYPE,
    _DROPPED_REQUEST_HEADERS,
    FORWARDED_HEADER,
    _drop_connection_tokens,
    _headers,
    _Refused,
    _small_int,
    _StreamKeepAlive,
    send_json,
    send_problem,
)
from api.gateway.dispatcher import Dispatcher, QueueFull
from api.gateway.durable import durable_position, durable_status, enqueue_durable
from api.gateway.invocations import (
    CLAIMED,
    CLIENT_GONE,
    DONE,
    POLL_EXPIRED,
    QUEUED,
    STREAM_BROKEN,
    STREAMED,
    Invocation,
    Receive,
    Result,
    Send,
    Waiter,
    new_request_id,
)
from api.gateway.load_report import LoadReport
from api.gateway.peers import ROUTES_PATH, forward_poll, tell_peers
from api.gateway.plane import Plane
from api.gateway.route_lookup import MissResolver, RouteSource
from api.gateway.routes import RouteTable, VersionRoute
from api.gateway.settings import GatewaySettings
from api.gateway.upstream import Endpoint
from api.observability import GatewayObserver
from api.observability.records import OUTCOME_QUEUE_FULL, OUTCOME_RATE_LIMITED
from api.principal import Authenticate, Principal

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOAD_PATH = "/internal/v1/load"
INVOKE_SCOPE = "invoke_function"
QUEUE_SCOPE = "queue_details"


def replica_tag(replica_id: str) -> str:
    """Return the 12 hex digits that request ids of `replica_id` end with."""
    return hashlib.sha256(replica_id.encode()).hexdigest()[:12]


class Gateway:
    """The data plane of one API replica: accepts invocations, queues them per version, forwards them.

    Args:
        authenticate: Turns an Authorization header into a principal; called on every request.
        settings: Limits, poll windows, result retention, this replica's id and its peers.
        route_source: Asked when an invocation misses the route table (a version the table does not
            know or does not know as invocable), before the gateway answers 404 or 400.
        observer: Told what happens to each request: metrics and request records (its own when omitted).

    Attributes:
        routes: The routing table; feed it with `apply(route_memo)` and `remove(version_id)`.
        settings: The settings in use.
    """

    def __init__(
        self,
        authenticate: Authenticate,
        settings: GatewaySettings | None = None,
        route_source: RouteSource | None = None,
        observer: GatewayObserver | None = None,
    ) -> None:
        self.settings = settings or GatewaySettings()
        self._authenticate = authenticate
        self.observer = observer if observer is not None else GatewayObserver()
        self.observer.metrics.watch_load(lambda: self.routes.load_snapshot()["versions"])
        self._dispatcher = Dispatcher(self.settings, self.observer)
        self.routes: RouteTable = self._dispatcher.routes
        self.misses: MissResolver | None = (
            MissResolver(route_source, self.routes) if route_source is not None else None
        )
        """Looks a version up at its source when an invocation misses the table (None: table only)."""
        self._load_report = LoadReport(lambda: self.routes.load_snapshot()["versions"])
        self._tag = replica_tag(self.settings.replica_id)
        self._peers: dict[str, Endpoint] = {
            replica_tag(replica_id): Endpoint(url)
            for replica_id, url in self.settings.peers.items()
            if replica_id != self.settings.replica_id
        }

    @property
    def dispatcher(self) -> Dispatcher:
        """Return the dispatcher (queues, results), for tests and diagnostics."""
        return self._dispatcher

    @property
    def plane(self) -> Plane | None:
        """Return the shared invocation plane, when one is configured (`nats_url`)."""
        return self._dispatcher.plane

    async def start(self) -> None:
        """Start the background sweeps (and join the invocation plane). Call once the event loop runs."""
        settings = self.settings
        if settings.nats_url and self._dispatcher.plane is None:
            plane = Plane(
                settings.nats_url,
                settings.replica_id,
                settings.max_queue_depth,
                settings.result_ttl_seconds,
                settings.result_retention_bytes_per_account,
                settings.request_timeout_seconds,
            )
            await plane.start()
            await plane.subscribe_routes(self._apply_change)
            self._dispatcher.plane = plane
            self.routes.leased = True
            for version in self.routes:
                for instance in version.instances.values():
                    instance.capacity = 0
                self._dispatcher.routes_changed(version)
        await self._dispatcher.start()

    async def close(self) -> None:
        """Stop: fail queued requests, end calls in flight, close connections to instances."""
        await self._dispatcher.close()
        if self._dispatcher.plane is not None:
            await self._dispatcher.plane.close()
            self._dispatcher.plane = None

    def load_snapshot(self) -> dict[str, Any]:
        """Return every routed version's queued/in-flight/ready load (the metrics' source)."""
        return self.routes.load_snapshot()

    def load_report(self, since: int | None = None, epoch: str | None = None) -> dict[str, Any]:
        """Return the body of GET /internal/v1/load: the versions whose load changed since `since`."""
        return self._load_report.report(since, epoch)

    # --- ASGI ---------------------------------------------------------------------------------------

    def asgi_app(self, fallback: ASGIApp | None = None) -> ASGIApp:
        """Return an ASGI app that serves the gateway's paths and hands every other request to `fallback`.

        Without a fallback, the app also serves GET /internal/v1/load (admin keys only), other paths are a
        404, and it runs the gateway's own lifespan (start and close); with one, lifespan events go to the
        fallback, whose lifespan must call start and close.
        """

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and await self.handle(scope, receive, send):
                return
            if fallback is None and scope["type"] == "http" and scope["path"] == LOAD_PATH:
                await self._guard(self._load(scope, send), send)
                return
            if fallback is not None:
                await fallback(scope, receive, send)
            elif scope["type"] == "http":
                await send_problem(send, 404, "Not found")
            elif scope["type"] == "lifespan":
                await self._lifespan(receive, send)

        return app

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Serve an ASGI request on the gateway's paths; for any other path send nothing, return False."""
        if scope["type"] != "http":
            return False
        path: str = scope["path"]
        if path == ROUTES_PATH:
            await self._guard(self._peer_routes(scope, receive, send), send)
            return True
        if path.startswith("/v2/"):
            parts = path.split("/")
            org: str | None = None
            if parts[2] == "orgs":
                if len(parts) < 6:
                    return False
                org = parts[3]
                rest = parts[6:] if parts[4] == "teams" else parts[4:]
            else:
                rest = parts[2:]
            count = len(rest)
            if count < 4 or rest[0] != "nvcf":
                return False
            section = rest[1]
            if section == "pexec":
                if rest[2] == "functions" and (count == 4 or (count == 6 and rest[4] == "versions")):
                    version_id = rest[5] if count == 6 else None
                    await self._guard(self._invoke(scope, receive, send, org, rest[3], version_id), send)
                    return True
                if count == 4 and rest[2] == "status":
                    await self._guard(self._status(scope, receive, send, org, rest[3]), send)
                    return True
            elif section == "queues":
                if rest[2] == "functions" and (count == 4 or (count == 6 and rest[4] == "versions")):
                    version_id = rest[5] if count == 6 else None
                    await self._guard(self._queues(scope, send, org, rest[3], version_id), send)
                    return True
                if count == 4 and rest[3] == "position":
                    await self._guard(self._position(scope, send, org, rest[2]), send)
                    return True
            return False
        return False

    async def _guard(self, handler: Awaitable[None], send: Send) -> None:
        # Expected refusals become problem details; anything else is logged and, if nothing was sent
        # yet, answered with a 500 problem (uvicorn would otherwise answer a bare text 500).
        try:
            await handler
        except _Refused as refused:
            await send_problem(send, refused.status, refused.detail, refused.headers, refused.request_id)
        except Exception:
            log.exception("Gateway request failed")
            # Fails if the response had started; the server then closes the connection instead.
            with contextlib.suppress(Exception):
                await send_problem(send, 500, "The gateway failed while handling the request")

    # --- shared checks ------------------------------------------------------------------------------

    def _principal(self, authorization: bytes | None, scope_name: str, org: str | None) -> Principal:
        principal = self._authenticate(authorization.decode("latin-1") if authorization is not None else None)
        if principal is None:
            detail = (
                "Header of type `authorization` was missing"
                if authorization is None
                else "Unauthorized access"
            )
            raise _Refused(401, detail, [(b"www-authenticate", b"Bearer")])
        if not principal.allows(scope_name):
            raise _Refused(403, f"The key does not carry the '{scope_name}' scope")
        if org is not None and org != principal.account and not principal.admin:
            raise _Refused(403, f"The key does not belong to organization '{org}'")
        return principal

    def _admit(self, version: VersionRoute, principal: Principal, invocation: Invocation) -> None:
        """Count the invocation against the version's rate limit; refuse it (429) when over."""
        limit = version.rate_limit
        assert limit is not None
        retry = limit.admit(principal.account, principal.key_id, time.monotonic_ns())
        if retry is not None:
            self.observer.refused(invocation, OUTCOME_RATE_LIMITED)  # observability hook
            raise _Refused(
                429,
                f"Rate limit of function version '{version.version_id}' exceeded ({limit.text}); "
                f"retry after {retry} s",
                [(b"retry-after", str(retry).encode())],
            )

    def _poll_seconds(self, raw: bytes | None) -> int:
        if raw is None:
            return self.settings.default_poll_seconds
        value = _small_int(raw.strip())
        if value is None or value > self.settings.max_poll_seconds:
            raise _Refused(
                400,
                "NVCF-POLL-SECONDS must be a whole number of seconds "
                f"from 0 to {self.settings.max_poll_seconds}",
            )
        return value

    @staticmethod
    def _visible(version: VersionRoute, principal: Principal) -> bool:
        return principal.admin or version.account_id == principal.account

    def _select(self, principal: Principal, function_id: str, version_id: str | None) -> VersionRoute:
        """Return the version to invoke: the pinned one, or a random invocable one of the function."""
        if version_id is None:
            siblings = self.routes.function_versions(function_id)
            if len(siblings) == 1:
                # The common case: one version, visible and invocable.
                only = siblings[0]
                if only.invocable and (only.account_id == principal.account or principal.admin):
                    return only
            candidates = [v for v in siblings if self._visible(v, principal)]
            invocable = [v for v in candidates if v.invocable]
            if len(invocable) == 1:
                return invocable[0]
            if invocable:
                return random.choice(invocable)
            if any(v.degraded for v in candidates):
                raise _Refused(400, f"Function id '{function_id}': DEGRADED function cannot be invoked")
            raise _Refused(
                404,
                f"Function id '{function_id}': Specified function in account "
                f"'{principal.account}' is not found",
            )
        version = self.routes.get(version_id)
        if version is None or version.function_id != function_id or not self._visible(version, principal):
            raise _Refused(
                404,
                f"Function id '{function_id}' version '{version_id}': Specified function in account "
                f"'{principal.account}' is not found",
            )
        if not version.invocable:
            if version.degraded:
                raise _Refused(
                    400,
                    f"Function id '{function_id}' version '{version_id}': "
                    "DEGRADED function cannot be invoked",
                )
            raise _Refused(
                404,
                f"Function id '{function_id}' version '{version_id}': Specified function in account "
                f"'{principal.account}' is not found (status {version.status})",
            )
        return version

    # --- invocation ---------------------------------------------------------------------------------

    async def _invoke(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        org: str | None,
        function_id: str,
        version_id: str | None,
    ) -> None:
        if scope["method"] != "POST":
            raise _Refused(405, "Invocations are POST requests", [(b"allow", b"POST")])
        authorization: bytes | None = None
        poll_raw: bytes | None = None
        length_raw: bytes | None = None
        accept_stream = False
        has_content_type = False
        connection_tokens: bytes | None = None
        forwarded: list[bytes] = []
        dropped = _DROPPED_REQUEST_HEADERS
        for name, value in scope["headers"]:
            if name in dropped:
                if name == b"authorization":
                    authorization = value
                elif name == b"nvcf-poll-seconds":
                    poll_raw = value
                elif name == b"content-length":
                    length_raw = value
                elif name == b"connection":
                    connection_tokens = value
                continue
            if name == b"accept":
                accept_stream = b"text/event-stream" in value
            elif name == b"content-type":
                has_content_type = True
            forwarded.extend((name, b": ", value, b"\r\n"))
        principal = self._principal(authorization, INVOKE_SCOPE, org)
        try:
            version = self._select(principal, function_id, version_id)
        except _Refused:
            if self.misses is None:
                raise
            # The table may lag the lifecycle: ask the source once, then decide on what it said.
            arrived = time.monotonic()
            if version_id is None:
                await self.misses.resolve_function(function_id, arrived)
            else:
                await self.misses.resolve_version(function_id, version_id, arrived)
            version = self._select(principal, function_id, version_id)
        poll = self._poll_seconds(poll_raw)
        limit = self.settings.max_request_bytes
        if length_raw is not None:
            length = _small_int(length_raw)
            if length is None:
                if not length_raw.isdigit():
                    raise _Refused(400, "Invalid Content-Length")
                length = limit + 1  # more digits than any accepted size has
            if length > limit:
                raise _Refused(413, f"The request body exceeds {limit} bytes; pass large inputs as assets")
        body = await self._read_body(receive, limit)
        if body is None:
            return  # the client left while sending
        if connection_tokens is not None:
            forwarded = _drop_connection_tokens(forwarded, connection_tokens)
        if not has_content_type:
            forwarded.append(_DEFAULT_CONTENT_TYPE)
        invocation = Invocation(
            new_request_id(self._tag),
            version,
            principal.account,
            principal.key_id.encode(),
            body,
            b"".join(forwarded),
            accept_stream,
            self.settings.request_timeout_seconds,
        )
        self.observer.received(invocation, not version.active)  # observability hook
        if version.rate_limit is not None:
            # Counted last, so a request refused for another reason uses none of the caller's rate.
            self._admit(version, principal, invocation)
        plane = self._dispatcher.plane
        if plane is not None and not accept_stream:
            if not self._dispatcher.try_start(invocation):
                try:
                    await enqueue_durable(plane, self._dispatcher, self.settings, invocation)
                except _Refused:
                    self.observer.refused(invocation, OUTCOME_QUEUE_FULL)  # observability hook
                    raise
            self.observer.accepted(invocation)  # observability hook
            await self._answer(invocation, poll, send, receive, invoking=True)
            return
        try:
            self._dispatcher.submit(invocation)
        except QueueFull:
            self.observer.refused(invocation, OUTCOME_QUEUE_FULL)  # observability hook
            raise _Refused(
                429,
                f"The queue of function version '{version.version_id}' is full "
                f"({self.settings.max_queue_depth} requests waiting)",
            ) from None
        self.observer.accepted(invocation)  # observability hook
        await self._answer(invocation, poll, send, receive, invoking=True)

    @staticmethod
    async def _read_body(receive: Receive, limit: int) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise _Refused(
                        413, f"The request body exceeds {limit} bytes; pass large inputs as assets"
                    )
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def _answer(
        self, invocation: Invocation, poll: int, send: Send, receive: Receive, *, invoking: bool
    ) -> None:
        """Wait up to `poll` seconds for the answer; send it, or a 202 that tells the client to poll.

        An invoking client that accepts an event stream is never told to poll (NVCF's streaming clients
        cannot follow a 202): it waits for its instance and first byte as long as the request may take,
        the dispatcher answering 504 at the request's deadline. While it waits, SSE comments keep its
        connection busy after `stream_keepalive_seconds` (proxies cut idle connections).
        """
        streaming = invoking and invocation.accept_stream
        if (poll > 0 or streaming) and invocation.state != DONE:
            loop = asyncio.get_running_loop()
            keepalive: _StreamKeepAlive | None = None
            if streaming and self.settings.stream_keepalive_seconds > 0:
                interval = self.settings.stream_keepalive_seconds
                keepalive = _StreamKeepAlive(send, interval, invocation.id_bytes)
            waiter = Waiter(
                loop.create_future(), (keepalive.send if keepalive else send) if streaming else None, receive
            )
            invocation.waiters.append(waiter)
            if not streaming:
                waiter.timer = loop.call_later(poll, waiter.wake, POLL_EXPIRED)
            watcher: asyncio.Task[None] | None = None
            if not invoking or invocation.state == QUEUED:
                # A status poll whose client leaves must not take the answer with it (it is returned
                # once); a request that has not started leaves its queue with its client. One that runs
                # finishes, its answer going nowhere: nobody was told its id.
                watcher = loop.create_task(self._watch_client(invocation, receive, waiter, invoking))
            try:
                outcome = await waiter.future
            finally:
                if watcher is not None:
                    watcher.cancel()
                if waiter.timer is not None:
                    waiter.timer.cancel()
                if keepalive is not None:
                    keepalive.stop()
            if keepalive is not None and keepalive.started and isinstance(outcome, Result):
                await keepalive.finish(outcome)
                return
            if isinstance(outcome, Result):
                await outcome.send(send)
                return
            if outcome is STREAMED or outcome is CLIENT_GONE:
                return
            if outcome is STREAM_BROKEN:
                # The stream's headers went out: end without completing the response, so the client sees
                # a broken transfer rather than a clean end of stream.
                return
            if outcome is CLAIMED:
                raise _Refused(
                    404,
                    f"Request id '{invocation.id}': the result was returned to another poll",
                    request_id=invocation.id,
                )
            if waiter in invocation.waiters:
                invocation.waiters.remove(waiter)
        plane = self._dispatcher.plane
        if plane is not None and not invocation.durable and invocation.state != DONE:
            # About to be told 202: from now on any replica must be able to answer its poll.
            invocation.durable = True
            await plane.mark_running(invocation)
        if invocation.state == DONE:
            # Finished between the poll window's end and now: the answer waits in the store.
            result = self._dispatcher.results.take(invocation.id, None)
            if result is not None:
                if plane is not None:
                    plane.spawn(plane.mark_returned(invocation.id))
                await result.send(send)
                return
        invocation.detached = True
        if invocation.state != DONE:
            self._dispatcher.pending[invocation.id] = invocation
        await send(
            {"type": "http.response.start", "status": 202, "headers": invocation.in_progress_headers()}
        )
        await send({"type": "http.response.body", "body": b""})

    async def _watch_client(
        self, invocation: Invocation, receive: Receive, waiter: Waiter, invoking: bool
    ) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if waiter.future.done():
            return
        if not invoking:
            if waiter in invocation.waiters:
                invocation.waiters.remove(waiter)
            waiter.wake(CLIENT_GONE)
        elif self._dispatcher.cancel_queued(invocation):
            log.info("Invocation %s left the queue: its client disconnected", invocation.id)
            waiter.wake(CLIENT_GONE)

    # --- status and queues --------------------------------------------------------------------------

    async def _status(
        self, scope: Scope, receive: Receive, send: Send, org: str | None, request_id: str
    ) -> None:
        if scope["method"] != "GET":
            raise _Refused(405, "Status polls are GET requests", [(b"allow", b"GET")])
        headers = _headers(scope)
        principal = self._principal(headers.get(b"authorization"), INVOKE_SCOPE, org)
        poll = self._poll_seconds(headers.get(b"nvcf-poll-seconds"))
        peer = self._peer(request_id, headers)
        if peer is not None:
            await forward_poll(
                self._dispatcher.pool, self.settings.max_response_bytes, peer, scope, headers, poll, send
            )
            return
        account = None if principal.admin else principal.account
        result = self._dispatcher.results.take(request_id, account)
        if result is not None:
            await result.send(send)
            return
        invocation = self._dispatcher.pending.get(request_id)
        plane = self._dispatcher.plane
        if plane is not None and (invocation is None or invocation.instance is None):
            # Not running here: the shared plane knows where it stands, whichever replica took it.
            await durable_status(plane, request_id, account, poll, send)
            return
        if invocation is None or (account is not None and invocation.account != account):
            raise _Refused(
                404,
                f"Request id '{request_id}' not found (unknown, expired or already returned)",
                request_id=request_id,
            )
        await self._answer(invocation, poll, send, receive, invoking=False)

    async def _position(self, scope: Scope, send: Send, org: str | None, request_id: str) -> None:
        if scope["method"] != "GET":
            raise _Refused(405, "Queue position is a GET request", [(b"allow", b"GET")])
        headers = _headers(scope)
        principal = self._principal(headers.get(b"authorization"), QUEUE_SCOPE, org)
        peer = self._peer(request_id, headers)
        if peer is not None:
            await forward_poll(
                self._dispatcher.pool, self.settings.max_response_bytes, peer, scope, headers, 0, send
            )
            return
        invocation = self._dispatcher.pending.get(request_id)
        plane = self._dispatcher.plane
        if plane is not None and (invocation is None or invocation.durable):
            record, place = await durable_position(
                plane, request_id, None if principal.admin else principal.account
            )
            body = {
                "functionId": record.function_id,
                "functionVersionId": record.version_id,
                "positionInQueue": place,
            }
            await send_json(send, 200, body)
            return
        position = None
        if invocation is not None and (principal.admin or invocation.account == principal.account):
            position = self._dispatcher.position(invocation)
        if invocation is None or position is None:
            detail = f"Request id '{request_id}' is not in pending or in progress state"
            raise _Refused(404, detail, request_id=request_id)
        await send_json(
            send,
            200,
            {
                "functionId": invocation.version.function_id,
                "functionVersionId": invocation.version.version_id,
                "positionInQueue": position,
            },
        )

    async def _queues(
        self, scope: Scope, send: Send, org: str | None, function_id: str, version_id: str | None
    ) -> None:
        if scope["method"] != "GET":
            raise _Refused(405, "Queue details are GET requests", [(b"allow", b"GET")])
        principal = self._principal(_headers(scope).get(b"authorization"), QUEUE_SCOPE, org)
        versions = [
            v
            for v in self.routes.function_versions(function_id)
            if self._visible(v, principal)
            and (v.deployed or v.queue)
            and (version_id is None or v.version_id == version_id)
        ]
        if not versions:
            raise _Refused(404, "Queue not found - Function is likely not deployed")
        plane = self._dispatcher.plane
        shared = [await plane.queue_depth(v.version_id) if plane else 0 for v in versions]
        await send_json(
            send,
            200,
            {
                "functionId": function_id,
                "queues": [
                    {
                        "functionVersionId": v.version_id,
                        "functionName": v.function_name,
                        "functionStatus": v.status,
                        "queueDepth": len(v.queue) + depth,
                    }
                    for v, depth in zip(versions, shared, strict=True)
                ],
            },
        )

    def _require_admin(self, scope: Scope, refusal: str) -> None:
        """Refuse the request (401, or 403 with `refusal`) unless it carries an admin key."""
        authorization = _headers(scope).get(b"authorization")
        principal = self._authenticate(authorization.decode("latin-1") if authorization is not None else None)
        if principal is None:
            raise _Refused(401, "Unauthorized access", [(b"www-authenticate", b"Bearer")])
        if not principal.admin:
            raise _Refused(403, refusal)

    async def _load(self, scope: Scope, send: Send) -> None:
        if scope["method"] != "GET":
            raise _Refused(405, "The load report is a GET request", [(b"allow", b"GET")])
        self._require_admin(scope, "The load report needs an admin key")
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        since = query.get("since", [""])[0]
        epoch = query.get("epoch", [None])[0]
        await send_json(send, 200, self.load_report(int(since) if since.isdigit() else None, epoch))

    # --- route changes shared with the other replicas --------------------------------------------------

    async def publish_route(self, route: Mapping[str, Any]) -> None:
        """Apply a version's new route here and on every peer replica, then return.

        The management API calls it after each change it made (deploy, update, undeploy), so that once
        the change is answered every replica routes by the new entry: none sends new requests to a
        version that was undeployed. A peer that does not answer within `peer_timeout_seconds` catches up
        through its visibility poll (a replica that is down serves nothing meanwhile).
        """
        self.routes.apply(route)
        await self._broadcast({"apply": dict(route)})

    async def withdraw_route(self, version_id: str) -> None:
        """Forget a (deleted) version here and on every peer replica, then return."""
        self.routes.remove(version_id)
        await self._broadcast({"remove": version_id})

    async def _broadcast(self, change: dict[str, Any]) -> None:
        plane = self._dispatcher.plane
        if plane is None:
            await tell_peers(self._dispatcher.pool, self._peers.values(), self.settings, change)
            return
        try:
            await plane.publish_route_change(change)
        except Exception as exc:
            log.warning("Route change not broadcast (replicas catch up by their poll): %r", exc)

    def _apply_change(self, change: dict[str, Any]) -> None:
        """Apply a route change another replica broadcast."""
        if isinstance(change.get("apply"), dict):
            self.routes.apply(change["apply"])
        elif isinstance(change.get("remove"), str):
            self.routes.remove(change["remove"])

    async def _peer_routes(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Apply a route change sent by a peer replica (POST /internal/v1/routes, admin keys only)."""
        if scope["method"] != "POST":
            raise _Refused(405, "Route changes are POST requests", [(b"allow", b"POST")])
        self._require_admin(scope, "Route changes need an admin key")
        body = await self._read_body(receive, self.settings.max_request_bytes)
        if body is None:
            return
        try:
            change = json.loads(body)
            if not isinstance(change, dict):
                raise ValueError("not an object")
            if isinstance(change.get("apply"), dict):
                self.routes.apply(change["apply"])
            elif isinstance(change.get("remove"), str):
                self.routes.remove(change["remove"])
            else:
                raise ValueError("expected {'apply': route} or {'remove': versionId}")
        except (ValueError, KeyError, TypeError) as err:
            raise _Refused(400, f"Invalid route change: {err}") from None
        await send_json(send, 200, {"applied": True})

    # --- forwarding to the replica that holds a request ----------------------------------------------

    def _peer(self, request_id: str, headers: dict[bytes, bytes]) -> Endpoint | None:
        if self._dispatcher.plane is not None:
            return None  # every replica reads the shared plane: nothing to forward
        tag = request_id.rpartition("-")[2]
        if tag == self._tag or FORWARDED_HEADER in headers:
            return None
        return self._peers.get(tag)
