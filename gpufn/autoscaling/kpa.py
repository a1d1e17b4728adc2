"""The KPA policy (after Knative's pod autoscaler): stable and panic counts, rate limits, scale-down delay."""

from __future__ import annotations

import math

from gpufn.autoscaling.models import AutoscalerSettings, AutoscalerState
from gpufn.autoscaling.windows import Step, ceil_count, floor_count, seconds_text


def kpa_step(
    settings: AutoscalerSettings,
    state: AutoscalerState,
    now: float,
    stable: float,
    panic: float,
    ready: int,
    current: int,
    target: float,
    fresh: bool,
) -> Step:
    """Knative KPA: stable/panic counts, rate limits, panic mode, scale-down delay."""
    s, st = settings, state
    # Rates are relative to ready instances, counted as at least one so a version at zero can grow.
    ready_base = max(ready, 1)
    # The up-rate limits growth only: it never asks to drop instances that are already starting
    # (GPU instances take minutes to become ready, so `ready` can lag `current` for a long time).
    highest = max(ceil_count(ready_base * s.maxScaleUpRate), current)
    lowest = floor_count(ready_base / s.maxScaleDownRate)
    want_stable = ceil_count(stable / target)
    want_panic = ceil_count(panic / target)
    stable_count = min(want_stable, highest)
    panic_count = min(want_panic, highest)

    restarted = False
    if fresh and max(ready, current) > 1 and st.panicSince is None:
        # Lost history must not cause a scale-down: hold today's count until a stable window of new
        # samples has been seen (KPA starts a new decider in panic for the same reason). KPA looks at
        # ready pods only; instances still booting are held too, because a GPU instance thrown away
        # here costs minutes to get back.
        st.panicSince = now
        st.panicLastCrossedAt = now
        st.maxPanicPods = max(ready, current)
        restarted = True

    panic_ratio = want_panic / ready_base
    if panic_ratio >= s.panicThreshold:
        if st.panicSince is None:
            st.panicSince = now
            st.maxPanicPods = 0
        st.panicLastCrossedAt = now
    elif (
        st.panicSince is not None
        and st.panicLastCrossedAt is not None
        and now - st.panicLastCrossedAt >= s.stableWindowSeconds
    ):
        st.panicSince = None
        st.panicLastCrossedAt = None
        st.maxPanicPods = 0

    stable_text = (
        f"stable load {stable:.1f} over {seconds_text(s.stableWindowSeconds)} s / target {target:.1f} "
        f"per instance → {stable_count}"
    )
    if stable_count != want_stable:
        stable_text += f" (rate-limited from {want_stable})"

    if st.panicSince is not None:
        desired = max(panic_count, stable_count, st.maxPanicPods)
        st.maxPanicPods = desired
        held_since = st.panicLastCrossedAt if st.panicLastCrossedAt is not None else now
        calm = max(0.0, now - held_since)
        cause = (
            f"restarted without load history with {ready} ready of {current} instances"
            if restarted
            else f"panic since t={st.panicSince:g}"
        )
        step = Step(
            desired,
            "panic",
            f"panic ({cause}): load {panic:.1f} over {seconds_text(s.panicWindowSeconds)} s / target "
            f"{target:.1f} per instance → {panic_count} ({panic_ratio:.0%} of {ready_base} ready, "
            f"threshold {s.panicThreshold:.0%}); {stable_text}; no scale-down until "
            f"{seconds_text(s.stableWindowSeconds)} s below the threshold ({calm:.0f} s so far) → {desired}",
        )
    else:
        step = Step(stable_count, "stable", stable_text)

    # The delay window sees what the load asked for, before the scale-down rate limit: recording
    # rate-limited counts would restart the delay at every halving step (12 → 6 → 3 → 1 would take
    # three delays instead of one).
    held = scale_down_delay(settings, state, now, step.desired)
    if held > step.desired:
        step = Step(
            held,
            "scale-down-delay",
            f"scale-down delay: keeping {held}, the highest count wanted in the last "
            f"{seconds_text(s.scaleDownDelaySeconds)} s ({step.reason})",
        )
    if step.desired < lowest:
        step = Step(
            lowest,
            step.rule,
            f"{step.reason}; scale-down rate limit: {ready_base} ready / {s.maxScaleDownRate:g} → {lowest}",
        )
    return step


def scale_down_delay(settings: AutoscalerSettings, state: AutoscalerState, now: float, desired: int) -> int:
    """Record `desired` and return the highest count recorded within the scale-down delay."""
    window = state.delayWindow
    delay = settings.scaleDownDelaySeconds
    if delay <= 0:
        window.clear()
        return desired
    second = math.floor(now)
    # A sliding-window maximum: an entry that is not larger than a newer one can never be the maximum
    # again, so values strictly decrease from front to back. That bounds the list by the window's
    # length in seconds and by the largest count, however long the decider runs.
    while window and window[-1][1] <= desired:
        window.pop()
    if not window or window[-1][0] < second:
        window.append((second, desired))
    # Otherwise a larger count from this very second is already there and outlives this one.
    oldest = second - delay
    drop = 0
    while drop < len(window) - 1 and window[drop][0] <= oldest:
        drop += 1
    del window[:drop]
    return window[0][1]
