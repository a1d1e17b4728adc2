"""The gateway's GET endpoints about requests and queues.

* GET /v2/nvcf/pexec/status/{requestId}: a request's answer, or 202 while it runs (waits up to the poll
  window);
* GET /v2/nvcf/queues/{requestId}/position: where a queued request stands;
* GET /v2/nvcf/queues/functions/{functionId}[/versions/{versionId}]: a function's queue depths;
* GET /internal/v1/load: the load report (admin keys only).

With the shared invocation plane, a request this replica does not run is looked up there (any replica
may have taken it); without it, a request another replica holds is forwarded to that replica.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from api.gateway.access import INVOKE_SCOPE, QUEUE_SCOPE, Access
from api.gateway.asgi import _headers, _Refused, send_json
from api.gateway.dispatcher import Dispatcher
from api.gateway.durable import durable_position, durable_status
from api.gateway.invocations import Invocation, Receive, Send
from api.gateway.peers import forward_poll
from api.gateway.settings import GatewaySettings
from api.gateway.upstream import Endpoint

Scope = MutableMapping[str, Any]


class Answer(Protocol):
    """Waits up to `poll` seconds for an invocation's answer and sends it, or a 202 (the gateway's)."""

    def __call__(
        self, invocation: Invocation, poll: int, send: Send, receive: Receive, *, invoking: bool
    ) -> Awaitable[None]:
        """Return the wait; `invoking` for the POST itself (a streaming client is never told 202)."""
        ...


class Queries:
    """Serves the status, position, queue-details and load endpoints.

    Args:
        access: Authenticates callers.
        dispatcher: Holds this replica's requests, answers and the plane.
        settings: Response size limit (for forwarded polls).
        peer: The replica that holds a request id, when not this one (None: this one, or the plane).
        answer: Waits for and sends a request's answer.
        load_report: Builds the load report's body from `since` and `epoch`.
    """

    def __init__(
        self,
        access: Access,
        dispatcher: Dispatcher,
        settings: GatewaySettings,
        peer: Callable[[str, dict[bytes, bytes]], Endpoint | None],
        answer: Answer,
        load_report: Callable[[int | None, str | None], dict[str, Any]],
    ) -> None:
        self._access = access
        self._dispatcher = dispatcher
        self._settings = settings
        self._peer = peer
        self._answer = answer
        self._load_report = load_report

    async def status(
        self, scope: Scope, receive: Receive, send: Send, org: str | None, request_id: str
    ) -> None:
        """Serve GET .../pexec/status/{requestId}: the answer, or 202 while it has none within the poll."""
        if scope["method"] != "GET":
            raise _Refused(405, "Status polls are GET requests", [(b"allow", b"GET")])
        headers = _headers(scope)
        principal = self._access.principal(headers.get(b"authorization"), INVOKE_SCOPE, org)
        poll = self._access.poll_seconds(headers.get(b"nvcf-poll-seconds"))
        peer = self._peer(request_id, headers)
        if peer is not None:
            await forward_poll(
                self._dispatcher.pool, self._settings.max_response_bytes, peer, scope, headers, poll, send
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

    async def position(self, scope: Scope, send: Send, org: str | None, request_id: str) -> None:
        """Serve GET .../queues/{requestId}/position: 0 running, 1.. queued (1 starts next)."""
        if scope["method"] != "GET":
            raise _Refused(405, "Queue position is a GET request", [(b"allow", b"GET")])
        headers = _headers(scope)
        principal = self._access.principal(headers.get(b"authorization"), QUEUE_SCOPE, org)
        peer = self._peer(request_id, headers)
        if peer is not None:
            await forward_poll(
                self._dispatcher.pool, self._settings.max_response_bytes, peer, scope, headers, 0, send
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

    async def queues(
        self, scope: Scope, send: Send, org: str | None, function_id: str, version_id: str | None
    ) -> None:
        """Serve GET .../queues/functions/{functionId}[/versions/{versionId}]: each version's depth."""
        if scope["method"] != "GET":
            raise _Refused(405, "Queue details are GET requests", [(b"allow", b"GET")])
        principal = self._access.principal(_headers(scope).get(b"authorization"), QUEUE_SCOPE, org)
        versions = [
            v
            for v in self._dispatcher.routes.function_versions(function_id)
            if self._access.visible(v, principal)
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

    async def load(self, scope: Scope, send: Send) -> None:
        """Serve GET /internal/v1/load[?since=G&epoch=E] (admin keys only)."""
        if scope["method"] != "GET":
            raise _Refused(405, "The load report is a GET request", [(b"allow", b"GET")])
        self._access.require_admin(scope, "The load report needs an admin key")
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        since = query.get("since", [""])[0]
        epoch = query.get("epoch", [None])[0]
        await send_json(send, 200, self._load_report(int(since) if since.isdigit() else None, epoch))
