"""The record of every request: what it invoked, where it ran, how long each phase took, how it ended.

`GET /v2/gpufn/requests/{requestId}` answers from a `RequestRecords` store. This module holds the record,
the store's interface (`put`/`get`, so a shared key-value store can back it later without touching the
gateway) and the in-memory store used today: bounded by count and by age, oldest evicted first.

Timings are taken from `time.monotonic()` (immune to clock steps) and turned into wall-clock times only when
a record is shown, from the one wall-clock reading taken when the request arrived.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, Protocol

OUTCOME_DIRECT = "direct"
"""Answered on the invoking request itself."""
OUTCOME_POLLED = "polled"
"""The client was answered 202 and took the answer with a status poll (or it waits there)."""
OUTCOME_ERROR = "error"
"""Answered with a 4xx or 5xx status other than 504 (the function's error or the gateway's)."""
OUTCOME_TIMEOUT = "timeout"
"""Answered 504: no instance started it, or none answered, within the request timeout."""
OUTCOME_CANCELLED = "cancelled"
"""The client disconnected while the request waited in the queue; it never ran."""
OUTCOME_RATE_LIMITED = "rate_limited"
"""Refused with 429 by the version's rate limit (no record: the request was never accepted)."""
OUTCOME_QUEUE_FULL = "queue_full"
"""Refused with 429 because the version's queue was full (no record)."""

OUTCOMES = (
    OUTCOME_DIRECT,
    OUTCOME_POLLED,
    OUTCOME_ERROR,
    OUTCOME_TIMEOUT,
    OUTCOME_CANCELLED,
    OUTCOME_RATE_LIMITED,
    OUTCOME_QUEUE_FULL,
)


class RequestRecord:
    """One accepted request's facts, filled in as it moves through the gateway.

    Monotonic times are None until the phase happened. `cold_ready` is when an instance first became ready
    for a request that arrived while its version had none (the end of its cold-start wait).
    """

    __slots__ = (
        "account",
        "assigned",
        "cold",
        "cold_ready",
        "done",
        "first_byte",
        "function_id",
        "instance_id",
        "outcome",
        "received",
        "received_wall",
        "request_bytes",
        "request_id",
        "response_bytes",
        "status",
        "trace",
        "version_id",
    )

    def __init__(
        self,
        request_id: str,
        account: str,
        function_id: str,
        version_id: str,
        received: float,
        request_bytes: int,
        cold: bool,
    ) -> None:
        self.request_id = request_id
        self.account = account
        self.function_id = function_id
        self.version_id = version_id
        self.received = received
        self.received_wall = time.time() - (time.monotonic() - received)
        self.request_bytes = request_bytes
        self.cold = cold
        self.cold_ready: float | None = None
        self.assigned: float | None = None
        self.first_byte: float | None = None
        self.done: float | None = None
        self.instance_id: str | None = None
        self.status: int | None = None
        self.outcome: str | None = None
        self.response_bytes = 0
        self.trace: Any = None
        """The request's open spans when the gateway traces (`api.observability.tracing`), else None."""

    def freeze(self) -> tuple[Any, ...]:
        """Return the record's facts as a tuple of plain values (spans left out).

        A finished record is kept in this form: a tuple of strings and numbers is dropped from the
        garbage collector's bookkeeping, so a store holding many of them costs the collector nothing.
        """
        frozen: tuple[Any, ...] = _freeze(self)
        return frozen

    @classmethod
    def thaw(cls, frozen: tuple[Any, ...]) -> RequestRecord:
        """Return a record from `freeze`'s tuple."""
        record = cls.__new__(cls)
        for name, value in zip(_FROZEN, frozen, strict=True):
            setattr(record, name, value)
        record.trace = None
        return record

    def queue_seconds(self) -> float | None:
        """Return how long it waited for an instance slot (cold start included), once it had one."""
        return None if self.assigned is None else self.assigned - self.received

    def cold_start_seconds(self) -> float | None:
        """Return how long it waited for its version's first ready instance (None: it arrived warm)."""
        if not self.cold:
            return None
        end = self.cold_ready if self.cold_ready is not None else self.assigned
        return None if end is None else end - self.received

    def as_json(self) -> dict[str, Any]:
        """Return the record as `GET /v2/gpufn/requests/{requestId}` shows it."""

        def at(moment: float | None) -> str | None:
            if moment is None:
                return None
            wall = self.received_wall + (moment - self.received)
            return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")

        def span(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else round(end - start, 6)

        queue = self.queue_seconds()
        cold = self.cold_start_seconds()
        return {
            "requestId": self.request_id,
            "functionId": self.function_id,
            "functionVersionId": self.version_id,
            "instanceId": self.instance_id,
            "status": self.status,
            "outcome": self.outcome,
            "coldStart": self.cold,
            "phases": {
                "receivedAt": at(self.received),
                "instanceAssignedAt": at(self.assigned),
                "firstByteAt": at(self.first_byte),
                "doneAt": at(self.done),
            },
            "durations": {
                "queueSeconds": None if queue is None else round(queue, 6),
                "coldStartSeconds": None if cold is None else round(cold, 6),
                "timeToFirstByteSeconds": span(self.assigned, self.first_byte),
                "instanceSeconds": span(self.assigned, self.done),
                "totalSeconds": span(self.received, self.done),
            },
            "sizes": {"requestBytes": self.request_bytes, "responseBytes": self.response_bytes},
        }


_FROZEN = tuple(name for name in RequestRecord.__slots__ if name != "trace")
_freeze = attrgetter(*_FROZEN)


class RequestRecords(Protocol):
    """Where request records are kept. `put` is called when a request is accepted and again when it ends
    (with `done` set), so a store that copies records (a shared key-value store) holds the final one.
    """

    def put(self, record: RequestRecord) -> None:
        """Store (or re-store) the record under its request id."""

    def get(self, request_id: str) -> RequestRecord | None:
        """Return the record, or None when it is unknown or past retention."""


class MemoryRequestRecords:
    """Request records in this process's memory, oldest evicted first.

    Memory is bounded by `max_records` (a finished record is one tuple of plain values, about 300 bytes
    with its strings) and by `retention_seconds`: a record older than that is neither returned nor kept.
    A record is held as the live object while its request runs, then as `RequestRecord.freeze()`'s tuple.

    Args:
        retention_seconds: How long after its arrival a request's record is answered.
        max_records: Most records kept; storing beyond it evicts the oldest.
    """

    def __init__(self, retention_seconds: float, max_records: int) -> None:
        self._retention = retention_seconds
        self._max = max_records
        self._items: OrderedDict[str, RequestRecord | tuple[Any, ...]] = OrderedDict()
        self._next_expiry = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, record: RequestRecord) -> None:
        """Store the record (a finished one frozen); a second put replaces the first, in its place."""
        items = self._items
        if record.done is not None:
            if record.request_id in items:
                items[record.request_id] = record.freeze()
            return
        items[record.request_id] = record
        if len(items) > self._max:
            items.popitem(last=False)
        if record.received >= self._next_expiry:
            # At most once a second (records arrive in time order): `get` hides the older ones meanwhile.
            self._next_expiry = record.received + 1.0
            self._expire()

    def get(self, request_id: str) -> RequestRecord | None:
        """Return the record while it is within retention."""
        held = self._items.get(request_id)
        if held is None:
            return None
        record = RequestRecord.thaw(held) if isinstance(held, tuple) else held
        if time.monotonic() - record.received > self._retention:
            return None
        return record

    def _expire(self) -> None:
        # Records are stored in arrival order, so the expired ones are at the front.
        limit = time.monotonic() - self._retention
        items = self._items
        received_at = _FROZEN.index("received")
        while items:
            first = next(iter(items.values()))
            received = first[received_at] if isinstance(first, tuple) else first.received
            if received >= limit:
                return
            items.popitem(last=False)
