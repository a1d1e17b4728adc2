"""NVCF's threshold policy: its wire objects (`autoscalingConfiguration`), their policy, and its step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpufn.autoscaling.models import AutoscalerSettings, AutoscalerState
from gpufn.autoscaling.windows import Step, ceil_count, floor_count, seconds_text
from gpufn.durations import parse_iso_duration

# NVCF's platform policy (function-autoscaler `ScalingThresholds`/`ScalingFactors` defaults).
NVCF_DEFAULT_SCALE_UP_THRESHOLD = 70
NVCF_DEFAULT_SCALE_UP_FACTOR = 1.2
NVCF_DEFAULT_SCALE_DOWN_THRESHOLD = 30
NVCF_DEFAULT_SCALE_DOWN_FACTOR = 0.8

# NVCF rejects stickiness windows longer than an hour.
_MAX_STICKINESS_SECONDS = 3600.0


class StickinessDetails(BaseModel):
    """NVCF stickiness window: act only if the threshold was breached long enough within a window.

    Both fields are ISO-8601 durations as NVCF sends them (`"PT10M"`). NVCF's autoscaler works on
    per-minute samples and truncates both durations to whole minutes; see `window_minutes`.

    Attributes:
        size: Length of the look-back window, at most `PT1H`.
        threshold: Total time within the window the breach must hold, shorter than `size`.
    """

    model_config = ConfigDict(frozen=True)

    size: str
    threshold: str

    @field_validator("size", "threshold")
    @classmethod
    def _is_duration(cls, value: str) -> str:
        parse_iso_duration(value)
        return value

    @model_validator(mode="after")
    def _threshold_within_size(self) -> Self:
        size = parse_iso_duration(self.size)
        threshold = parse_iso_duration(self.threshold)
        if size > _MAX_STICKINESS_SECONDS:
            raise ValueError(f"stickiness size {self.size} is longer than PT1H")
        if threshold >= size:
            raise ValueError(f"stickiness threshold {self.threshold} must be shorter than size {self.size}")
        return self

    @property
    def size_seconds(self) -> float:
        """The window length in seconds."""
        return parse_iso_duration(self.size)

    @property
    def threshold_seconds(self) -> float:
        """The required breach time in seconds."""
        return parse_iso_duration(self.threshold)

    def window_minutes(self) -> tuple[int, int] | None:
        """Return `(window, required)` in whole minutes, or None when stickiness is effectively off.

        NVCF's autoscaler divides both durations by 60 with truncation and ignores stickiness when either
        comes out as 0 (so `PT30S` means "no stickiness"); this does the same so policies behave alike.
        """
        window = int(self.size_seconds // 60)
        required = int(self.threshold_seconds // 60)
        if window <= 0 or required <= 0:
            return None
        return window, required


class ScaleUpDetails(BaseModel):
    """NVCF `scaleUpDetails`: multiply the instance count by `factor` when utilization is over `threshold` %.

    Attributes:
        metric: Scaling metric name; NVCF accepts it but scales on worker utilization only, and so do we.
        factor: Multiplier, greater than 1.0.
        threshold: Utilization percentage (0-100, an integer as in NVCF's DTO) above which to scale up.
        stickiness: Optional window the breach must hold for before acting.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    metric: str | None = None
    factor: float = Field(gt=1.0)
    threshold: int = Field(ge=0, le=100)
    stickiness: StickinessDetails | None = None


class ScaleDownDetails(BaseModel):
    """NVCF `scaleDownDetails`: multiply the instance count by `factor` when utilization is under `threshold`.

    Attributes:
        metric: Scaling metric name (NVCF uses one DTO for both directions, so it is accepted here too).
        factor: Multiplier, between 0 and 1 (exclusive).
        threshold: Utilization percentage (0-100, an integer as in NVCF's DTO) below which to scale down.
        stickiness: Optional window the breach must hold for before acting.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    metric: str | None = None
    factor: float = Field(gt=0.0, lt=1.0)
    threshold: int = Field(ge=0, le=100)
    stickiness: StickinessDetails | None = None


class AutoscalingConfiguration(BaseModel):
    """NVCF's `autoscalingConfiguration` object, field names as on the wire.

    Attributes:
        scaleUpDetails: Scale-up policy; NVCF's default (> 70 %, x1.2) when absent.
        scaleDownDetails: Scale-down policy; NVCF's default (< 30 %, x0.8) when absent.
    """

    scaleUpDetails: ScaleUpDetails | None = None
    scaleDownDetails: ScaleDownDetails | None = None

    @property
    def is_custom(self) -> bool:
        """Whether either half is set, i.e. whether the NVCF policy replaces gpufn's KPA policy."""
        return self.scaleUpDetails is not None or self.scaleDownDetails is not None


@dataclass(frozen=True)
class NvcfPolicy:
    """An NVCF policy with defaults filled in, as the decider applies it.

    Attributes:
        up_threshold: Scale up when utilization % is strictly above this.
        up_factor: Scale-up multiplier.
        down_threshold: Scale down when utilization % is strictly below this.
        down_factor: Scale-down multiplier.
        up_stickiness: `(window, required)` minutes for scale-up, or None for an instantaneous check.
        down_stickiness: The same for scale-down.
        note: Why the configuration was not applied as given (None when it was).
    """

    up_threshold: float
    up_factor: float
    down_threshold: float
    down_factor: float
    up_stickiness: tuple[int, int] | None = None
    down_stickiness: tuple[int, int] | None = None
    note: str | None = None

    @property
    def longest_window_minutes(self) -> int:
        """The longest stickiness window, which bounds how many minute samples are kept."""
        windows = [s[0] for s in (self.up_stickiness, self.down_stickiness) if s is not None]
        return max(windows, default=0)


_NVCF_DEFAULT_POLICY = NvcfPolicy(
    up_threshold=NVCF_DEFAULT_SCALE_UP_THRESHOLD,
    up_factor=NVCF_DEFAULT_SCALE_UP_FACTOR,
    down_threshold=NVCF_DEFAULT_SCALE_DOWN_THRESHOLD,
    down_factor=NVCF_DEFAULT_SCALE_DOWN_FACTOR,
)


def resolve_nvcf_policy(config: AutoscalingConfiguration) -> NvcfPolicy:
    """Fill in NVCF defaults for a missing half and reject contradictory thresholds.

    A missing `scaleUpDetails` or `scaleDownDetails` takes NVCF's default for that half. When the
    resulting scale-up threshold is not above the scale-down threshold the policy would scale up and
    down on the same reading, so the whole policy falls back to NVCF's defaults, as NVCF's autoscaler
    does with an invalid custom policy; `note` says so.

    Args:
        config: The deployment's `autoscalingConfiguration`.

    Returns:
        The policy the decider applies.
    """
    up, down = config.scaleUpDetails, config.scaleDownDetails
    policy = NvcfPolicy(
        up_threshold=float(up.threshold) if up else float(NVCF_DEFAULT_SCALE_UP_THRESHOLD),
        up_factor=up.factor if up else NVCF_DEFAULT_SCALE_UP_FACTOR,
        down_threshold=float(down.threshold) if down else float(NVCF_DEFAULT_SCALE_DOWN_THRESHOLD),
        down_factor=down.factor if down else NVCF_DEFAULT_SCALE_DOWN_FACTOR,
        up_stickiness=up.stickiness.window_minutes() if up and up.stickiness else None,
        down_stickiness=down.stickiness.window_minutes() if down and down.stickiness else None,
    )
    if policy.up_threshold <= policy.down_threshold:
        return NvcfPolicy(
            up_threshold=_NVCF_DEFAULT_POLICY.up_threshold,
            up_factor=_NVCF_DEFAULT_POLICY.up_factor,
            down_threshold=_NVCF_DEFAULT_POLICY.down_threshold,
            down_factor=_NVCF_DEFAULT_POLICY.down_factor,
            note=(
                f"scale-up threshold {policy.up_threshold:g} % is not above scale-down threshold "
                f"{policy.down_threshold:g} %; using NVCF defaults"
            ),
        )
    return policy


def nvcf_step(
    settings: AutoscalerSettings,
    state: AutoscalerState,
    mrc: int,
    now: float,
    stable: float,
    current: int,
    policy: NvcfPolicy,
) -> tuple[Step, float]:
    """NVCF threshold policy: utilization against thresholds, factors, stickiness."""
    s, st = settings, state
    # NVCF treats zero instances as one so the factors never multiply zero.
    base = max(current, 1)
    capacity = base * mrc
    utilization = stable / capacity * 100.0
    util_text = (
        f"utilization {utilization:.1f} % (load {stable:.1f} over {seconds_text(s.stableWindowSeconds)} s "
        f"/ capacity {capacity} = {base} * {mrc})"
    )
    if policy.note:
        util_text += f" [{policy.note}]"

    up, up_text = breached(state, now, policy.up_stickiness, capacity, utilization, policy.up_threshold, True)
    if up:
        desired = max(base + 1, ceil_count(base * policy.up_factor))
        return (
            Step(
                desired,
                "nvcf-scale-up",
                f"{util_text} above scale-up threshold {policy.up_threshold:g} %{up_text} "
                f"→ ceil({base} * {policy.up_factor:g}) = {desired}",
            ),
            utilization,
        )

    down, down_text = breached(
        state, now, policy.down_stickiness, capacity, utilization, policy.down_threshold, False
    )
    if down:
        seen = now - st.firstRecordAt if st.firstRecordAt is not None else 0.0
        if seen < s.stableWindowSeconds:
            # Mirrors KPA's restart rule: a short history must not trigger a scale-down.
            return (
                Step(
                    base,
                    "no-change",
                    f"{util_text} below scale-down threshold {policy.down_threshold:g} %{down_text}, "
                    f"but only {seen:.0f} s of samples (< {seconds_text(s.stableWindowSeconds)} s) → {base}",
                ),
                utilization,
            )
        desired = max(1, floor_count(base * policy.down_factor))
        if desired < base:
            return (
                Step(
                    desired,
                    "nvcf-scale-down",
                    f"{util_text} below scale-down threshold {policy.down_threshold:g} %{down_text} "
                    f"→ floor({base} * {policy.down_factor:g}) = {desired}",
                ),
                utilization,
            )
        return (
            Step(
                base,
                "no-change",
                f"{util_text} below scale-down threshold {policy.down_threshold:g} %{down_text}, "
                f"but scale-down never goes below 1 instance → {base}",
            ),
            utilization,
        )

    return (
        Step(
            base,
            "no-change",
            f"{util_text} within [{policy.down_threshold:g} %, {policy.up_threshold:g} %]{up_text}"
            f"{down_text} → {base}",
        ),
        utilization,
    )


def breached(
    state: AutoscalerState,
    now: float,
    stickiness: tuple[int, int] | None,
    capacity: int,
    utilization: float,
    threshold: float,
    above: bool,
) -> tuple[bool, str]:
    """Whether a threshold counts as breached, and a reason fragment when stickiness decided it.

    Without stickiness the stable-window utilization decides at once. With stickiness (NVCF
    semantics) at least `required` of the last `window` completed minutes must breach; the minutes
    need not be consecutive. Each minute's mean load is compared against the capacity that exists
    now, not the capacity at the time: right after a scale-up the old overloaded minutes stop
    counting, so the policy does not keep multiplying on stale samples.
    """
    if stickiness is None:
        return (utilization > threshold if above else utilization < threshold), ""
    window, required = stickiness
    this_minute = math.floor(now / 60.0)
    count = 0
    for minute, total, samples in state.minuteBuckets:
        if this_minute - window <= minute < this_minute:
            minute_util = total / samples / capacity * 100.0
            if (minute_util > threshold) if above else (minute_util < threshold):
                count += 1
    return count >= required, f" in {count} of the last {window} min (needs {required})"
