"""Scale decisions for one function version: Knative-style KPA by default, NVCF's threshold policy on request.

Everything here is pure and deterministic: no I/O, no wall clock, no randomness. Time comes in as float
seconds, so the same inputs always give the same decisions. That lets the decider run inside a Temporal
activity (its state goes into heartbeat details or workflow state as JSON) and be tested on recorded traces.

Each `decide` runs one pipeline; `ScalingDecision.rule` names the step that settled the count.

KPA (default, after Knative's pod autoscaler; signal = in-flight + queued requests, 1-second buckets):

1. `stable`: desired = ceil(stable-window average / target), target = targetUtilization x
   maxRequestConcurrency; growth limited to ceil(max(ready, 1) x maxScaleUpRate).
2. `panic`: starts when ceil(panic-window average / target) / max(ready, 1) >= panicThreshold, and ends
   after a full stable window without reaching it again; while it lasts the count never goes down. A
   decider without history that sees more than one instance (ready or starting) starts in panic, holding
   that count (lost history must not cause a scale-down).
3. `scale-down-delay`: the count is the highest one wanted within the last scaleDownDelaySeconds.
   Then the scale-down rate limit: never below floor(max(ready, 1) / maxScaleDownRate) in one decision.

NVCF (when the deployment's `autoscalingConfiguration` has either half; NVCF defaults fill a missing half):

* `nvcf-scale-up`: utilization = stable-window load / (current x maxRequestConcurrency) x 100 above the
  scale-up threshold → ceil(current x factor), at least one more.
* `nvcf-scale-down`: below the scale-down threshold → floor(current x factor), never below 1, and only
  once a full stable window of samples exists.
* With stickiness, the breach must hold in `threshold` of the last `size` completed minutes instead.

Both, in this order after the policy:

* `activation`: with no instances, any load gives at least one at once.
* `scale-to-zero`: with minInstances 0, after scaleToZeroIdleSeconds of load exactly 0 → 0.
* `scale-to-zero-wait`: with minInstances 0 the last instance stays until then.
* `bounds`: the count is clamped to [minInstances, maxInstances].
* `no-change`: the policy asks for the current count.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpufn.durations import parse_iso_duration

__all__ = [
    "NVCF_DEFAULT_SCALE_DOWN_FACTOR",
    "NVCF_DEFAULT_SCALE_DOWN_THRESHOLD",
    "NVCF_DEFAULT_SCALE_UP_FACTOR",
    "NVCF_DEFAULT_SCALE_UP_THRESHOLD",
    "Autoscaler",
    "AutoscalerSettings",
    "AutoscalerState",
    "AutoscalingConfiguration",
    "NvcfPolicy",
    "ScaleDownDetails",
    "ScaleUpDetails",
    "ScalingDecision",
    "ScalingRule",
    "StickinessDetails",
    "resolve_nvcf_policy",
]

# NVCF's platform policy (function-autoscaler `ScalingThresholds`/`ScalingFactors` defaults).
NVCF_DEFAULT_SCALE_UP_THRESHOLD = 70
NVCF_DEFAULT_SCALE_UP_FACTOR = 1.2
NVCF_DEFAULT_SCALE_DOWN_THRESHOLD = 30
NVCF_DEFAULT_SCALE_DOWN_FACTOR = 0.8

# NVCF rejects stickiness windows longer than an hour.
_MAX_STICKINESS_SECONDS = 3600.0

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


def _ceil(value: float) -> int:
    return math.ceil(value - _EPSILON)


def _floor(value: float) -> int:
    return math.floor(value + _EPSILON)


def _seconds(value: float) -> str:
    """Format a number of seconds for a reason sentence: `60`, `0.5`."""
    return f"{value:g}"


# --------------------------------------------------------------------------------------------------
# NVCF wire objects (`autoscalingConfiguration` on a deployment's GPU specification)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# gpufn settings, decisions and state
# --------------------------------------------------------------------------------------------------


class AutoscalerSettings(BaseModel):
    """gpufn's per-deployment autoscaler overrides (KPA policy, scale to zero, loop timing).

    Attributes:
        targetUtilization: Share of `maxRequestConcurrency` each instance should carry (KPA's
            container-concurrency target percentage, as a fraction).
        stableWindowSeconds: Averaging window for normal decisions (and how long panic lasts after the
            last burst).
        panicWindowSeconds: Short averaging window that detects bursts; at most the stable window.
        panicThreshold: Panic when the panic-window count reaches this multiple of ready instances.
        scaleDownDelaySeconds: Keep the highest count wanted within this window (0 disables; at most 1 h).
        maxScaleUpRate: At most this multiple of ready instances per decision.
        maxScaleDownRate: At least ready instances divided by this per decision.
        scaleToZeroIdleSeconds: Idle time (load exactly 0) after which the version goes to zero instances
            when `minInstances` is 0, whatever the other rules say (like NVCF's idle path; the scale-down
            delay does not extend it). Before that, at least one instance stays.
        tickSeconds: How often the caller should record load and decide (not used by the decider itself).
        drainTimeoutSeconds: How long the caller lets a removed instance finish its requests (not used by
            the decider itself).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    targetUtilization: float = Field(0.7, gt=0.0, le=1.0)
    stableWindowSeconds: float = Field(60.0, ge=1.0, le=3600.0)
    panicWindowSeconds: float = Field(6.0, ge=1.0, le=3600.0)
    panicThreshold: float = Field(2.0, ge=1.1, le=10.0)
    scaleDownDelaySeconds: float = Field(300.0, ge=0.0, le=3600.0)
    maxScaleUpRate: float = Field(1000.0, gt=1.0)
    maxScaleDownRate: float = Field(2.0, gt=1.0)
    scaleToZeroIdleSeconds: float = Field(300.0, ge=0.0)
    tickSeconds: float = Field(0.5, gt=0.0, le=60.0)
    drainTimeoutSeconds: float = Field(60.0, ge=0.0)

    @model_validator(mode="after")
    def _windows_consistent(self) -> Self:
        if self.panicWindowSeconds > self.stableWindowSeconds:
            raise ValueError(
                f"panicWindowSeconds ({self.panicWindowSeconds:g}) must not exceed "
                f"stableWindowSeconds ({self.stableWindowSeconds:g})"
            )
        if self.tickSeconds > self.stableWindowSeconds:
            raise ValueError(
                f"tickSeconds ({self.tickSeconds:g}) must not exceed "
                f"stableWindowSeconds ({self.stableWindowSeconds:g})"
            )
        return self


class ScalingDecision(BaseModel):
    """One decision: how many instances the version should have, and why.

    Attributes:
        desired: Instance count to aim for (already within `[minInstances, maxInstances]`).
        current: The `current` count the decision was made against.
        rule: Name of the rule that settled the count.
        reason: A sentence for users, with the metric values behind the count.
        stableLoad: Average load over the stable window.
        panicLoad: Average load over the panic window.
        panicking: Whether KPA panic mode is on (always False in NVCF mode).
        targetPerInstance: KPA: load per instance aimed at. NVCF: load per instance at the scale-up threshold.
        utilization: NVCF mode only: stable-window load as a percentage of current capacity.
    """

    desired: int
    current: int
    rule: ScalingRule
    reason: str
    stableLoad: float
    panicLoad: float
    panicking: bool
    targetPerInstance: float
    utilization: float | None = None


class AutoscalerState(BaseModel):
    """Everything the decider remembers between ticks; JSON round-trips exactly.

    All sequences are bounded: load buckets by the stable window (at most 3601 entries), minute samples
    by the longest stickiness window (at most 61), the delay window by its length and by the count it
    holds (its values strictly decrease from front to back).

    Attributes:
        schemaVersion: Layout version of this model, for later migrations.
        started: False until the first decision; a decider that starts without history and sees more
            than one instance (ready or requested) begins in panic.
        buckets: `(second, sum of loads, number of samples)` per whole second, oldest first.
        minuteBuckets: The same per whole minute (NVCF stickiness), oldest first.
        firstRecordAt: Time of the first load sample this state has seen.
        lastRecordAt: Time of the latest load sample.
        lastLoad: The latest load sample.
        lastNonzeroAt: Time of the latest load sample above zero.
        panicSince: When the current panic started (None when not panicking).
        panicLastCrossedAt: The latest time the panic threshold was reached in this panic.
        maxPanicPods: Highest count wanted during this panic.
        delayWindow: `(second, desired)` pairs for the scale-down delay; values strictly decrease.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    schemaVersion: int = 1
    started: bool = False
    buckets: list[tuple[int, float, int]] = Field(default_factory=list)
    minuteBuckets: list[tuple[int, float, int]] = Field(default_factory=list)
    firstRecordAt: float | None = None
    lastRecordAt: float | None = None
    lastLoad: float = 0.0
    lastNonzeroAt: float | None = None
    panicSince: float | None = None
    panicLastCrossedAt: float | None = None
    maxPanicPods: int = 0
    delayWindow: list[tuple[int, int]] = Field(default_factory=list)


@dataclass
class _Step:
    """A count on its way through the rule pipeline, with the rule and sentence that produced it."""

    desired: int
    rule: ScalingRule
    reason: str


def _add_sample(buckets: list[tuple[int, float, int]], key: int, load: float) -> None:
    """Add one load sample to the bucket `key`, creating it at the end when new."""
    if buckets and key <= buckets[-1][0]:
        # Same bucket, or a clock that stepped back (a retried activity on another host): fold the
        # sample into the newest bucket instead of reordering history.
        last_key, total, count = buckets[-1]
        buckets[-1] = (last_key, total + load, count + 1)
    else:
        buckets.append((key, load, 1))


class Autoscaler:
    """Decides the instance count of one function version from its recorded load.

    Call `record` every tick with the version's load, then `decide`. Persist `state` (a pydantic model)
    to resume after a restart; a decider started without state has no history and is careful about
    scaling down (KPA: starts in panic when more than one instance is ready or requested; NVCF: no
    scale-down until a full stable window of samples).

    Args:
        settings: gpufn's autoscaler settings for the deployment.
        nvcf: The deployment's NVCF `autoscalingConfiguration`; when it has either half, the NVCF policy
            replaces KPA.
        max_request_concurrency: Requests one instance serves at once (NVCF `maxRequestConcurrency`).
        min_instances: Lower bound; 0 allows scale to zero.
        max_instances: Upper bound.
        state: State saved from an earlier decider for this version, if any.

    Raises:
        ValueError: On a non-positive concurrency or inconsistent bounds.
    """

    def __init__(
        self,
        settings: AutoscalerSettings,
        nvcf: AutoscalingConfiguration | None,
        max_request_concurrency: int,
        min_instances: int,
        max_instances: int,
        state: AutoscalerState | None = None,
    ) -> None:
        if max_request_concurrency < 1:
            raise ValueError(f"max_request_concurrency must be at least 1, got {max_request_concurrency}")
        if min_instances < 0:
            raise ValueError(f"min_instances must not be negative, got {min_instances}")
        if max_instances < min_instances:
            raise ValueError(f"max_instances ({max_instances}) is below min_instances ({min_instances})")
        self._settings = settings
        self._policy = resolve_nvcf_policy(nvcf) if nvcf is not None and nvcf.is_custom else None
        self._mrc = max_request_concurrency
        self._min = min_instances
        self._max = max_instances
        # A private copy: the caller's object may be reused (e.g. kept as workflow state) and must not
        # change under it.
        self._state = state.model_copy(deep=True) if state is not None else AutoscalerState()

    @property
    def state(self) -> AutoscalerState:
        """A copy of the decider's state, to store in heartbeat details or workflow state."""
        return self._state.model_copy(deep=True)

    @property
    def settings(self) -> AutoscalerSettings:
        """The settings this decider was built with."""
        return self._settings

    @property
    def mode(self) -> Literal["kpa", "nvcf"]:
        """Which policy decides: `"kpa"` (default) or `"nvcf"` (an NVCF autoscalingConfiguration is set)."""
        return "nvcf" if self._policy is not None else "kpa"

    @property
    def nvcf_policy(self) -> NvcfPolicy | None:
        """The NVCF policy in effect (defaults filled in), or None in KPA mode."""
        return self._policy

    # ---- recording -------------------------------------------------------------------------------

    def record(self, now: float, load: float) -> None:
        """Record the version's load at time `now`.

        Args:
            now: Time in seconds (any epoch, but the same for every call on this state).
            load: In-flight plus queued requests for the version at `now`.

        Raises:
            ValueError: If `now` is not finite or `load` is negative or not finite.
        """
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        if not math.isfinite(load) or load < 0:
            raise ValueError(f"load must be a finite number >= 0, got {load}")
        st = self._state
        _add_sample(st.buckets, math.floor(now), load)
        if self._policy is not None and self._policy.longest_window_minutes > 0:
            _add_sample(st.minuteBuckets, math.floor(now / 60.0), load)
        if st.firstRecordAt is None:
            st.firstRecordAt = now
        st.lastRecordAt = now if st.lastRecordAt is None else max(st.lastRecordAt, now)
        st.lastLoad = load
        if load > 0:
            st.lastNonzeroAt = now if st.lastNonzeroAt is None else max(st.lastNonzeroAt, now)
        self._prune(now)

    def record_zero_until(self, now: float) -> None:
        """Record zero load for every whole second since the last sample, up to (not including) `now`.

        For a caller that knows the load stayed zero while it did not sample (it slept until the load
        changed): without these samples the windows would average only over the new load, as after a
        restart, and overreact to it.
        """
        st = self._state
        if st.lastRecordAt is None or st.lastLoad > 0:
            return
        last, end = math.floor(st.lastRecordAt), math.floor(now)
        horizon = max(self._settings.stableWindowSeconds, self._settings.panicWindowSeconds)
        for second in range(max(last + 1, end - math.ceil(horizon)), end):
            _add_sample(st.buckets, second, 0.0)
        if self._policy is not None and self._policy.longest_window_minutes > 0:
            # One sample per second, into the minute it belongs to, partial minutes included.
            reach = 60 * (self._policy.longest_window_minutes + 1)
            for second in range(max(last + 1, end - reach), end):
                _add_sample(st.minuteBuckets, math.floor(second / 60.0), 0.0)
        if end - 1 > last:
            st.lastRecordAt = float(end - 1)

    def steady_without_load(self, now: float, ready: int, current: int) -> bool:
        """Return whether the decision stays `current` for as long as the load stays zero.

        With zero load the wanted count can only fall as windows, delays and idle timeouts run out, so
        it is enough to compare the decision now with the decision once every one of them has run out
        (and, with NVCF stickiness, with the decision when the minute in progress completes).
        A caller can then sleep until the load changes instead of re-deciding on a timer.
        """
        st = self._state
        if st.lastLoad > 0 or st.panicSince is not None:
            return False
        s = self._settings
        horizons = [
            s.stableWindowSeconds,
            s.panicWindowSeconds,
            s.scaleDownDelaySeconds,
            s.scaleToZeroIdleSeconds,
        ]
        if self._policy is not None:
            horizons.append(60.0 * (self._policy.longest_window_minutes + 1))
        preview = copy.copy(self)
        preview._state = st.model_copy(deep=True)
        if preview.decide(now, ready=ready, current=current).desired != current:
            return False
        moments = []
        if self._policy is not None and self._policy.longest_window_minutes > 0:
            # Stickiness counts completed minutes: the minute in progress can still add a breach
            # (and the highest count of breaches) when it completes.
            moments.append((math.floor(now / 60.0) + 1) * 60.0 + 0.5)
        moments.append(now + max(horizons) + 1.0)
        for moment in moments:
            preview.record_zero_until(moment)
            preview.record(moment, 0.0)
            if preview.decide(moment, ready=ready, current=current).desired != current:
                return False
        return True

    def _prune(self, now: float) -> None:
        """Drop samples no window can reach any more, so memory stays bounded however long this runs."""
        st = self._state
        horizon = max(self._settings.stableWindowSeconds, self._settings.panicWindowSeconds)
        oldest_second = math.floor(now) - horizon
        drop = 0
        while drop < len(st.buckets) and st.buckets[drop][0] <= oldest_second:
            drop += 1
        del st.buckets[:drop]
        if self._policy is None or self._policy.longest_window_minutes == 0:
            st.minuteBuckets.clear()
            return
        # Keep the completed minutes of the longest stickiness window plus the minute in progress.
        oldest_minute = math.floor(now / 60.0) - self._policy.longest_window_minutes
        drop = 0
        while drop < len(st.minuteBuckets) and st.minuteBuckets[drop][0] < oldest_minute:
            drop += 1
        del st.minuteBuckets[:drop]

    def _window_average(self, now: float, window: float) -> float:
        """Average load over the last `window` seconds, from 1-second bucket means.

        Seconds without a sample are left out rather than counted as zero: a caller ticking slower
        than once a second, or a decider that just restarted, would otherwise see its load diluted and
        scale down on missing data (Knative likewise averages only over the span it has data for).
        """
        lowest = math.floor(now) - window
        means = [total / count for second, total, count in self._state.buckets if second > lowest]
        return sum(means) / len(means) if means else 0.0

    # ---- deciding --------------------------------------------------------------------------------

    def decide(self, now: float, ready: int, current: int) -> ScalingDecision:
        """Decide how many instances the version should have at time `now`.

        Args:
            now: Time in seconds, on the same clock as `record`.
            ready: Instances serving requests now.
            current: Instances that exist or have been requested now (ready or starting).

        Returns:
            The decision, with the rule and a readable reason.

        Raises:
            ValueError: If `now` is not finite or a count is negative.
        """
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        if ready < 0 or current < 0:
            raise ValueError(f"ready and current must not be negative, got ready={ready} current={current}")
        st = self._state
        fresh = not st.started
        st.started = True
        self._prune(now)
        s = self._settings
        stable = self._window_average(now, s.stableWindowSeconds)
        panic = self._window_average(now, s.panicWindowSeconds)

        utilization: float | None = None
        if self._policy is not None:
            step, utilization = self._nvcf_step(now, stable, current, self._policy)
            target = self._mrc * self._policy.up_threshold / 100.0
        else:
            target = s.targetUtilization * self._mrc
            step = self._kpa_step(now, stable, panic, ready, current, target, fresh)

        step = self._zero_rules(now, step, current, panic, utilization)

        desired = min(max(step.desired, self._min), self._max)
        if desired != step.desired:
            step = _Step(
                desired,
                "bounds",
                f"{step.reason}; clamped to [{self._min}, {self._max}] instances → {desired}",
            )
        if step.rule == "stable" and desired == current:
            step.rule = "no-change"

        return ScalingDecision(
            desired=desired,
            current=current,
            rule=step.rule,
            reason=step.reason,
            stableLoad=stable,
            panicLoad=panic,
            panicking=st.panicSince is not None,
            targetPerInstance=target,
            utilization=utilization,
        )

    def _kpa_step(
        self,
        now: float,
        stable: float,
        panic: float,
        ready: int,
        current: int,
        target: float,
        fresh: bool,
    ) -> _Step:
        """Knative KPA: stable/panic counts, rate limits, panic mode, scale-down delay."""
        s, st = self._settings, self._state
        # Rates are relative to ready instances, counted as at least one so a version at zero can grow.
        ready_base = max(ready, 1)
        # The up-rate limits growth only: it never asks to drop instances that are already starting
        # (GPU instances take minutes to become ready, so `ready` can lag `current` for a long time).
        highest = max(_ceil(ready_base * s.maxScaleUpRate), current)
        lowest = _floor(ready_base / s.maxScaleDownRate)
        want_stable = _ceil(stable / target)
        want_panic = _ceil(panic / target)
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
            f"stable load {stable:.1f} over {_seconds(s.stableWindowSeconds)} s / target {target:.1f} "
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
            step = _Step(
                desired,
                "panic",
                f"panic ({cause}): load {panic:.1f} over {_seconds(s.panicWindowSeconds)} s / target "
                f"{target:.1f} per instance → {panic_count} ({panic_ratio:.0%} of {ready_base} ready, "
                f"threshold {s.panicThreshold:.0%}); {stable_text}; no scale-down until "
                f"{_seconds(s.stableWindowSeconds)} s below the threshold ({calm:.0f} s so far) → {desired}",
            )
        else:
            step = _Step(stable_count, "stable", stable_text)

        # The delay window sees what the load asked for, before the scale-down rate limit: recording
        # rate-limited counts would restart the delay at every halving step (12 → 6 → 3 → 1 would take
        # three delays instead of one).
        held = self._delay(now, step.desired)
        if held > step.desired:
            step = _Step(
                held,
                "scale-down-delay",
                f"scale-down delay: keeping {held}, the highest count wanted in the last "
                f"{_seconds(s.scaleDownDelaySeconds)} s ({step.reason})",
            )
        if step.desired < lowest:
            step = _Step(
                lowest,
                step.rule,
                f"{step.reason}; scale-down rate limit: {ready_base} ready / {s.maxScaleDownRate:g} "
                f"→ {lowest}",
            )
        return step

    def _delay(self, now: float, desired: int) -> int:
        """Record `desired` and return the highest count recorded within the scale-down delay."""
        window = self._state.delayWindow
        delay = self._settings.scaleDownDelaySeconds
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

    def _nvcf_step(self, now: float, stable: float, current: int, policy: NvcfPolicy) -> tuple[_Step, float]:
        """NVCF threshold policy: utilization against thresholds, factors, stickiness."""
        s, st = self._settings, self._state
        # NVCF treats zero instances as one so the factors never multiply zero.
        base = max(current, 1)
        capacity = base * self._mrc
        utilization = stable / capacity * 100.0
        util_text = (
            f"utilization {utilization:.1f} % (load {stable:.1f} over {_seconds(s.stableWindowSeconds)} s "
            f"/ capacity {capacity} = {base} * {self._mrc})"
        )
        if policy.note:
            util_text += f" [{policy.note}]"

        up, up_text = self._breached(
            now, policy.up_stickiness, capacity, utilization, policy.up_threshold, True
        )
        if up:
            desired = max(base + 1, _ceil(base * policy.up_factor))
            return (
                _Step(
                    desired,
                    "nvcf-scale-up",
                    f"{util_text} above scale-up threshold {policy.up_threshold:g} %{up_text} "
                    f"→ ceil({base} * {policy.up_factor:g}) = {desired}",
                ),
                utilization,
            )

        down, down_text = self._breached(
            now, policy.down_stickiness, capacity, utilization, policy.down_threshold, False
        )
        if down:
            seen = now - st.firstRecordAt if st.firstRecordAt is not None else 0.0
            if seen < s.stableWindowSeconds:
                # Mirrors KPA's restart rule: a short history must not trigger a scale-down.
                return (
                    _Step(
                        base,
                        "no-change",
                        f"{util_text} below scale-down threshold {policy.down_threshold:g} %{down_text}, "
                        f"but only {seen:.0f} s of samples (< {_seconds(s.stableWindowSeconds)} s) → {base}",
                    ),
                    utilization,
                )
            desired = max(1, _floor(base * policy.down_factor))
            if desired < base:
                return (
                    _Step(
                        desired,
                        "nvcf-scale-down",
                        f"{util_text} below scale-down threshold {policy.down_threshold:g} %{down_text} "
                        f"→ floor({base} * {policy.down_factor:g}) = {desired}",
                    ),
                    utilization,
                )
            return (
                _Step(
                    base,
                    "no-change",
                    f"{util_text} below scale-down threshold {policy.down_threshold:g} %{down_text}, "
                    f"but scale-down never goes below 1 instance → {base}",
                ),
                utilization,
            )

        return (
            _Step(
                base,
                "no-change",
                f"{util_text} within [{policy.down_threshold:g} %, {policy.up_threshold:g} %]{up_text}"
                f"{down_text} → {base}",
            ),
            utilization,
        )

    def _breached(
        self,
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
        for minute, total, samples in self._state.minuteBuckets:
            if this_minute - window <= minute < this_minute:
                minute_util = total / samples / capacity * 100.0
                if (minute_util > threshold) if above else (minute_util < threshold):
                    count += 1
        return count >= required, f" in {count} of the last {window} min (needs {required})"

    def _zero_rules(
        self, now: float, step: _Step, current: int, panic: float, utilization: float | None
    ) -> _Step:
        """Activation from zero, scale to zero after the idle timeout, and the last-instance hold."""
        s, st = self._settings, self._state
        load_now = st.lastLoad > 0 or panic > 0
        if current == 0:
            if load_now:
                desired = max(step.desired, 1)
                return _Step(
                    desired,
                    "activation",
                    f"activation: load {st.lastLoad:.1f} (panic-window {panic:.1f}) with no instances "
                    f"→ {desired} ({step.reason})",
                )
            # Nothing to serve: old samples alone must not start an instance (that would undo a scale to
            # zero whose idle timeout is shorter than the stable window).
            return _Step(0, "no-change", "no load and no instances → 0")

        idle = self._idle_seconds(now)
        if self._min == 0 and idle is not None and idle >= s.scaleToZeroIdleSeconds:
            # NVCF additionally wants utilization under the scale-down threshold.
            underused = (
                utilization is None or self._policy is None or utilization < self._policy.down_threshold
            )
            if underused:
                return _Step(
                    0,
                    "scale-to-zero",
                    f"no load for {idle:.0f} s (idle timeout {_seconds(s.scaleToZeroIdleSeconds)} s) → 0",
                )
        if step.desired == 0 and self._min == 0:
            waited = 0.0 if idle is None else idle
            return _Step(
                1,
                "scale-to-zero-wait",
                f"{step.reason}; keeping 1 instance: no load for {waited:.0f} s of the "
                f"{_seconds(s.scaleToZeroIdleSeconds)} s idle timeout",
            )
        return step

    def _idle_seconds(self, now: float) -> float | None:
        """Seconds the load has been exactly zero, or None while it is not (or nothing was recorded)."""
        st = self._state
        if st.firstRecordAt is None or st.lastLoad > 0:
            return None
        since = st.lastNonzeroAt if st.lastNonzeroAt is not None else st.firstRecordAt
        return max(0.0, now - since)
