"""Queues, instance slots and the calls to instances: everything between an accepted request and its answer.

Per version: one FIFO queue; per instance: at most `maxRequestConcurrency` requests at once. A request
starts at once when its queue is empty and an instance has a free slot, otherwise it waits in the queue;
whenever a slot frees (or a route change adds instances) the queue's head starts. Each started request
runs in its own task, so it keeps running after its client was answered 202.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Final, cast

from api.gateway.invocations import (
    CANCELLED,
    CLAIMED,
    DONE,
    FULFILLED,
    QUEUED,
    RUNNING,
    STREAM_BROKEN,
    STREAMED,
    HeaderList,
    Invocation,
    Receive,
    Result,
    ResultStore,
    Waiter,
)
from api.gateway.plane import Plane
from api.gateway.plane_feed import PlaneFeed
from api.gateway.routes import Instance, RouteTable, VersionRoute, header_value
from api.gateway.settings import GatewaySettings
from api.gateway.upstream import (
    ResponseTooLarge,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
)
from api.observability import GatewayObserver

log = logging.getLogger(__name__)

_INLINE_BODY_BYTES = 64 * 1024
"""Bodies up to this size are joined to the request head and written at once (one send)."""

# Response headers of the instance that are not passed on: hop-by-hop ones, and those the gateway's own
# server sets (a second Date or Server would duplicate them).
_DROPPED_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"date",
        b"server",
    }
)


def _queue(version: VersionRoute) -> deque[Invocation]:
    """Return the version's queue: it holds only invocations, which this dispatcher alone puts there."""
    return cast("deque[Invocation]", version.queue)


class QueueFull(Exception):
    """The version's queue holds the most requests allowed."""


class _Retry:
    """Marker: the request was not sent; queue it again for another instance."""


_RETRY: Final = _Retry()
_SKIP: Final = _Retry()
"""Marker: a pulled request that must not run here (cancelled or claimed elsewhere)."""


def response_headers(headers: HeaderList) -> HeaderList:
    """Return the instance's response headers that go on to the client, names lower-cased."""
    kept: HeaderList = []
    for name, value in headers:
        lowered = name.lower()
        if lowered not in _DROPPED_RESPONSE_HEADERS:
            kept.append((lowered, value))
    return kept


def _is_event_stream(headers: HeaderList) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


class Dispatcher:
    """Runs accepted invocations on instances and keeps their answers until delivered.

    Args:
        settings: The gateway's settings.
        observer: Told what happens to each request (metrics, request records).
    """

    def __init__(self, settings: GatewaySettings, observer: GatewayObserver | None = None) -> None:
        self._settings = settings
        self.observer = observer if observer is not None else GatewayObserver()
        self._max_response = settings.max_response_bytes
        static_headers = (
            b"nvcf-max-response-size-bytes: %d\r\nnvcf-region: %s\r\nnvcf-invocation-region: %s\r\n"
            b"nvcf-env: %s\r\n"
            % (
                settings.max_response_bytes,
                header_value(settings.region),
                header_value(settings.region),
                header_value(settings.environment),
            )
        )
        replicas = len(set(settings.peers) | {settings.replica_id})
        self.routes = RouteTable(self, static_headers, replicas)
        self.pool = UpstreamPool(settings.connect_timeout_seconds, settings.upstream_idle_seconds)
        self.results = ResultStore(settings.result_ttl_seconds, settings.result_memory_bytes)
        self.pending: dict[str, Invocation] = {}
        """Requests whose client was answered 202 and that have not finished: status polls find them here."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._calls: dict[UpstreamConnection, Invocation] = {}
        """Requests being answered by an instance, by connection (for their deadline)."""
        self._maintenance: asyncio.Task[None] | None = None
        self.plane: Plane | None = None
        """The shared invocation plane, when configured: durable queues, records and results."""
        self._feed: PlaneFeed | None = None
        """Leases this replica's slots and pulls the shared queues, while the plane is in use."""

    def use_plane(self, plane: Plane | None) -> None:
        """Start serving the shared invocation plane's queues (None: stop using it; after `close`)."""
        self.plane = plane
        self._feed = PlaneFeed(plane, self.pending, self._start, self._pump) if plane is not None else None

    async def start(self) -> None:
        """Start sweeping expired results, timed-out queued requests and stale connections."""
        if self._maintenance is None:
            self._maintenance = asyncio.create_task(self._maintain())

    async def close(self) -> None:
        """Stop the sweeps, end running calls and close connections to instances."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        for version in self.routes:
            self._fail_queue(version, 503, "The gateway is shutting down")
        if self._feed is not None:
            await self._feed.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close()

    # --- queueing ---------------------------------------------------------------------------------

    def submit(self, invocation: Invocation) -> None:
        """Start the request on a free slot, or queue it.

        Raises:
            QueueFull: The version's queue is full (the request was not accepted).
        """
        version = invocation.version
        if not version.queue:
            instance = version.pick()
            if instance is not None:
                self._start(invocation, instance)
                return
        if len(version.queue) >= self._settings.max_queue_depth:
            raise QueueFull
        version.queue.append(invocation)
        self.wanted(version)  # with the shared plane: lease slots for it

    def try_start(self, invocation: Invocation) -> bool:
        """Start the request at once when a slot is free and nothing queues before it; else False.

        "Before it" is what this replica queued: requests other replicas queued are pulled whenever a
        slot of this replica frees, and their queue makes this replica lease more slots.
        """
        version = invocation.version
        if version.queue or version.durable_waiting:
            return False
        instance = version.pick()
        if instance is None:
            return False
        self._start(invocation, instance)
        return True

    def cancel_queued(self, invocation: Invocation) -> bool:
        """Take a request that has not started out of its queue; return False if it already started."""
        if invocation.state != QUEUED:
            return False
        try:
            invocation.version.queue.remove(invocation)
        except ValueError:
            return False
        invocation.state = CANCELLED
        self.observer.cancelled(invocation)  # observability hook
        return True

    @staticmethod
    def position(invocation: Invocation) -> int | None:
        """Return 0 for a running request, 1.. for a queued one (1 starts next), None otherwise."""
        if invocation.state == RUNNING:
            return 0
        if invocation.state == QUEUED:
            try:
                return invocation.version.queue.index(invocation) + 1
            except ValueError:
                return None
        return None

    def _start(self, invocation: Invocation, instance: Instance) -> None:
        invocation.state = RUNNING
        invocation.instance = instance
        self.observer.instance_assigned(invocation)  # observability hook
        invocation.attempts += 1
        instance.in_flight += 1
        if instance.in_flight > instance.peak:
            instance.peak = instance.in_flight
        invocation.version.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._execute(invocation, instance))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pump(self, version: VersionRoute) -> None:
        queue = _queue(version)
        while queue:
            instance = version.pick()
            if instance is None:
                return
            self._start(queue.popleft(), instance)

    def _fail_queue(self, version: VersionRoute, status: int, detail: str) -> None:
        queue = _queue(version)
        while queue:
            invocation = queue.popleft()
            self.complete(invocation, invocation.problem(status, detail))

    # --- RouteListener ----------------------------------------------------------------------------

    def routes_changed(self, version: VersionRoute) -> None:
        """Start queued requests on the instances the new route may have added."""
        if version.queue and version.active:
            self.observer.instances_ready(version.queue)  # observability hook: cold starts end
        self._pump(version)
        if self._feed is not None:
            self._feed.routes_changed(version)

    def wanted(self, version: VersionRoute) -> None:
        """Note that a request of `version` queued here: lease more slots if any are free."""
        if self._feed is not None:
            self._feed.wanted(version)

    def route_removed(self, version: VersionRoute) -> None:
        """Fail the queued requests of a version that left the routes (forced undeploy, deletion)."""
        if self._feed is not None:
            self._feed.route_removed(version)
        self._fail_queue(
            version,
            503,
            f"Function version '{version.version_id}' was undeployed before the request started",
        )

    def instance_gone(self, instance: Instance) -> None:
        """Close idle connections to an instance that left the routes."""
        self.pool.forget(instance.endpoint)

    # --- answers ----------------------------------------------------------------------------------

    def complete(self, invocation: Invocation, result: Result) -> None:
        """Deliver an answer to the handler waiting for it, or keep it for a poll.

        A durable request's undelivered answer is persisted in the plane (any replica's poll finds it);
        a delivered one's record is marked returned.
        """
        invocation.state = DONE
        self.observer.finished(invocation, result.status, len(result.body))  # observability hook
        delivered = False
        for waiter in invocation.waiters:
            if delivered:
                waiter.wake(CLAIMED)
            elif waiter.wake(result):
                delivered = True
        invocation.waiters.clear()
        self.pending.pop(invocation.id, None)
        plane = self.plane
        if invocation.durable and plane is not None:
            if delivered:
                plane.spawn(plane.mark_returned(invocation.id))
            else:
                plane.spawn(plane.store_result(invocation, result))
        elif not delivered:
            self.results.put(invocation, result)

    # --- calling instances ------------------------------------------------------------------------

    async def _execute(self, invocation: Invocation, instance: Instance) -> None:
        version = invocation.version
        try:
            if invocation.fetched is not None:
                result = await self._claim(invocation)
                if result is None:
                    result = await self._call(invocation, instance)
            else:
                result = await self._call(invocation, instance)
        except asyncio.CancelledError:
            # The gateway is closing: whoever waits gets an answer rather than silence.
            self.complete(
                invocation, invocation.problem(503, "The gateway shut down before the instance answered")
            )
            raise
        except Exception:
            log.exception("Invocation %s failed in the gateway", invocation.id)
            result = invocation.problem(500, "The gateway failed while handling the request")
        finally:
            self.routes.released(version, instance)
            if self._feed is not None:
                self._feed.slot_free(version)
        if result is _SKIP:
            pass
        elif result is _RETRY:
            invocation.state = QUEUED
            invocation.instance = None
            # Back at the head: it arrived before everything queued behind it.
            version.queue.appendleft(invocation)
        elif isinstance(result, Result):
            self.complete(invocation, result)
        if version.removed:
            self.route_removed(version)
        else:
            self._pump(version)

    async def _claim(self, invocation: Invocation) -> Result | _Retry | None:
        """Take a request pulled from the shared queue for this replica; a result when it must not run."""
        fetched = invocation.fetched
        invocation.fetched = None
        assert self.plane is not None
        if not await self.plane.claim(fetched):
            # Taken by another replica (or gone): nothing to run here. A client waiting here still gets
            # the answer through the plane (`Gateway._await_remote_result`).
            invocation.state = QUEUED
            invocation.instance = None
            return _SKIP
        if time.time() > fetched.deadline:
            return invocation.problem(504, "No instance started the request within its timeout")
        return None

    async def _call(self, invocation: Invocation, instance: Instance) -> Result | _Retry | None:
        version = invocation.version
        try:
            conn = await self.pool.acquire(instance.endpoint)
        except UpstreamError as exc:
            self.routes.drop_instance(version, instance)
            if invocation.attempts < 2 and not version.removed:
                log.warning("Retrying invocation %s on another instance: %s", invocation.id, exc.detail)
                return _RETRY
            return invocation.problem(
                502, f"Could not reach instance '{instance.id}' (not sent, tried twice): {exc.detail}"
            )
        remaining = invocation.deadline - time.monotonic()
        if remaining <= 0:
            conn.finish()
            return invocation.problem(504, "The request timed out before an instance started it")
        head = b"".join(
            (
                instance.prefix,
                invocation.ncaid_headers(),
                self.observer.trace_headers(invocation),  # observability hook: traceparent when tracing
                b"nvcf-poll-seconds: %d\r\n" % int(remaining),
                invocation.client_headers,
                b"content-length: %d\r\n\r\n" % len(invocation.body),
            )
        )
        body = invocation.body
        if len(body) <= _INLINE_BODY_BYTES:
            conn.send(head + body, self._max_response)
        else:
            conn.send(head, self._max_response)
            conn.send_more(body)
        # The deadline is enforced by `sweep` (about once a second): cheaper than a timer per request, and
        # precise enough for a budget counted in minutes.
        self._calls[conn] = invocation
        try:
            status, headers = await conn.read_head()
            self.observer.first_byte(invocation)  # observability hook
            if invocation.accept_stream and status < 400 and _is_event_stream(headers):
                waiter = self._stream_target(invocation)
                if waiter is not None:
                    await self._relay(invocation, conn, waiter, status, headers)
                    return None
            data = await conn.read_body()
        except ResponseTooLarge as exc:
            return invocation.problem(502, exc.detail)
        except UpstreamTimeout as exc:
            return invocation.problem(504, exc.detail)
        except UpstreamError as exc:
            self.routes.drop_instance(version, instance)
            return invocation.problem(
                502,
                f"Instance '{instance.id}' failed after the request was sent to it, so it was not retried: "
                f"{exc.detail}",
            )
        finally:
            del self._calls[conn]
            conn.finish()
        if status >= 600:
            return invocation.problem(502, f"Instance '{instance.id}' answered with invalid status {status}")
        if status >= 400:
            return invocation.instance_error(status, data)
        return invocation.answer(status, response_headers(headers), data, FULFILLED)

    @staticmethod
    def _stream_target(invocation: Invocation) -> Waiter | None:
        for waiter in invocation.waiters:
            if waiter.send is not None and not waiter.future.done():
                return waiter
        return None

    async def _relay(
        self,
        invocation: Invocation,
        conn: UpstreamConnection,
        waiter: Waiter,
        status: int,
        headers: HeaderList,
    ) -> None:
        """Relay an event stream to the invoking client as it arrives (never buffered whole)."""
        assert waiter.send is not None
        send = waiter.send
        if waiter.timer is not None:
            # The answer has started: the poll window no longer applies.
            waiter.timer.cancel()
        conn.stream()
        out = invocation.answer(status, response_headers(headers), b"", FULFILLED).headers
        out.pop()  # no content-length: the stream's length is unknown
        watcher = asyncio.get_running_loop().create_task(self._watch_client(waiter.receive, conn))
        broken = False
        try:
            await send({"type": "http.response.start", "status": status, "headers": out})
            while (chunk := await conn.read_chunk()) is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watcher.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except UpstreamError as exc:
            broken = True
            log.warning("Stream of invocation %s ended early: %s", invocation.id, exc.detail)
        finally:
            watcher.cancel()
            invocation.state = DONE
            self.observer.finished(invocation, status, 0)  # observability hook (stream bytes not counted)
            invocation.waiters.remove(waiter)
            waiter.wake(STREAM_BROKEN if broken else STREAMED)
            for other in invocation.waiters:
                other.wake(CLAIMED)
            invocation.waiters.clear()
            self.pending.pop(invocation.id, None)

    @staticmethod
    async def _watch_client(receive: Receive | None, conn: UpstreamConnection) -> None:
        """Stop reading a relayed stream when its client disconnects."""
        if receive is None:
            return
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                conn.fail(UpstreamError("The client disconnected during the stream", sent=True))
                return

    # --- maintenance ------------------------------------------------------------------------------

    async def _maintain(self) -> None:
        interval = self._settings.maintenance_interval_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
            except Exception:
                log.exception("Gateway maintenance failed")

    def sweep(self) -> None:
        """Drop expired results, fail queued requests past their deadline, close stale connections."""
        self.results.expire()
        self.pool.prune()
        now = time.monotonic()
        for conn, invocation in list(self._calls.items()):
            if invocation.deadline <= now:
                conn.fail(UpstreamTimeout("No answer within the request timeout", sent=True))
        for version in self.routes:
            queue = _queue(version)
            expired = [i for i in queue if i.deadline <= now] if queue and queue[0].deadline <= now else []
            for invocation in expired:
                queue.remove(invocation)
                self.complete(
                    invocation, invocation.problem(504, "No instance started the request within its timeout")
                )
