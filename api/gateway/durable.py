"""The gateway's side of the shared invocation plane: putting a request in the shared queue, relaying a
result another replica produced to a client waiting here, and answering status and position polls from
the plane's records (any replica answers any poll).
"""

from __future__ import annotations

import asyncio
import time

from api.gateway.asgi import _Refused
from api.gateway.dispatcher import Dispatcher
from api.gateway.invocations import DONE, Invocation, Send
from api.gateway.plane import CANCELLED as RECORD_CANCELLED
from api.gateway.plane import DONE as RECORD_DONE
from api.gateway.plane import QUEUED as RECORD_QUEUED
from api.gateway.plane import RETURNED as RECORD_RETURNED
from api.gateway.plane import RUNNING as RECORD_RUNNING
from api.gateway.plane import Plane, PlaneQueueFull, Record, failure_result
from api.gateway.settings import GatewaySettings


async def enqueue_durable(
    plane: Plane, dispatcher: Dispatcher, settings: GatewaySettings, invocation: Invocation
) -> None:
    """Persist a request that must wait in its version's shared queue, before it waits or is told 202."""
    version = invocation.version
    try:
        await plane.enqueue(invocation, settings.request_timeout_seconds)
    except PlaneQueueFull:
        raise _Refused(
            429,
            f"The queue of function version '{version.version_id}' is full "
            f"({settings.max_queue_depth} requests waiting)",
        ) from None
    invocation.durable = True
    version.backlog = True
    version.durable_waiting += 1
    dispatcher.wanted(version)
    dispatcher.pending[invocation.id] = invocation
    # Another replica may run it: its result then arrives on the result subject.
    plane.spawn(_await_remote_result(plane, dispatcher, invocation))


async def _await_remote_result(plane: Plane, dispatcher: Dispatcher, invocation: Invocation) -> None:
    """Hand a result another replica published to this replica's waiting client, if one still waits."""
    try:
        await _relay_remote_result(plane, dispatcher, invocation)
    finally:
        if invocation.attempts == 0:
            # Still counted as waiting here (a local start takes it off the count).
            invocation.version.durable_waiting = max(0, invocation.version.durable_waiting - 1)


async def _relay_remote_result(plane: Plane, dispatcher: Dispatcher, invocation: Invocation) -> None:
    deadline = invocation.deadline
    while invocation.state != DONE and time.monotonic() < deadline:
        if not invocation.waiters and invocation.detached:
            # Nobody waits here any more (answered 202): a poll on any replica fetches the result.
            # It still counts in this replica's queued load until some replica starts it.
            dispatcher.pending.pop(invocation.id, None)
            record = await plane.record(invocation.id)
            if record is None or record.state != RECORD_QUEUED:
                return
            await asyncio.sleep(1.0)
            continue
        if not await plane.wait_result(invocation.account, invocation.id, 1.0):
            continue
        if invocation.state == DONE:
            return
        if invocation.instance is not None:
            continue  # this replica runs it: its own run answers the waiters
        record = await plane.record(invocation.id)
        if record is None or record.state != RECORD_DONE:
            await asyncio.sleep(0.05)
            continue
        if not invocation.waiters:
            dispatcher.pending.pop(invocation.id, None)
            return
        result = await plane.take_result(invocation.id, record)
        dispatcher.pending.pop(invocation.id, None)
        if result is not None:
            invocation.durable = False  # already marked returned by the take
            dispatcher.complete(invocation, result)
        return


async def durable_status(plane: Plane, request_id: str, account: str | None, poll: int, send: Send) -> None:
    """Answer a status poll from the plane's record and result of the request."""
    waited = False
    while True:
        record = await plane.record(request_id)
        if record is None or (account is not None and record.account != account):
            raise _Refused(
                404,
                f"Request id '{request_id}' not found (unknown, expired or already returned)",
                request_id=request_id,
            )
        if record.state in (RECORD_RETURNED, RECORD_CANCELLED):
            raise _Refused(
                404,
                f"Request id '{request_id}': the result was already returned",
                request_id=request_id,
            )
        if record.state == RECORD_DONE:
            result = await plane.take_result(request_id, record)
            if result is None:
                raise _Refused(
                    404,
                    f"Request id '{request_id}': the result was returned to another poll",
                    request_id=request_id,
                )
            await result.send(send)
            return
        if record.state == RECORD_RUNNING and not await plane.alive(record.owner):
            if await plane.set_state(request_id, record, RECORD_RETURNED):
                detail = (
                    f"The API replica that was running request '{request_id}' stopped before it "
                    "finished; the request may or may not have run on its instance"
                )
                await failure_result(request_id, 502, detail).send(send)
                return
            continue
        if waited or poll <= 0:
            break
        waited = True
        await plane.wait_result(record.account, request_id, poll)
    headers = [
        (b"nvcf-reqid", request_id.encode()),
        (b"nvcf-status", b"in-progress"),
        (b"access-control-expose-headers", b"nvcf-reqid"),
        (b"content-length", b"0"),
    ]
    if record.state == RECORD_QUEUED:
        headers.append((b"nvcf-queue-position", b"%d" % await plane.position(record)))
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def durable_position(plane: Plane, request_id: str, account: str | None) -> tuple[Record, int]:
    """Return a queued or running request's record and queue position (0: running), from the plane."""
    record = await plane.record(request_id)
    if (
        record is None
        or (account is not None and record.account != account)
        or record.state not in (RECORD_QUEUED, RECORD_RUNNING)
    ):
        detail = f"Request id '{request_id}' is not in pending or in progress state"
        raise _Refused(404, detail, request_id=request_id)
    return record, (await plane.position(record) if record.state == RECORD_QUEUED else 0)
