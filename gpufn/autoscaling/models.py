"""The autoscaler's settings (gpufn's per-deployment overrides), its decisions and its saved state."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gpufn.autoscaling.windows import ScalingRule


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
