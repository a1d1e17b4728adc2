"""What wakes a version's watcher: a change the informers saw, or a pod's bound passing.

Informers call `notify` from their threads; the backend's activities wait on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from datetime import UTC, datetime

WAKE_SLACK_SECONDS = 0.05
"""Sleep this much past a deadline, so the pod is judged after its bound, not just before."""


class Wakeups:
    """Per-version events and deadlines, keyed by the version's label value."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._deadlines: dict[str, datetime] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver notifications to this loop (the activities' loop)."""
        self._loop = loop

    def notify(self, keys: set[str]) -> None:
        """Called from an informer's thread: wake the watchers of the changed versions."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake, keys)

    def _wake(self, keys: set[str]) -> None:
        for key in keys:
            event = self._events.get(key)
            if event is not None:
                event.set()

    def _event(self, key: str) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    def observed(self, key: str, deadlines: Iterable[datetime | None]) -> None:
        """Record that the version was just observed: forget older changes, keep its earliest deadline."""
        self._event(key).clear()
        due = [d for d in deadlines if d is not None]
        if due:
            self._deadlines[key] = min(due)
        else:
            self._deadlines.pop(key, None)

    async def wait(self, key: str, max_wait: float) -> None:
        """Return when the version changed, its earliest deadline passed, or after `max_wait` seconds."""
        timeout = max(0.0, max_wait)
        deadline = self._deadlines.get(key)
        if deadline is not None:
            until = (deadline - datetime.now(UTC)).total_seconds() + WAKE_SLACK_SECONDS
            timeout = min(timeout, max(WAKE_SLACK_SECONDS, until))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event(key).wait(), timeout=timeout)

    def forget(self, key: str) -> None:
        """Drop what is kept of a version that is gone."""
        self._events.pop(key, None)
        self._deadlines.pop(key, None)
