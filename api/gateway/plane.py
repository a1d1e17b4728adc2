"""The durable invocation plane: queued requests, request records and 202 results in NATS JetStream.

Every API replica connects to the same NATS server (JetStream), so what an accepted request needs
outlives the replica that accepted it:

* a per-version work queue (stream `GPUFN_Q_<version>`, WorkQueue retention, at most `max_queue_depth`
  messages, discard-new: the global queue limit) with one durable pull consumer shared by all replicas;
  a replica with a free slot on an instance of the version pulls the next request;
* a request record per accepted request (KV bucket `gpufn_requests`): state, owner replica incarnation,
  account, function and version, queue sequence;
* results of requests answered 202, per account in stream `GPUFN_R_<account hash>` (one message per
  request id, `max_age` = the retention, `max_bytes` = the per-account bound);
* replica liveness (KV bucket `gpufn_replicas` with a TTL, refreshed by a heartbeat), so a poll of a request
  whose running replica died is answered with a clear failure rather than waiting forever.

Delivery: a queued request is at-least-once *delivered* to replicas (a replica that dies between fetching
and starting it leaves it to be redelivered after `ack_wait`) and at-most-once *executed* (a replica acks
it and moves its record from queued to running by compare-and-set before calling the instance, so a
running request is never started twice). Nothing here is on the direct path of a synchronous request that
finds a free slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from api.gateway.invocations import ERRORED, HeaderList, Invocation, Result
from api.problems import PROBLEM_CONTENT_TYPE, problem_bytes

log = logging.getLogger(__name__)

RECORDS_BUCKET = "gpufn_requests"
REPLICAS_BUCKET = "gpufn_replicas"
ROUTES_SUBJECT = "gpufn.routes"
"""Core NATS subject on which replicas tell each other of route changes."""

QUEUED = "queued"
RUNNING = "running"
DONE = "done"
RETURNED = "returned"
CANCELLED = "cancelled"

HEARTBEAT_SECONDS = 2.0
REPLICA_TTL_SECONDS = 8.0
"""A replica whose heartbeat is older than this counts as gone (its running requests failed)."""
FETCH_SECONDS = 2.0
"""How long one pending pull waits for queued work before it is renewed."""
SLOTS_STREAM = "GPUFN_SLOTS"
LEASE_SECONDS = 30.0
"""A slot token whose holder stops renewing it (a dead replica) is free again after this long."""
ACK_WAIT_SECONDS = 15.0
"""A fetched request not started (acked) within this long goes back to the queue for another replica."""

_PROBLEM_TYPE = (b"content-type", PROBLEM_CONTENT_TYPE.encode())


class PlaneQueueFull(Exception):
    """The version's global queue holds `max_queue_depth` requests."""


@dataclass
class Record:
    """What every replica knows of an accepted request."""

    state: str
    owner: str
    account: str
    function_id: str
    version_id: str
    seq: int = 0
    revision: int = 0

    def encode(self) -> bytes:
        """Return the record as stored in the KV bucket."""
        return json.dumps(
            {
                "s": self.state,
                "o": self.owner,
                "a": self.account,
                "f": self.function_id,
                "v": self.version_id,
                "q": self.seq,
            }
        ).encode()

    @classmethod
    def decode(cls, data: bytes, revision: int) -> Record:
        """Parse a stored record."""
        raw = json.loads(data)
        return cls(raw["s"], raw["o"], raw["a"], raw["f"], raw["v"], int(raw.get("q", 0)), revision)


@dataclass
class QueuedRequest:
    """A request fetched from a version's work queue, not yet started."""

    request_id: str
    account: str
    function_id: str
    version_id: str
    subject: bytes
    client_headers: bytes
    body: bytes
    deadline: float
    """Wall-clock time (seconds since the epoch) after which it must not start."""
    message: Msg


def account_hash(account: str) -> str:
    """Return the 16 hex digits naming an account in stream names and subjects."""
    return hashlib.sha256(account.encode()).hexdigest()[:16]


def queue_stream(version_id: str) -> str:
    """Return the name of a version's work-queue stream."""
    return "GPUFN_Q_" + version_id.replace(".", "_")


def queue_subject(version_id: str) -> str:
    """Return the subject a version's queued requests are published to."""
    return "gpufn.work." + version_id.replace(".", "_")


def result_subject(account: str, request_id: str) -> str:
    """Return the subject a request's result is persisted on."""
    return f"gpufn.result.{account_hash(account)}.{request_id}"


def encode_result(result: Result) -> tuple[bytes, dict[str, str]]:
    """Return a result as a NATS payload and headers."""
    headers = json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in result.headers])
    return result.body, {"Gpufn-Status": str(result.status), "Gpufn-Headers": headers}


def decode_result(body: bytes, headers: dict[str, str] | None) -> Result:
    """Rebuild a result from its NATS payload and headers."""
    headers = headers or {}
    pairs: HeaderList = [
        (n.encode("latin-1"), v.encode("latin-1")) for n, v in json.loads(headers.get("Gpufn-Headers", "[]"))
    ]
    return Result(int(headers.get("Gpufn-Status", "500")), pairs, body)


def failure_result(request_id: str, status: int, detail: str) -> Result:
    """Return an errored answer about `request_id` raised by the plane itself."""
    body = problem_bytes(status, detail, request_id, requestId=request_id)
    headers: HeaderList = [
        _PROBLEM_TYPE,
        (b"nvcf-reqid", request_id.encode()),
        (b"nvcf-status", ERRORED),
        (b"access-control-expose-headers", b"nvcf-reqid"),
        (b"content-length", b"%d" % len(body)),
    ]
    return Result(status, headers, body)


class Plane:
    """One replica's connection to the shared invocation plane.

    Args:
        url: The NATS server(s), comma-separated.
        replica_id: This replica's configured id (logs and records).
        max_queue_depth: Requests waiting per version, globally, before new ones are refused (429).
        retention_seconds: How long a 202 result waits for its poll.
        retention_bytes_per_account: Bound on the results one account keeps waiting.
        request_timeout_seconds: Budget of one invocation (records live this long plus the retention).
    """

    def __init__(
        self,
        url: str,
        replica_id: str,
        max_queue_depth: int,
        retention_seconds: float,
        retention_bytes_per_account: int,
        request_timeout_seconds: float,
    ) -> None:
        self.url = url
        self.incarnation = f"{replica_id}.{os.urandom(6).hex()}"
        """Names this process (a restarted replica is a new incarnation: the old one's runs are gone)."""
        self._max_queue_depth = max_queue_depth
        self._retention = retention_seconds
        self._retention_bytes = retention_bytes_per_account
        self._record_ttl = request_timeout_seconds + retention_seconds
        self.nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._records: KeyValue | None = None
        self._replicas: KeyValue | None = None
        self._queues: set[str] = set()
        self._result_streams: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def js(self) -> JetStreamContext:
        """Return the JetStream context (after `start`)."""
        assert self._js is not None, "Plane.start was not called"
        return self._js

    @property
    def records(self) -> KeyValue:
        """Return the request records bucket (after `start`)."""
        assert self._records is not None, "Plane.start was not called"
        return self._records

    async def start(self) -> None:
        """Connect, create the shared buckets when missing, and start the heartbeat."""
        self.nc = await nats.connect(self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        self._js = self.nc.jetstream()
        self._records = await self._bucket(RECORDS_BUCKET, self._record_ttl)
        self._replicas = await self._bucket(REPLICAS_BUCKET, REPLICA_TTL_SECONDS)
        await self._beat()
        self._heartbeat = asyncio.create_task(self._beat_forever())

    async def _bucket(self, name: str, ttl: float) -> KeyValue:
        try:
            return await self.js.key_value(name)
        except Exception:
            return await self.js.create_key_value(bucket=name, ttl=ttl, storage=StorageType.FILE)

    async def close(self) -> None:
        """Stop the heartbeat and background work, and drain the connection."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                assert self._replicas is not None
                await self._replicas.delete(self.incarnation)
            with contextlib.suppress(Exception):
                await self.nc.drain()

    def spawn(self, work: Any) -> None:
        """Run a coroutine in the background, kept until it ends (failures are logged)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("Invocation plane task failed: %r", task.exception())

    async def _beat(self) -> None:
        assert self._replicas is not None
        await self._replicas.put(self.incarnation, b"%f" % time.time())

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self._beat()
            except Exception as exc:
                log.warning("Invocation plane heartbeat failed: %r", exc)

    async def alive(self, incarnation: str) -> bool:
        """Return whether the replica incarnation still beats."""
        if incarnation == self.incarnation:
            return True
        assert self._replicas is not None
        try:
            await self._replicas.get(incarnation)
        except KeyNotFoundError:
            return False
        return True

    # --- work queues ------------------------------------------------------------------------------

    async def ensure_queue(self, version_id: str) -> str:
        """Create the version's work-queue stream when missing; return its name."""
        name = queue_stream(version_id)
        if name not in self._queues:
            await self.js.add_stream(
                name=name,
                subjects=[queue_subject(version_id)],
                retention=RetentionPolicy.WORK_QUEUE,
                max_msgs=self._max_queue_depth,
                discard=DiscardPolicy.NEW,
                storage=StorageType.FILE,
            )
            self._queues.add(name)
        return name

    async def drop_queue(self, version_id: str) -> None:
        """Delete a removed version's work queue."""
        name = queue_stream(version_id)
        self._queues.discard(name)
        with contextlib.suppress(NotFoundError):
            await self.js.delete_stream(name)

    async def enqueue(self, invocation: Invocation, budget_seconds: float) -> int:
        """Persist a request in its version's queue and its record; return its queue sequence.

        Raises:
            PlaneQueueFull: The version's queue is full (the request was not accepted).
        """
        version = invocation.version
        stream = await self.ensure_queue(version.version_id)
        meta = struct.pack(">dI", time.time() + budget_seconds, len(invocation.client_headers))
        payload = b"".join((meta, invocation.client_headers, invocation.body))
        headers = {
            "Gpufn-Id": invocation.id,
            "Gpufn-Function": version.function_id,
            "Gpufn-Version": version.version_id,
            "Gpufn-Account": invocation.account,
            "Gpufn-Subject": invocation.subject.decode("latin-1"),
        }
        try:
            ack = await self.js.publish(
                queue_subject(version.version_id), payload, stream=stream, headers=headers
            )
        except Exception as exc:
            if "maximum messages exceeded" in str(exc).lower():
                raise PlaneQueueFull from None
            raise
        record = Record(
            QUEUED, self.incarnation, invocation.account, version.function_id, version.version_id, ack.seq
        )
        # Created only if missing: a replica may have claimed (and recorded) it already. Nothing has told
        # the client its id yet, so no poll can miss the record meanwhile.
        with contextlib.suppress(KeyWrongLastSequenceError):
            await self.records.create(invocation.id, record.encode())
        return ack.seq

    async def queue_depth(self, version_id: str) -> int:
        """Return how many requests wait in the version's queue, over all replicas."""
        try:
            info = await self.js.stream_info(queue_stream(version_id))
        except NotFoundError:
            return 0
        return int(info.state.messages)

    async def position(self, record: Record) -> int:
        """Return a queued request's position (1 starts next), the same on every replica."""
        try:
            info = await self.js.stream_info(queue_stream(record.version_id))
        except NotFoundError:
            return 1
        return max(1, record.seq - int(info.state.first_seq) + 1)

    async def subscribe_queue(self, version_id: str) -> JetStreamContext.PullSubscription:
        """Return this replica's pull subscription on the version's shared durable consumer."""
        stream = await self.ensure_queue(version_id)
        from nats.js.api import AckPolicy, ConsumerConfig

        return await self.js.pull_subscribe(
            queue_subject(version_id),
            durable="work",
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_SECONDS),
        )

    @staticmethod
    def decode_queued(message: Msg) -> QueuedRequest:
        """Parse a fetched work-queue message."""
        headers = message.headers or {}
        deadline, head_length = struct.unpack_from(">dI", message.data)
        start = struct.calcsize(">dI")
        return QueuedRequest(
            headers["Gpufn-Id"],
            headers["Gpufn-Account"],
            headers.get("Gpufn-Function", ""),
            headers.get("Gpufn-Version", ""),
            headers.get("Gpufn-Subject", "").encode("latin-1"),
            message.data[start : start + head_length],
            message.data[start + head_length :],
            deadline,
            message,
        )

    async def claim(self, request: QueuedRequest) -> bool:
        """Take a fetched request off the queue and mark it running here; False if it must not run.

        The ack comes first: from here on the request never runs anywhere else (at-most-once). The
        record moves from queued to running by compare-and-set, so a request cancelled meanwhile stays so.
        """
        await request.message.ack()
        running = Record(
            RUNNING, self.incarnation, request.account, request.function_id, request.version_id
        ).encode()
        for _ in range(5):
            try:
                entry = await self.records.get(request.request_id)
            except KeyNotFoundError:
                # Fetched before the accepting replica wrote the record: write it, as running.
                try:
                    await self.records.create(request.request_id, running)
                except KeyWrongLastSequenceError:
                    continue
                return True
            assert entry.value is not None and entry.revision is not None
            record = Record.decode(entry.value, entry.revision)
            if record.state != QUEUED:
                return False
            record.state = RUNNING
            record.owner = self.incarnation
            try:
                await self.records.update(request.request_id, record.encode(), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue  # written meanwhile (the accepting replica's record): read it again
            return True
        return False

    # --- instance slots ----------------------------------------------------------------------------

    async def slot_subscription(
        self, version_id: str, instance_id: str, limit: int
    ) -> JetStreamContext.PullSubscription:
        """Make sure the instance has `limit` slot tokens; return this replica's pull on their consumer.

        Each token is one message on its own subject (`gpufn.slot.<instance>.<k>`) in a stream that keeps
        at most one message per subject and refuses a second: publishing the tokens again (every replica
        does, on every start) never makes more than `limit`. A replica holds a token by fetching it and
        not acknowledging it (renewed with `in_progress`), and gives it back with `nak`; the server gives
        a token whose holder died to the next fetch after `LEASE_SECONDS`.
        """
        from nats.js.api import AckPolicy, ConsumerConfig

        if SLOTS_STREAM not in self._queues:
            await self.js.add_stream(
                name=SLOTS_STREAM,
                subjects=["gpufn.slot.>"],
                max_msgs_per_subject=1,
                discard=DiscardPolicy.NEW,
                discard_new_per_subject=True,
                storage=StorageType.FILE,
            )
            self._queues.add(SLOTS_STREAM)
        key = hashlib.sha256(f"{version_id}/{instance_id}".encode()).hexdigest()[:20]
        for index in range(limit):
            with contextlib.suppress(Exception):  # the token exists already
                await self.js.publish(f"gpufn.slot.{key}.{index}", b"", stream=SLOTS_STREAM)
        return await self.js.pull_subscribe(
            f"gpufn.slot.{key}.*",
            durable=f"slot_{key}",
            stream=SLOTS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT, ack_wait=LEASE_SECONDS, max_ack_pending=-1, max_deliver=-1
            ),
        )

    # --- records and results ------------------------------------------------------------------------

    async def record(self, request_id: str) -> Record | None:
        """Return a request's record, or None when there is none (unknown or expired)."""
        try:
            entry = await self.records.get(request_id)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return Record.decode(entry.value, entry.revision)

    async def mark_running(self, invocation: Invocation) -> None:
        """Record that this replica runs the request (it is about to be answered 202)."""
        version = invocation.version
        record = Record(
            RUNNING, self.incarnation, invocation.account, version.function_id, version.version_id
        )
        await self.records.put(invocation.id, record.encode())

    async def set_state(self, request_id: str, record: Record, state: str) -> bool:
        """Move a record to `state` if nobody changed it since it was read; return whether it moved."""
        record.state = state
        try:
            record.revision = await self.records.update(request_id, record.encode(), last=record.revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def mark_returned(self, request_id: str) -> None:
        """Record that the request's answer went to a client (nothing to keep)."""
        record = await self.record(request_id)
        if record is not None:
            record.state = RETURNED
            await self.records.put(request_id, record.encode())

    async def _result_stream(self, account: str) -> str:
        name = "GPUFN_R_" + account_hash(account)
        if name not in self._result_streams:
            await self.js.add_stream(
                name=name,
                subjects=[f"gpufn.result.{account_hash(account)}.*"],
                max_age=self._retention,
                max_bytes=self._retention_bytes,
                max_msgs_per_subject=1,
                discard=DiscardPolicy.OLD,
                storage=StorageType.FILE,
            )
            self._result_streams.add(name)
        return name

    async def store_result(self, invocation: Invocation, result: Result) -> None:
        """Persist a finished request's result, then mark its record done."""
        stream = await self._result_stream(invocation.account)
        body, headers = encode_result(result)
        await self.js.publish(
            result_subject(invocation.account, invocation.id), body, stream=stream, headers=headers
        )
        record = await self.record(invocation.id)
        version = invocation.version
        if record is None:
            record = Record(
                DONE, self.incarnation, invocation.account, version.function_id, version.version_id
            )
        record.state = DONE
        await self.records.put(invocation.id, record.encode())

    async def take_result(self, request_id: str, record: Record) -> Result | None:
        """Return a done request's result and mark it returned; None if another poll took it."""
        stream = await self._result_stream(record.account)
        try:
            message = await self.js.get_last_msg(stream, result_subject(record.account, request_id))
        except NotFoundError:
            return None
        if not await self.set_state(request_id, record, RETURNED):
            return None
        self.spawn(self._forget_result(stream, record.account, request_id))
        return decode_result(message.data or b"", message.headers)

    async def _forget_result(self, stream: str, account: str, request_id: str) -> None:
        await self.js.purge_stream(stream, subject=result_subject(account, request_id))

    async def wait_result(self, account: str, request_id: str, seconds: float) -> bool:
        """Wait up to `seconds` for the request's result to be published; return whether it was."""
        assert self.nc is not None
        arrived = asyncio.get_running_loop().create_future()

        async def on_result(message: Msg) -> None:
            if not arrived.done():
                arrived.set_result(True)

        subscription = await self.nc.subscribe(result_subject(account, request_id), cb=on_result)
        try:
            record = await self.record(request_id)
            if record is not None and record.state != QUEUED and record.state != RUNNING:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived, seconds)
            return arrived.done()
        finally:
            await subscription.unsubscribe()

    # --- route broadcast ----------------------------------------------------------------------------

    async def subscribe_routes(self, apply: Callable[[dict[str, Any]], None]) -> None:
        """Call `apply` with every route change another replica publishes."""
        assert self.nc is not None

        async def on_change(message: Msg) -> None:
            try:
                change = json.loads(message.data)
                if (message.headers or {}).get("Gpufn-Origin") != self.incarnation:
                    apply(change)
            except Exception:
                log.exception("Ignoring a malformed route change")

        await self.nc.subscribe(ROUTES_SUBJECT, cb=on_change)

    async def publish_route_change(self, change: dict[str, Any]) -> None:
        """Tell every replica of a route change (and wait until the server has it)."""
        assert self.nc is not None
        await self.nc.publish(
            ROUTES_SUBJECT, json.dumps(change).encode(), headers={"Gpufn-Origin": self.incarnation}
        )
        await self.nc.flush()
