"""An event-loop lag probe for the benchmarks: how long the loop ran without a break, and GC pauses."""

from __future__ import annotations

import asyncio
import time
from typing import Any


class LagProbe:
    """Event-loop lag: a task that sleeps 1 ms again and again and records how late each wake-up came.

    A wake-up late by 20 ms means the loop ran something else for 20 ms without a break (a GC pass, a
    sweep over many objects): every request on that loop waited as long.
    """

    TICK = 0.001

    def __init__(self) -> None:
        self._overshoots: list[float] = []
        self._collections: list[tuple[int, float]] = []
        """(generation, seconds) of each garbage collection, timed by a `gc.callbacks` hook."""
        self._gc_started = 0.0

    def watch_gc(self) -> None:
        """Time every garbage collection of this process from now on."""
        import gc

        def timed(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                self._gc_started = time.perf_counter()
            else:
                self._collections.append((info["generation"], time.perf_counter() - self._gc_started))

        gc.callbacks.append(timed)

    async def run(self) -> None:
        """Sleep `TICK` forever, recording each wake-up's delay beyond it."""
        clock = time.perf_counter
        record = self._overshoots.append
        while True:
            before = clock()
            await asyncio.sleep(self.TICK)
            record(clock() - before - self.TICK)

    def take(self) -> dict[str, Any]:
        """Return the lag figures (ms) since the last call, and start afresh."""
        lags = sorted(self._overshoots)
        self._overshoots.clear()  # the same list: `run` appends to it
        full = [seconds for generation, seconds in self._collections if generation == 2]
        young = [seconds for generation, seconds in self._collections if generation < 2]
        self._collections.clear()
        count = len(lags)
        if not count:
            return {"lag_samples": 0}
        return {
            "gc_full": len(full),
            "gc_full_max_ms": max(full, default=0.0) * 1e3,
            "gc_young": len(young),
            "gc_young_max_ms": max(young, default=0.0) * 1e3,
            "lag_samples": count,
            "lag_p50_ms": lags[count // 2] * 1e3,
            "lag_p99_ms": lags[min(count - 1, int(count * 0.99))] * 1e3,
            "lag_max_ms": lags[-1] * 1e3,
            "lag_over_10ms": sum(1 for lag in lags if lag > 0.010),
        }
