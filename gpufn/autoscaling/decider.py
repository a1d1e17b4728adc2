"""The decider: records a version's load and runs one policy (KPA or NVCF) and the zero and bounds rules."""

from __future__ import annotations

import copy
import math
from typing import Literal

from gpufn.autoscaling.kpa import kpa_step
from gpufn.autoscaling.models import AutoscalerSettings, AutoscalerState, ScalingDecision
from gpufn.autoscaling.nvcf import AutoscalingConfiguration, NvcfPolicy, nvcf_step, resolve_nvcf_policy
from gpufn.autoscaling.windows import Step, add_sample, seconds_text


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
        add_sample(st.buckets, math.floor(now), load)
        if self._policy is not None and self._policy.longest_window_minutes > 0:
            add_sample(st.minuteBuckets, math.floor(now / 60.0), load)
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
            add_sample(st.buckets, second, 0.0)
        if self._policy is not None and self._policy.longest_window_minutes > 0:
            # One sample per second, into the minute it belongs to, partial minutes included.
            reach = 60 * (self._policy.longest_window_minutes + 1)
            for second in range(max(last + 1, end - reach), end):
                add_sample(st.minuteBuckets, math.floor(second / 60.0), 0.0)
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
            step, utilization = nvcf_step(
                self._settings, self._state, self._mrc, now, stable, current, self._policy
            )
            target = self._mrc * self._policy.up_threshold / 100.0
        else:
            target = s.targetUtilization * self._mrc
            step = kpa_step(self._settings, self._state, now, stable, panic, ready, current, target, fresh)

        step = self._zero_rules(now, step, current, panic, utilization)

        desired = min(max(step.desired, self._min), self._max)
        if desired != step.desired:
            step = Step(
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

    def _zero_rules(
        self, now: float, step: Step, current: int, panic: float, utilization: float | None
    ) -> Step:
        """Activation from zero, scale to zero after the idle timeout, and the last-instance hold."""
        s, st = self._settings, self._state
        load_now = st.lastLoad > 0 or panic > 0
        if current == 0:
            if load_now:
                desired = max(step.desired, 1)
                return Step(
                    desired,
                    "activation",
                    f"activation: load {st.lastLoad:.1f} (panic-window {panic:.1f}) with no instances "
                    f"→ {desired} ({step.reason})",
                )
            # Nothing to serve: old samples alone must not start an instance (that would undo a scale to
            # zero whose idle timeout is shorter than the stable window).
            return Step(0, "no-change", "no load and no instances → 0")

        idle = self._idle_seconds(now)
        if self._min == 0 and idle is not None and idle >= s.scaleToZeroIdleSeconds:
            # NVCF additionally wants utilization under the scale-down threshold.
            underused = (
                utilization is None or self._policy is None or utilization < self._policy.down_threshold
            )
            if underused:
                return Step(
                    0,
                    "scale-to-zero",
                    f"no load for {idle:.0f} s (idle timeout {seconds_text(s.scaleToZeroIdleSeconds)} s) → 0",
                )
        if step.desired == 0 and self._min == 0:
            waited = 0.0 if idle is None else idle
            return Step(
                1,
                "scale-to-zero-wait",
                f"{step.reason}; keeping 1 instance: no load for {waited:.0f} s of the "
                f"{seconds_text(s.scaleToZeroIdleSeconds)} s idle timeout",
            )
        return step

    def _idle_seconds(self, now: float) -> float | None:
        """Seconds the load has been exactly zero, or None while it is not (or nothing was recorded)."""
        st = self._state
        if st.firstRecordAt is None or st.lastLoad > 0:
            return None
        since = st.lastNonzeroAt if st.lastNonzeroAt is not None else st.firstRecordAt
        return max(0.0, now - since)
