"""The load report as deltas: each poller gets only the versions whose load changed since its last poll.

Workers poll every gateway's load twice a second. With a thousand deployed versions, almost all idle,
a full report would be a thousand entries encoded and decoded per poll for nothing; a delta is a few
bytes. A poller sends back the `epoch` and `generation` of the last report it applied; a reply is a
full report when the poller has none, when the gateway restarted (new epoch), or when its removals are
older than the gateway remembers.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from gpufn.contracts import LOAD_REPORT_SCHEMA, LoadReportBody, VersionLoadEntry

MAX_TOMBSTONES = 10_000
"""Removed versions remembered for deltas; pollers further behind get a full report."""


class LoadReport:
    """Tracks each version's last reported load entry and the generation at which it changed.

    Args:
        snapshot: Returns every version's current load entry (version ID -> JSON object).
    """

    def __init__(self, snapshot: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._snapshot = snapshot
        self.epoch = secrets.token_hex(8)
        self._generation = 0
        self._entries: dict[str, dict[str, Any]] = {}
        self._changed_at: dict[str, int] = {}
        self._removed_at: dict[str, int] = {}
        self._forgotten_before = 0
        """Removals at or before this generation are no longer remembered."""

    def report(self, since: int | None = None, epoch: str | None = None) -> dict[str, Any]:
        """Return the versions changed after generation `since` of `epoch`, or all when that is unknown.

        The reply has `epoch`, `generation`, `full` (whether `versions` holds every version), `versions`
        (version ID -> load entry) and `removed` (version IDs gone since `since`; empty when full): a
        `gpufn.contracts.LoadReportBody`, as JSON.
        """
        self._refresh()
        full = (
            since is None or epoch != self.epoch or since < self._forgotten_before or since > self._generation
        )
        if full:
            versions = self._entries
            removed: list[str] = []
        else:
            assert since is not None
            versions = {v: self._entries[v] for v, at in self._changed_at.items() if at > since}
            removed = [v for v, at in self._removed_at.items() if at > since]
        return LoadReportBody(
            schema_version=LOAD_REPORT_SCHEMA,
            epoch=self.epoch,
            generation=self._generation,
            full=full,
            versions={v: VersionLoadEntry.model_validate(entry) for v, entry in versions.items()},
            removed=removed,
        ).to_json(exclude_unset=True)

    def _refresh(self) -> None:
        """Compare the current load with the last report and stamp what changed with a new generation."""
        current = self._snapshot()
        generation = self._generation + 1
        changed = False
        for version_id, entry in current.items():
            if self._entries.get(version_id) != entry:
                self._entries[version_id] = entry
                self._changed_at[version_id] = generation
                self._removed_at.pop(version_id, None)
                changed = True
        for version_id in [v for v in self._entries if v not in current]:
            del self._entries[version_id]
            del self._changed_at[version_id]
            self._removed_at[version_id] = generation
            changed = True
        if changed:
            self._generation = generation
        if len(self._removed_at) > MAX_TOMBSTONES:
            oldest = sorted(self._removed_at.items(), key=lambda item: item[1])[: MAX_TOMBSTONES // 2]
            for version_id, at in oldest:
                del self._removed_at[version_id]
                self._forgotten_before = max(self._forgotten_before, at)
