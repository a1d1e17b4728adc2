"""The in-memory request records keep at most their count, for at most their retention."""

from __future__ import annotations

import time

from api.observability.records import MemoryRequestRecords, RequestRecord


def record(request_id: str, received: float) -> RequestRecord:
    return RequestRecord(request_id, "acct", "fn", "ver", received, 10, False)


def test_oldest_records_are_evicted_beyond_the_count() -> None:
    records = MemoryRequestRecords(retention_seconds=3600, max_records=3)
    now = time.monotonic()
    for n in range(5):
        records.put(record(f"r{n}", now))
    assert len(records) == 3
    assert [records.get(f"r{n}") is not None for n in range(5)] == [False, False, True, True, True]


def test_records_past_retention_are_neither_answered_nor_kept() -> None:
    records = MemoryRequestRecords(retention_seconds=60, max_records=100)
    now = time.monotonic()
    records.put(record("old", now - 61))
    assert records.get("old") is None
    records.put(record("new", now))  # a put more than a second later sweeps the expired ones
    assert len(records) == 1
    assert records.get("new") is not None
