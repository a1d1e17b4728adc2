"""Invocation rate limits of a function version (NVCF `rateLimit`), enforced where requests arrive.

A version's `rateLimit` such as `{"rateLimit": "10-S,500-M"}` lets each calling account invoke it at
most 10 times per second and 500 times per minute; `perNcaIdRate` gives some accounts their own rate,
`exemptedNcaIds` are not limited, and `perUserRate` further limits each API key. A request over any
limit is refused with 429 and a `Retry-After`, before it is queued.

Each window is a generic cell rate algorithm (a token bucket holding one window's worth of requests,
refilled evenly): bursts up to the count are admitted, and the rate is smooth rather than reset at
window boundaries. With several API replicas each admits its share of the rate (the configured gateway
replicas split it evenly), so the total stays near the limit when a load balancer spreads requests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

UNIT_SECONDS = {"S": 1.0, "M": 60.0, "H": 3600.0, "D": 86400.0}
MAX_TRACKED_CALLERS = 10_000
"""Callers remembered per version; beyond it, those whose buckets are full again are forgotten."""

_EPSILON = 1e-9
"""Sums of request intervals drift by float rounding; a burst of exactly the count must still pass."""

Window = tuple[float, float]
"""(seconds between requests at the sustained rate, burst tolerance in seconds)."""


def parse_rate(text: str, share: float = 1.0) -> list[Window]:
    """Return the windows of a rate such as `10-S,500-M`, scaled to `share` of the requests.

    Raises:
        ValueError: When the text is not `count-unit[,count-unit...]` with units S, M, H, D.
    """
    windows: list[Window] = []
    for part in text.split(","):
        count_text, _, unit = part.strip().partition("-")
        if not count_text.isdigit() or int(count_text) < 1 or unit not in UNIT_SECONDS:
            raise ValueError(f"Invalid rate '{text}'")
        count = max(1.0, int(count_text) * share)
        period = UNIT_SECONDS[unit]
        interval = period / count
        windows.append((interval, period - interval))
    return windows


class _Buckets:
    """One caller's theoretical arrival time per window (the GCRA state)."""

    __slots__ = ("arrivals",)

    def __init__(self, size: int) -> None:
        self.arrivals = [0.0] * size

    def wait(self, windows: list[Window], now: float) -> float:
        """Return the seconds until every window admits one more request (0 or less: now)."""
        return max(
            max(arrival, now) - now - tolerance
            for (_, tolerance), arrival in zip(windows, self.arrivals, strict=True)
        )

    def take(self, windows: list[Window], now: float) -> None:
        """Count one request in every window."""
        for index, (interval, _) in enumerate(windows):
            self.arrivals[index] = max(self.arrivals[index], now) + interval


class _Limit:
    """One rate applied per caller key."""

    def __init__(self, windows: list[Window]) -> None:
        self.windows = windows
        self.callers: dict[str, _Buckets] = {}

    def buckets(self, caller: str, now: float) -> _Buckets:
        found = self.callers.get(caller)
        if found is None:
            if len(self.callers) >= MAX_TRACKED_CALLERS:
                self.callers = {k: b for k, b in self.callers.items() if max(b.arrivals) > now}
            found = self.callers[caller] = _Buckets(len(self.windows))
        return found


class RateLimit:
    """A version's rate limit, from the `rateLimit` object of its function version.

    Args:
        config: The stored `rateLimit` object (`rateLimit`, `exemptedNcaIds`, `perNcaIdRate`,
            `perUserRate`).
        share: The part of the rate this replica admits (1 / number of gateway replicas).
    """

    def __init__(self, config: Mapping[str, Any], share: float = 1.0) -> None:
        self.config = dict(config)
        self.text = str(config["rateLimit"])
        self._account = _Limit(parse_rate(self.text, share))
        self._exempt = set(config.get("exemptedNcaIds") or [])
        self._per_account = {
            account: _Limit(parse_rate(str(rate), share))
            for account, rate in (config.get("perNcaIdRate") or {}).items()
        }
        per_user = config.get("perUserRate")
        self._per_user = _Limit(parse_rate(str(per_user), share)) if per_user else None

    def admit(self, account: str, key_id: str, now: float) -> int | None:
        """Count one invocation by `account` with key `key_id` at `now` (seconds, monotonic).

        Returns None when admitted, else the whole seconds after which the caller may try again.
        """
        if account in self._exempt:
            return None
        limits = [(self._per_account.get(account, self._account), account)]
        if self._per_user is not None:
            limits.append((self._per_user, key_id))
        buckets = [(limit, limit.buckets(caller, now)) for limit, caller in limits]
        wait = max(bucket.wait(limit.windows, now) for limit, bucket in buckets)
        if wait > _EPSILON:
            # Refused requests count in no window: a caller that backs off gets its full rate back.
            return max(1, math.ceil(wait))
        for limit, bucket in buckets:
            bucket.take(limit.windows, now)
        return None
