"""The one object the gateway tells what happens to each request; it keeps the metrics and the records.

The gateway calls it at a handful of points (each a one-line call):

* `received(invocation, cold)`: the request was read and is about to be admitted;
* `refused(invocation, outcome)`: a rate limit or a full queue refused it after all (429);
* `accepted(invocation)`: it was queued or started; its record becomes visible;
* `instances_ready(queue)`: a route change gave a version instances; the queued requests' cold start ends;
* `instance_assigned(invocation)`: an instance slot took it;
* `first_byte(invocation)`: the instance's answer started;
* `finished(invocation, status, response_bytes)`: its answer is complete (delivered or stored for a poll);
* `cancelled(invocation)`: its client left while it was queued.

It knows the gateway's objects only by the attributes below (`ObservedInvocation`), so it imports nothing
of the gateway.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

import api.observability.tracing as tracing
from api.observability.metrics import GatewayMetrics
from api.observability.records import (
    OUTCOME_CANCELLED,
    OUTCOME_DIRECT,
    OUTCOME_ERROR,
    OUTCOME_POLLED,
    OUTCOME_TIMEOUT,
    MemoryRequestRecords,
    RequestRecord,
    RequestRecords,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

CLIENT_CLOSED_REQUEST = 499
"""Status counted for a request whose client left before it ran (nginx's convention; never sent)."""

DEFAULT_RECORD_RETENTION_SECONDS = 3600.0
DEFAULT_MAX_RECORDS = 100_000


class _Instance(Protocol):
    @property
    def id(self) -> str: ...


class _Version(Protocol):
    @property
    def function_id(self) -> str: ...

    @property
    def version_id(self) -> str: ...


class ObservedInvocation(Protocol):
    """What the observer reads of a gateway invocation."""

    observed: RequestRecord | None
    client_headers: bytes

    @property
    def id(self) -> str:
        """The request id."""
        ...

    @property
    def account(self) -> str:
        """The caller's account."""
        ...

    @property
    def created(self) -> float:
        """Monotonic time of its arrival."""
        ...

    @property
    def body(self) -> bytes:
        """The request body."""
        ...

    @property
    def detached(self) -> bool:
        """Whether its client was answered 202."""
        ...

    @property
    def version(self) -> _Version:
        """The version it invokes."""
        ...

    @property
    def instance(self) -> _Instance | None:
        """The instance it runs on, once one took it."""
        ...


class GatewayObserver:
    """Turns the gateway's events into metrics and request records.

    Args:
        metrics: The metric families (a fresh registry when omitted).
        records: Where request records go (in memory, an hour or 100,000 records, when omitted).
        tracer: An OpenTelemetry tracer to emit spans with; None (tracing off): no span is ever created.
    """

    def __init__(
        self,
        metrics: GatewayMetrics | None = None,
        records: RequestRecords | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.tracer = tracer
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.records: RequestRecords = (
            records
            if records is not None
            else MemoryRequestRecords(DEFAULT_RECORD_RETENTION_SECONDS, DEFAULT_MAX_RECORDS)
        )

    def received(self, invocation: ObservedInvocation, cold: bool) -> None:
        """Start the request's record; `cold`: its version had no ready instance when it arrived."""
        version = invocation.version
        record = invocation.observed = RequestRecord(
            invocation.id,
            invocation.account,
            version.function_id,
            version.version_id,
            invocation.created,
            len(invocation.body),
            cold,
        )
        if self.tracer is not None:
            invocation.client_headers, carrier = tracing.split_trace_headers(invocation.client_headers)
            record.trace = tracing.start(self.tracer, record, carrier)

    def refused(self, invocation: ObservedInvocation, outcome: str) -> None:
        """Count a request refused with 429 (`outcome`: rate_limited or queue_full); it keeps no record."""
        version = invocation.version
        self.metrics.version(version.function_id, version.version_id).count(429, outcome)
        record = invocation.observed
        if record is not None and record.trace is not None:
            record.done, record.status, record.outcome = time.monotonic(), 429, outcome
            tracing.finish(record.trace, record)

    def accepted(self, invocation: ObservedInvocation) -> None:
        """Publish the record of a request that was queued or started."""
        record = invocation.observed
        if record is not None:
            self.metrics.version(record.function_id, record.version_id).request_bytes += record.request_bytes
            self.records.put(record)

    def instances_ready(self, queued: object) -> None:
        """End the cold-start wait of the queued requests (an iterable of invocations) that had one."""
        now = time.monotonic()
        for invocation in queued:  # type: ignore[attr-defined]
            record: RequestRecord | None = invocation.observed
            if record is not None and record.cold and record.cold_ready is None:
                record.cold_ready = now

    def instance_assigned(self, invocation: ObservedInvocation) -> None:
        """Note when and on which instance the request started (a retry on another keeps the first wait)."""
        record = invocation.observed
        if record is None:
            return
        instance = invocation.instance
        record.instance_id = instance.id if instance is not None else None
        if record.assigned is None:
            now = record.assigned = time.monotonic()
            bound = self.metrics.version(record.function_id, record.version_id)
            bound.queue_wait.observe(now - record.received)
            if record.cold:
                if record.cold_ready is None:
                    record.cold_ready = now
                bound.cold_start_wait.observe(record.cold_ready - record.received)
        if self.tracer is not None and record.trace is not None:
            tracing.assigned(self.tracer, record.trace, record, record.instance_id)

    def trace_headers(self, invocation: ObservedInvocation) -> bytes:
        """Return the `traceparent` header line(s) for the instance call; empty when tracing is off."""
        if self.tracer is None:
            return b""
        record = invocation.observed
        return b"" if record is None or record.trace is None else tracing.traceparent(record.trace)

    def first_byte(self, invocation: ObservedInvocation) -> None:
        """Note when the instance's answer started."""
        record = invocation.observed
        if record is not None:
            record.first_byte = time.monotonic()

    def finished(self, invocation: ObservedInvocation, status: int, response_bytes: int) -> None:
        """Close the record of a request whose answer is complete, and count it."""
        record = invocation.observed
        if record is None or record.done is not None:
            return
        now = record.done = time.monotonic()
        record.status = status
        record.response_bytes = response_bytes
        if status == 504:
            outcome = OUTCOME_TIMEOUT
        elif status >= 400:
            outcome = OUTCOME_ERROR
        elif invocation.detached:
            outcome = OUTCOME_POLLED
        else:
            outcome = OUTCOME_DIRECT
        record.outcome = outcome
        bound = self.metrics.version(record.function_id, record.version_id)
        bound.count(status, outcome)
        bound.duration.observe(now - record.received)
        if record.assigned is not None:
            bound.instance_time.observe(now - record.assigned)
        bound.response_bytes += response_bytes
        if record.trace is not None:
            tracing.finish(record.trace, record)
        self.records.put(record)

    def cancelled(self, invocation: ObservedInvocation) -> None:
        """Close the record of a request whose client left while it was queued."""
        record = invocation.observed
        if record is None or record.done is not None:
            return
        record.done = time.monotonic()
        record.outcome = OUTCOME_CANCELLED
        bound = self.metrics.version(record.function_id, record.version_id)
        bound.count(CLIENT_CLOSED_REQUEST, OUTCOME_CANCELLED)
        if record.trace is not None:
            tracing.finish(record.trace, record)
        self.records.put(record)
