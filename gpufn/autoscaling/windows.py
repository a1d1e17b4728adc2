"""Shared window math of both policies: rounding, load buckets, and a count on its way through the rules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# Ratios such as 2.1 / (0.7 * 3) come out as 1.0000000000000002 in binary floating point; without a
# tolerance, ceil() would ask for one instance too many (and floor() one too few) on exact multiples.
_EPSILON = 1e-9

ScalingRule = Literal[
    "stable",
    "panic",
    "scale-down-delay",
    "activation",
    "scale-to-zero",
    "scale-to-zero-wait",
    "nvcf-scale-up",
    "nvcf-scale-down",
    "bounds",
    "no-change",
]
"""Machine-readable name of the rule that settled a decision (see `ScalingDecision.rule`)."""


def ceil_count(value: float) -> int:
    """Round up, forgiving float noise on exact multiples."""
    return math.ceil(value - _EPSILON)


def floor_count(value: float) -> int:
    """Round down, forgiving float noise on exact multiples."""
    return math.floor(value + _EPSILON)


def seconds_text(value: float) -> str:
    """Format a number of seconds for a reason sentence: `60`, `0.5`."""
    return f"{value:g}"


@dataclass
class Step:
    """A count on its way through the rule pipeline, with the rule and sentence that produced it."""

    desired: int
    rule: ScalingRule
    reason: str


def add_sample(buckets: list[tuple[int, float, int]], key: int, load: float) -> None:
    """Add one load sample to the bucket `key`, creating it at the end when new."""
    if buckets and key <= buckets[-1][0]:
        # Same bucket, or a clock that stepped back (a retried activity on another host): fold the
        # sample into the newest bucket instead of reordering history.
        last_key, total, count = buckets[-1]
        buckets[-1] = (last_key, total + load, count + 1)
    else:
        buckets.append((key, load, 1))
