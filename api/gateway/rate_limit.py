"""Invocation rate limits of a function version (NVCF `rateLimit`), enforced where requests arrive.

A version's `rateLimit` such as `{"rateLimit": "10-S,500-M"}` lets each calling account invoke it at
most 10 times per second and 500 times per minute; `perNcaIdRate` gives some accounts their own rate,
`exemptedNcaIds` are not limited, and `perUserRate` further limits each API key. A request over any
limit is refused with 429 and a `Retry-After`, before it is queued.

Each window is a generic cell rate algorithm (a token bucket holding one window's worth of requests,
refilled evenly): bursts up to the count are admitted, and the rate is smooth rather than reset at
window boundaries. The arithmetic is exact (integer nanoseconds scaled by the count), so a burst of
exactly the count passes however long the process has run. With several API replicas each admits its
share of the rate (1 / the number of replicas), so the total is the limit when requests are spread
evenly.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

UNIT_NANOSECONDS = {"S": 10**9, "M": 60 * 10**9, "H": 3600 * 10**9, "D": 86400 * 10**9}
MAX_COUNT = 10**9
"""The largest count a window may have (the API refuses larger ones)."""
MAX_TRACKED_CALLERS = 10_000
"""Callers remembered per limit; past it the least recently seen is forgotten (its bucket starts full)."""


@dataclass(frozen=True)
class Window:
    """One `count-unit` window, in units of nanoseconds x count so that every step is an integer.

    A caller's next allowed time advances by `interval` per request (the window's length x the number
    of replicas sharing it); a request is admitted while that time is at most `tolerance` ahead of now.
    """

    count: int
    interval: int
    tolerance: int


def parse_rate(text: str, replicas: int = 1) -> list[Window]:
    """Return the windows of a rate such as `10-S,500-M`, for one of `replicas` gateways.

    Raises:
        ValueError: When the text is not `count-unit[,count-unit...]` with units S, M, H, D and counts
            from 1 to `MAX_COUNT`.
    """
    windows: list[Window] = []
    for part in text.split(","):
        count_text, _, unit = part.strip().partition("-")
        if not count_text.isdigit() or len(count_text) > 10 or unit not in UNIT_NANOSECONDS:
            raise ValueError(f"Invalid rate '{text}'")
        count = int(count_text)
        if not 1 <= count <= MAX_COUNT:
            raise ValueError(f"Invalid rate '{text}': counts go from 1 to {MAX_COUNT}")
        period = UNIT_NANOSECONDS[unit]
        # In units of 1/count ns: one request costs period x replicas; the burst is the window's share.
        windows.append(Window(count, period * replicas, max(0, period * (count - replicas))))
    return windows


class _Limit:
    """One rate applied per caller key: each caller's next allowed time per window."""

    def __init__(self, windows: list[Window]) -> None:
        self.windows = windows
        self._callers: OrderedDict[str, list[int]] = OrderedDict()

    def next_allowed(self, caller: str) -> list[int]:
        found = self._callers.get(caller)
        if found is None:
            found = self._callers[caller] = [0] * len(self.windows)
            if len(self._callers) > MAX_TRACKED_CALLERS:
                self._callers.popitem(last=False)
        else:
            self._callers.move_to_end(caller)
        return found

    def wait_ns(self, allowed: list[int], now_ns: int) -> int:
        """Return the nanoseconds until every window admits one more request (0: now)."""
        wait = 0
        for window, arrival in zip(self.windows, allowed, strict=True):
            now = now_ns * window.count
            ahead = max(arrival, now) - now - window.tolerance
            if ahead > 0:
                wait = max(wait, -(-ahead // window.count))
        return wait

    def take(self, allowed: list[int], now_ns: int) -> None:
        """Count one request in every window."""
        for index, window in enumerate(self.windows):
            allowed[index] = max(allowed[index], now_ns * window.count) + window.interval


class RateLimit:
    """A version's rate limit, from the `rateLimit` object of its function version.

    Args:
        config: The stored `rateLimit` object (`rateLimit`, `exemptedNcaIds`, `perNcaIdRate`,
            `perUserRate`).
        replicas: How many gateway replicas share the rate.

    Raises:
        ValueError: When a rate in the object is invalid.
    """

    def __init__(self, config: Mapping[str, Any], replicas: int = 1) -> None:
        self.config = dict(config)
        self.text = str(config["rateLimit"])
        self._account = _Limit(parse_rate(self.text, replicas))
        self._exempt = set(config.get("exemptedNcaIds") or [])
        self._per_account = {
            str(account): _Limit(parse_rate(str(rate), replicas))
            for account, rate in (config.get("perNcaIdRate") or {}).items()
        }
        per_user = config.get("perUserRate")
        self._per_user = _Limit(parse_rate(str(per_user), replicas)) if per_user else None

    @classmethod
    def from_route(cls, config: object, replicas: int) -> RateLimit | None:
        """Return the limit of a route's `rateLimit` entry; None when it has none or it is invalid."""
        if not isinstance(config, Mapping) or not config.get("rateLimit"):
            return None
        try:
            return cls(config, replicas)
        except (TypeError, ValueError) as err:
            log.warning("Ignoring an invalid rate limit %s: %s", config, err)
            return None

    def admit(self, account: str, key_id: str, now_ns: int) -> int | None:
        """Count one invocation by `account` with key `key_id` at `now_ns` (monotonic nanoseconds).

        Returns None when admitted, else the whole seconds after which the caller may try again.
        """
        if account in self._exempt:
            return None
        checks = [(limit, limit.next_allowed(caller)) for limit, caller in self._limits(account, key_id)]
        wait = max(limit.wait_ns(allowed, now_ns) for limit, allowed in checks)
        if wait > 0:
            # Refused requests count in no window: a caller that backs off gets its full rate back.
            return max(1, math.ceil(wait / 10**9))
        for limit, allowed in checks:
            limit.take(allowed, now_ns)
        return None

    def _limits(self, account: str, key_id: str) -> list[tuple[_Limit, str]]:
        limits = [(self._per_account.get(account, self._account), account)]
        if self._per_user is not None:
            limits.append((self._per_user, key_id))
        return limits
