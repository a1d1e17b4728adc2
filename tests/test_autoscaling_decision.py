"""Autoscaler decisions on load traces generated in code (pure, deterministic; no Temporal, no clock)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from gpufn.autoscaling import (
    Autoscaler,
    AutoscalerSettings,
    AutoscalerState,
    AutoscalingConfiguration,
    ScaleDownDetails,
    ScaleUpDetails,
    ScalingDecision,
    ScalingRule,
    StickinessDetails,
    resolve_nvcf_policy,
)

TICK = 0.5
# Minute-aligned so NVCF stickiness minutes line up with trace seconds.
T0 = 6000.0


# ---- trace generators and a tiny cluster simulator ------------------------------------------------


def steady(level: float, seconds: float, *, jitter: float = 0.0, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [max(0.0, level * (1 + rng.uniform(-jitter, jitter))) for _ in range(int(seconds / TICK))]


def piecewise(*parts: tuple[float, float]) -> list[float]:
    """Concatenate `(level, seconds)` segments into one trace."""
    trace: list[float] = []
    for level, seconds in parts:
        trace += [level] * int(seconds / TICK)
    return trace


def sawtooth(low: float, high: float, half_period: float, seconds: float) -> list[float]:
    trace = []
    for i in range(int(seconds / TICK)):
        trace.append(high if int(i * TICK / half_period) % 2 == 0 else low)
    return trace


@dataclass
class Tick:
    t: float
    load: float
    ready: int
    current: int
    decision: ScalingDecision


def simulate(
    scaler: Autoscaler,
    trace: Sequence[float],
    *,
    start: float = T0,
    current: int = 0,
    ready: int | None = None,
    boot_ticks: int = 0,
    apply: bool = True,
) -> list[Tick]:
    """Feed a trace tick by tick; the 'cluster' applies decisions, new instances ready after boot_ticks."""
    ticks: list[Tick] = []
    history = [current]
    ready_now = current if ready is None else ready
    for i, load in enumerate(trace):
        now = start + i * TICK
        scaler.record(now, load)
        decision = scaler.decide(now, ready_now, current)
        ticks.append(Tick(now, load, ready_now, current, decision))
        if apply:
            current = decision.desired
        history.append(current)
        # Scale-downs take effect at once; scale-ups only once the instances have booted.
        ready_now = min(current, history[max(0, len(history) - 1 - boot_ticks)])
    return ticks


def desired(ticks: Sequence[Tick]) -> list[int]:
    return [tk.decision.desired for tk in ticks]


def direction_changes(counts: Sequence[int]) -> int:
    signs = [1 if b > a else -1 for a, b in itertools.pairwise(counts) if b != a]
    return sum(1 for a, b in itertools.pairwise(signs) if a != b)


def kpa(
    mrc: int = 10, lo: int = 0, hi: int = 100, state: AutoscalerState | None = None, **kw: Any
) -> Autoscaler:
    return Autoscaler(AutoscalerSettings(**kw), None, mrc, lo, hi, state)


def nvcf(config: dict[str, Any], mrc: int = 10, lo: int = 0, hi: int = 100, **kw: Any) -> Autoscaler:
    return Autoscaler(AutoscalerSettings(**kw), AutoscalingConfiguration.model_validate(config), mrc, lo, hi)


# ---- KPA ------------------------------------------------------------------------------------------


def test_steady_load_converges_and_stays() -> None:
    # target = 0.7 * 4 = 2.8 per instance; load ~10 needs ceil(10 / 2.8) = 4.
    ticks = simulate(kpa(mrc=4), steady(10.0, 900, jitter=0.05, seed=7), boot_ticks=60)
    counts = desired(ticks)
    assert counts[-1] == 4
    assert all(c == 4 for c in counts[int(120 / TICK) :])
    assert direction_changes(counts) == 0


def test_step_up_is_decided_within_one_tick_in_panic() -> None:
    scaler = kpa(mrc=10)  # target 7 per instance
    before = simulate(scaler, steady(5.0, 120), current=1)
    assert desired(before)[-1] == 1
    after = simulate(scaler, steady(60.0, 30), start=T0 + 120, current=1)
    first_up = next(i for i, tk in enumerate(after) if tk.decision.desired > 1)
    assert first_up <= 1
    assert after[first_up].decision.rule == "panic"
    assert after[first_up].decision.panicking
    assert desired(after)[-1] == math.ceil(60 / 7)


def test_spike_holds_count_through_stable_window_and_delay() -> None:
    scaler = kpa(mrc=10)
    spike_start, spike_end = 120.0, 130.0
    trace = piecewise((5.0, spike_start), (80.0, spike_end - spike_start), (5.0, 900))
    ticks = simulate(scaler, trace, boot_ticks=20)
    counts = desired(ticks)
    peak = max(counts)
    assert peak >= math.ceil(80 / 7)
    assert any(tk.decision.panicking for tk in ticks if spike_start <= tk.t - T0 < spike_end)

    panic_end = next(tk.t - T0 for tk in ticks if tk.t - T0 > spike_end and not tk.decision.panicking)
    assert panic_end >= spike_end + 60
    first_drop = next(i for i in range(1, len(counts)) if counts[i] < counts[i - 1])
    assert ticks[first_drop].t - T0 >= panic_end + 300 - 1
    # Between the end of panic and the first drop the delay is what holds the count.
    assert all(
        tk.decision.rule == "scale-down-delay" for tk in ticks if panic_end + 1 <= tk.t - T0 < panic_end + 290
    )
    assert counts[-1] == 1


def test_sawtooth_does_not_flap() -> None:
    trace = sawtooth(low=3.0, high=30.0, half_period=40.0, seconds=1800)
    naive = [math.ceil(load / 7 - 1e-9) for load in trace]
    assert direction_changes(naive) >= 40
    counts = desired(simulate(kpa(mrc=10), trace, boot_ticks=60))
    assert direction_changes(counts) == 0


def test_bounds_respected_on_every_tick_for_random_traces() -> None:
    rng = random.Random(20240601)
    rules = set(get_args(ScalingRule))
    for _ in range(150):
        stable = rng.choice([6.0, 30.0, 60.0, 120.0])
        settings = AutoscalerSettings(
            targetUtilization=rng.choice([0.5, 0.7, 1.0]),
            stableWindowSeconds=stable,
            panicWindowSeconds=rng.choice([1.0, 6.0]),
            panicThreshold=rng.choice([1.5, 2.0, 3.0]),
            scaleDownDelaySeconds=rng.choice([0.0, 10.0, 300.0]),
            maxScaleUpRate=rng.choice([1.5, 2.0, 1000.0]),
            maxScaleDownRate=rng.choice([1.5, 2.0, 10.0]),
            scaleToZeroIdleSeconds=rng.choice([0.0, 5.0, 60.0]),
        )
        config = None
        if rng.random() < 0.4:
            config = AutoscalingConfiguration(
                scaleUpDetails=ScaleUpDetails(factor=rng.choice([1.2, 2.0]), threshold=rng.choice([60, 80])),
                scaleDownDetails=ScaleDownDetails(
                    factor=rng.choice([0.5, 0.8]),
                    threshold=rng.choice([10, 30]),
                    stickiness=rng.choice([None, StickinessDetails(size="PT2M", threshold="PT1M")]),
                ),
            )
        lo = rng.randint(0, 3)
        hi = lo + rng.randint(0, 12)
        scaler = Autoscaler(settings, config, rng.randint(1, 16), lo, hi)
        load, trace = 0.0, []
        for _ in range(400):
            roll = rng.random()
            if roll < 0.05:
                load = rng.uniform(0, 200)
            elif roll < 0.10:
                load = 0.0
            else:
                load = max(0.0, load + rng.gauss(0, 3))
            trace.append(load)
        for tk in simulate(scaler, trace, current=rng.randint(0, hi), boot_ticks=rng.randint(0, 40)):
            assert lo <= tk.decision.desired <= hi, tk
            assert tk.decision.current == tk.current
            assert tk.decision.rule in rules


def test_restart_with_several_ready_instances_starts_in_panic() -> None:
    scaler = kpa(mrc=10)  # fresh: no history at all
    ticks = simulate(scaler, steady(1.0, 59), current=6)
    assert ticks[0].decision.panicking
    assert ticks[0].decision.rule == "panic"
    assert "restarted" in ticks[0].decision.reason
    assert all(c == 6 for c in desired(ticks))


def test_restart_keeps_instances_that_are_still_booting() -> None:
    scaler = kpa(mrc=10)
    ticks = simulate(scaler, steady(1.0, 30), ready=2, current=8, boot_ticks=200)
    assert ticks[0].decision.panicking
    assert all(c == 8 for c in desired(ticks))


def test_restart_with_one_ready_instance_does_not_panic() -> None:
    decision = simulate(kpa(mrc=10), steady(1.0, 1), current=1)[0].decision
    assert not decision.panicking
    assert decision.rule == "no-change"


def test_scale_down_is_rate_limited_by_max_scale_down_rate() -> None:
    # One-second windows, so the load signal itself drops from 10 instances' worth to 1 at once.
    scaler = kpa(mrc=10, scaleDownDelaySeconds=0, stableWindowSeconds=1, panicWindowSeconds=1)
    simulate(scaler, steady(70.0, 10), current=10)
    ticks = simulate(scaler, steady(0.5, 10), start=T0 + 10, current=10)
    # Each decision at most halves the ready count (maxScaleDownRate 2), whatever the load says.
    assert desired(ticks)[:3] == [5, 2, 1]
    assert "scale-down rate limit: 10 ready / 2 → 5" in ticks[0].decision.reason


def test_scale_to_zero_after_idle_timeout_and_not_before() -> None:
    scaler = kpa(mrc=10, lo=0, scaleToZeroIdleSeconds=300)
    ticks = simulate(scaler, piecewise((5.0, 60), (0.0, 400)), current=1)
    last_busy = 60.0 - TICK
    for tk in ticks:
        if tk.t - T0 < last_busy + 300:
            assert tk.decision.desired >= 1, tk
    zero = next(tk for tk in ticks if tk.decision.desired == 0)
    assert zero.t - T0 == pytest.approx(last_busy + 300)
    assert zero.decision.rule == "scale-to-zero"
    # Once at zero it stays there: stale samples must not start an instance.
    after = [tk for tk in ticks if tk.t > zero.t]
    assert after and all(tk.decision.desired == 0 for tk in after)


def test_no_scale_to_zero_when_min_instances_is_positive() -> None:
    ticks = simulate(
        kpa(mrc=10, lo=1, scaleToZeroIdleSeconds=10), piecewise((5.0, 20), (0.0, 600)), current=1
    )
    assert min(desired(ticks)) == 1


def test_last_instance_kept_while_idle_timeout_runs() -> None:
    scaler = kpa(mrc=10, scaleDownDelaySeconds=0, stableWindowSeconds=10, panicWindowSeconds=2)
    ticks = simulate(scaler, piecewise((5.0, 20), (0.0, 100)), current=1)
    held = [tk for tk in ticks if 40 <= tk.t - T0 < 100]
    assert all(tk.decision.desired == 1 and tk.decision.rule == "scale-to-zero-wait" for tk in held)


def test_activation_from_zero() -> None:
    scaler = kpa(mrc=10)
    idle = simulate(scaler, steady(0.0, 10), current=0)
    assert desired(idle) == [0] * len(idle)
    tick = simulate(scaler, [1.0], start=T0 + 10, current=0)[0]
    assert tick.decision.desired == 1
    assert tick.decision.rule == "activation"


def test_activation_from_zero_sizes_for_a_burst() -> None:
    decision = simulate(kpa(mrc=10), [35.0], current=0)[0].decision
    assert decision.desired == 5  # ceil(35 / 7)
    assert decision.rule == "activation"


def test_bounds_clamp_and_say_so() -> None:
    decision = simulate(kpa(mrc=10, lo=0, hi=3), steady(100.0, 5), current=3)[-1].decision
    assert decision.desired == 3
    assert decision.rule == "bounds"
    assert "[0, 3]" in decision.reason
    floor = simulate(kpa(mrc=10, lo=2, hi=5), steady(0.0, 5), current=0)[-1].decision
    assert floor.desired == 2 and floor.rule == "bounds"


def test_scale_down_delay_zero_follows_stable_window() -> None:
    scaler = kpa(mrc=10, scaleDownDelaySeconds=0)
    simulate(scaler, steady(35.0, 120), current=5)
    ticks = simulate(scaler, steady(7.0, 120), start=T0 + 120, current=5)
    assert desired(ticks)[-1] == 1
    assert all(tk.decision.rule != "scale-down-delay" for tk in ticks)


def test_state_is_bounded_over_long_runs() -> None:
    scaler = kpa(mrc=10)
    config = {
        "scaleUpDetails": {
            "factor": 1.5,
            "threshold": 60,
            "stickiness": {"size": "PT10M", "threshold": "PT5M"},
        },
        "scaleDownDetails": {"factor": 0.5, "threshold": 20},
    }
    sticky = nvcf(config)
    rng = random.Random(3)
    current_kpa = current_nvcf = 1
    for i in range(4 * 3600):  # four hours at one tick per second
        now = T0 + i
        load = rng.choice([0.0, 3.0, 40.0, 200.0]) if i % 97 == 0 else rng.uniform(0, 50)
        for s in (scaler, sticky):
            s.record(now, load)
        current_kpa = scaler.decide(now, current_kpa, current_kpa).desired
        current_nvcf = sticky.decide(now, current_nvcf, current_nvcf).desired
        if i % 500 == 0:
            st = scaler.state
            assert len(st.buckets) <= 61
            assert len(st.delayWindow) <= 301
            assert len(sticky.state.minuteBuckets) <= 11
    assert len(scaler.state.model_dump_json()) < 20_000


def test_same_inputs_give_same_decisions() -> None:
    trace = sawtooth(2.0, 50.0, 17.0, 600) + steady(0.0, 400)
    a = [tk.decision for tk in simulate(kpa(mrc=8), trace, boot_ticks=30)]
    b = [tk.decision for tk in simulate(kpa(mrc=8), trace, boot_ticks=30)]
    assert a == b


def test_state_json_round_trip_mid_trace_gives_identical_decisions() -> None:
    trace = piecewise((5.0, 100), (90.0, 15), (5.0, 200), (0.0, 400))
    config = {
        "scaleUpDetails": {
            "factor": 1.5,
            "threshold": 50,
            "stickiness": {"size": "PT3M", "threshold": "PT1M"},
        },
        "scaleDownDetails": {"factor": 0.5, "threshold": 20},
    }
    for make in (lambda: kpa(mrc=10), lambda: nvcf(config, mrc=10)):
        original = make()
        half = len(trace) // 2
        first = simulate(original, trace[:half], boot_ticks=10)
        current = first[-1].decision.desired
        saved = original.state.model_dump_json()
        restored = Autoscaler(
            original.settings,
            AutoscalingConfiguration.model_validate(config) if original.mode == "nvcf" else None,
            10,
            0,
            100,
            AutoscalerState.model_validate_json(saved),
        )
        assert restored.state == original.state
        rest = trace[half:]
        start = T0 + half * TICK
        a = simulate(original, rest, start=start, current=current)
        b = simulate(restored, rest, start=start, current=current)
        assert [tk.decision for tk in a] == [tk.decision for tk in b]


def test_state_passed_in_is_not_mutated() -> None:
    state = AutoscalerState()
    scaler = kpa(state=state)
    simulate(scaler, steady(5.0, 10), current=1)
    assert state == AutoscalerState()


def test_reason_contains_metric_values() -> None:
    # The example from the design: 45 in flight, 32 per instance at 70 % → 22.4 per instance → 3.
    decision = simulate(kpa(mrc=32), steady(45.0, 90), current=3)[-1].decision
    assert decision.desired == 3
    assert decision.stableLoad == pytest.approx(45.0)
    assert decision.targetPerInstance == pytest.approx(22.4)
    assert decision.reason == "stable load 45.0 over 60 s / target 22.4 per instance → 3"

    panic = simulate(kpa(mrc=10), [4.0] * 20 + [100.0], current=1)[-1].decision
    assert panic.rule == "panic"
    assert f"load {panic.panicLoad:.1f} over 6 s" in panic.reason
    assert "target 7.0 per instance" in panic.reason

    scaler = nvcf({"scaleUpDetails": {"factor": 1.5, "threshold": 60}}, mrc=10)
    up = simulate(scaler, [30.0], current=4, apply=False)[0].decision
    assert "utilization 75.0 %" in up.reason and "threshold 60 %" in up.reason and "= 6" in up.reason


# ---- NVCF policy ----------------------------------------------------------------------------------

UP_DOWN = {
    "scaleUpDetails": {"factor": 1.5, "threshold": 60},
    "scaleDownDetails": {"factor": 0.5, "threshold": 20},
}


def test_nvcf_scale_up_above_threshold_multiplies_by_factor() -> None:
    decision = simulate(nvcf(UP_DOWN), [30.0], current=4, apply=False)[0].decision  # 30 / 40 = 75 %
    assert decision.rule == "nvcf-scale-up"
    assert decision.desired == 6  # ceil(4 * 1.5)
    assert decision.utilization == pytest.approx(75.0)
    assert not decision.panicking


def test_nvcf_scale_up_adds_at_least_one_instance() -> None:
    config = {"scaleUpDetails": {"factor": 1.01, "threshold": 50}}
    decision = simulate(nvcf(config), [9.0], current=1, apply=False)[0].decision
    assert decision.desired == 2


def test_nvcf_at_threshold_does_not_scale() -> None:
    up = simulate(nvcf(UP_DOWN), [24.0] * 200, current=4, apply=False)  # exactly 60 %
    assert {tk.decision.desired for tk in up} == {4}
    down = simulate(nvcf(UP_DOWN), [8.0] * 200, current=4, apply=False)  # exactly 20 %
    assert {tk.decision.desired for tk in down} == {4}


def test_nvcf_scale_down_waits_for_a_full_window_of_samples() -> None:
    ticks = simulate(nvcf(UP_DOWN), steady(10.0, 70), current=10, apply=False)  # 10 %
    early = [tk for tk in ticks if tk.t - T0 < 60]
    assert all(tk.decision.desired == 10 and tk.decision.rule == "no-change" for tk in early)
    assert ticks[-1].decision.rule == "nvcf-scale-down"
    assert ticks[-1].decision.desired == 5  # floor(10 * 0.5)


def test_nvcf_scale_down_never_below_one() -> None:
    config = {"scaleDownDetails": {"factor": 0.1, "threshold": 30}}
    two = simulate(nvcf(config), steady(0.1, 70), current=2, apply=False)[-1].decision
    assert two.desired == 1 and two.rule == "nvcf-scale-down"
    one = simulate(nvcf(config), steady(0.1, 70), current=1, apply=False)[-1].decision
    assert one.desired == 1 and one.rule == "no-change"


def test_nvcf_converges_when_decisions_are_applied() -> None:
    ticks = simulate(nvcf(UP_DOWN), steady(25.0, 300), current=1, boot_ticks=20)
    # 25 in flight at 10 per instance: between 20 % and 60 % from 5 to 12 instances.
    assert 5 <= desired(ticks)[-1] <= 12
    assert direction_changes(desired(ticks)) == 0


def test_nvcf_missing_half_uses_nvcf_defaults() -> None:
    only_up = resolve_nvcf_policy(
        AutoscalingConfiguration.model_validate({"scaleUpDetails": UP_DOWN["scaleUpDetails"]})
    )
    assert (only_up.up_threshold, only_up.up_factor) == (60, 1.5)
    assert (only_up.down_threshold, only_up.down_factor) == (30, 0.8)
    only_down = resolve_nvcf_policy(
        AutoscalingConfiguration.model_validate({"scaleDownDetails": UP_DOWN["scaleDownDetails"]})
    )
    assert (only_down.up_threshold, only_down.up_factor) == (70, 1.2)
    assert (only_down.down_threshold, only_down.down_factor) == (20, 0.5)
    assert only_down.note is None


def test_nvcf_inverted_thresholds_fall_back_to_defaults() -> None:
    policy = resolve_nvcf_policy(
        AutoscalingConfiguration.model_validate({"scaleDownDetails": {"factor": 0.5, "threshold": 80}})
    )
    assert (policy.up_threshold, policy.down_threshold) == (70, 30)
    assert policy.note is not None and "80" in policy.note


def test_empty_nvcf_configuration_means_kpa() -> None:
    scaler = Autoscaler(AutoscalerSettings(), AutoscalingConfiguration(), 10, 0, 10)
    assert scaler.mode == "kpa"
    assert simulate(scaler, [20.0], current=0)[0].decision.rule == "activation"


def test_nvcf_stickiness_delays_scale_up_until_enough_minutes_breach() -> None:
    config = {
        "scaleUpDetails": {
            "factor": 2.0,
            "threshold": 50,
            "stickiness": {"size": "PT5M", "threshold": "PT3M"},
        }
    }
    # Minutes: breach, calm, breach, breach (non-consecutive still counts, as in NVCF).
    trace = piecewise((40.0, 60), (10.0, 60), (40.0, 60), (40.0, 60), (40.0, 30))
    ticks = simulate(nvcf(config), trace, current=4, apply=False)  # 40 / 40 = 100 %
    first_up = next(tk for tk in ticks if tk.decision.rule == "nvcf-scale-up")
    assert first_up.t - T0 == 240  # the third breaching minute has completed
    assert first_up.decision.desired == 8
    assert "3 of the last 5 min" in first_up.decision.reason


def test_nvcf_stickiness_delays_scale_down() -> None:
    config = {
        "scaleUpDetails": {"factor": 2.0, "threshold": 60},
        "scaleDownDetails": {
            "factor": 0.5,
            "threshold": 20,
            "stickiness": {"size": "PT4M", "threshold": "PT2M"},
        },
    }
    ticks = simulate(nvcf(config), steady(2.0, 200), current=10, apply=False)  # 2 %
    downs = [tk for tk in ticks if tk.decision.rule == "nvcf-scale-down"]
    assert downs and downs[0].t - T0 == 120
    assert downs[0].decision.desired == 5


def test_nvcf_stickiness_is_truncated_to_whole_minutes() -> None:
    assert StickinessDetails(size="PT5M30S", threshold="PT2M59S").window_minutes() == (5, 2)
    assert StickinessDetails(size="PT2M", threshold="PT30S").window_minutes() is None
    assert StickinessDetails(size="PT1H", threshold="PT10M").window_minutes() == (60, 10)


def test_nvcf_scale_to_zero_after_idle_timeout() -> None:
    scaler = nvcf(UP_DOWN, scaleToZeroIdleSeconds=120)
    ticks = simulate(scaler, piecewise((5.0, 60), (0.0, 200)), current=1)
    zero = next(tk for tk in ticks if tk.decision.desired == 0)
    assert zero.decision.rule == "scale-to-zero"
    assert zero.t - T0 == pytest.approx(60 - TICK + 120)
    assert all(tk.decision.desired >= 1 for tk in ticks if tk.t < zero.t)


def test_nvcf_activation_from_zero() -> None:
    scaler = nvcf(UP_DOWN)
    assert simulate(scaler, [0.0] * 4, current=0)[-1].decision.desired == 0
    decision = simulate(scaler, [3.0], start=T0 + 2, current=0)[0].decision
    assert decision.desired >= 1 and decision.rule == "activation"


def test_nvcf_wire_object_round_trips_with_camel_case_names() -> None:
    wire = {
        "scaleUpDetails": {
            "metric": "worker_utilization",
            "factor": 1.5,
            "threshold": 80,
            "stickiness": {"size": "PT10M", "threshold": "PT5M"},
        },
        "scaleDownDetails": {"metric": None, "factor": 0.5, "threshold": 20, "stickiness": None},
    }
    parsed = AutoscalingConfiguration.model_validate(wire)
    assert parsed.model_dump() == wire
    assert AutoscalingConfiguration.model_validate_json(parsed.model_dump_json()) == parsed


# ---- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"panicWindowSeconds": 90, "stableWindowSeconds": 60},
        {"stableWindowSeconds": 0},
        {"stableWindowSeconds": 7200},
        {"panicWindowSeconds": -1},
        {"targetUtilization": 0},
        {"targetUtilization": 1.5},
        {"maxScaleUpRate": 1.0},
        {"maxScaleDownRate": 0.5},
        {"panicThreshold": 1.0},
        {"scaleDownDelaySeconds": -1},
        {"scaleDownDelaySeconds": 7200},
        {"scaleToZeroIdleSeconds": -5},
        {"tickSeconds": 0},
        {"drainTimeoutSeconds": -1},
        {"stableWindowSeconds": float("nan")},
        {"stableWindow": 60},
    ],
)
def test_settings_validation_rejects(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AutoscalerSettings(**overrides)


def test_settings_defaults_and_json_names() -> None:
    settings = AutoscalerSettings.model_validate({"stableWindowSeconds": 120, "scaleDownDelaySeconds": 0})
    dumped = settings.model_dump()
    assert dumped["stableWindowSeconds"] == 120
    assert dumped["targetUtilization"] == 0.7
    assert dumped["panicThreshold"] == 2.0
    assert dumped["maxScaleDownRate"] == 2.0
    assert AutoscalerSettings.model_validate_json(settings.model_dump_json()) == settings


@pytest.mark.parametrize(
    "wire",
    [
        {"scaleUpDetails": {"factor": 1.0, "threshold": 70}},
        {"scaleUpDetails": {"factor": 1.5, "threshold": 101}},
        {"scaleUpDetails": {"factor": 1.5, "threshold": 70.5}},
        {"scaleUpDetails": {"threshold": 70}},
        {"scaleDownDetails": {"factor": 1.0, "threshold": 30}},
        {"scaleDownDetails": {"factor": 0.0, "threshold": 30}},
        {"scaleDownDetails": {"factor": 0.5, "threshold": -1}},
        {
            "scaleUpDetails": {
                "factor": 1.5,
                "threshold": 70,
                "stickiness": {"size": "PT2H", "threshold": "PT5M"},
            }
        },
        {
            "scaleUpDetails": {
                "factor": 1.5,
                "threshold": 70,
                "stickiness": {"size": "PT5M", "threshold": "PT5M"},
            }
        },
        {
            "scaleUpDetails": {
                "factor": 1.5,
                "threshold": 70,
                "stickiness": {"size": "10 minutes", "threshold": "PT5M"},
            }
        },
        {"scaleUpDetails": {"factor": 1.5, "threshold": 70, "stickiness": {"size": "PT10M"}}},
    ],
)
def test_nvcf_configuration_validation_rejects(wire: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AutoscalingConfiguration.model_validate(wire)


@pytest.mark.parametrize(("mrc", "lo", "hi"), [(0, 0, 1), (1, -1, 1), (1, 3, 2)])
def test_autoscaler_rejects_bad_bounds(mrc: int, lo: int, hi: int) -> None:
    with pytest.raises(ValueError):
        Autoscaler(AutoscalerSettings(), None, mrc, lo, hi)


def test_record_and_decide_reject_bad_inputs() -> None:
    scaler = kpa()
    with pytest.raises(ValueError):
        scaler.record(T0, -1.0)
    with pytest.raises(ValueError):
        scaler.record(T0, float("nan"))
    with pytest.raises(ValueError):
        scaler.decide(T0, -1, 0)


# ---- sleeping while idle (the version watcher's quiet mode) ---------------------------------------

IDLE_SCALERS = {
    "kpa-min0": lambda: kpa(mrc=4, lo=0, hi=8, stableWindowSeconds=20, scaleDownDelaySeconds=15),
    "kpa-min1": lambda: kpa(mrc=4, lo=1, hi=8, stableWindowSeconds=20, scaleDownDelaySeconds=15),
    "kpa-no-delay": lambda: kpa(mrc=4, lo=0, hi=8, scaleDownDelaySeconds=0, scaleToZeroIdleSeconds=30),
    "nvcf-sticky": lambda: nvcf(
        {
            "scaleUpDetails": {"factor": 2.0, "threshold": 60},
            "scaleDownDetails": {
                "factor": 0.5,
                "threshold": 20,
                "stickiness": {"size": "PT3M", "threshold": "PT2M"},
            },
        },
        mrc=4,
        lo=1,
        hi=8,
    ),
}


@pytest.mark.parametrize("name", sorted(IDLE_SCALERS))
def test_steady_without_load_predicts_every_later_idle_decision(name: str) -> None:
    """Where it says the count holds while idle, every later idle tick agrees; where not, one differs."""
    scaler = IDLE_SCALERS[name]()
    trace = piecewise((20.0, 30), (0.0, 600))
    current, predictions = 0, []
    for i, load in enumerate(trace):
        now = T0 + i * TICK
        scaler.record(now, load)
        decision = scaler.decide(now, ready=current, current=current)
        if load == 0 and decision.desired == current:
            predictions.append((i, current, scaler.steady_without_load(now, ready=current, current=current)))
        current = decision.desired
    counts_after: dict[int, list[int]] = {i: [] for i, _, _ in predictions}
    replay = IDLE_SCALERS[name]()
    current = 0
    for i, load in enumerate(trace):
        now = T0 + i * TICK
        replay.record(now, load)
        current = replay.decide(now, ready=current, current=current).desired
        for start in counts_after:
            if i > start:
                counts_after[start].append(current)
    checked = [steady for _, _, steady in predictions]
    assert True in checked and False in checked, "the trace must exercise both answers"
    for start, held, steady in predictions:
        if start > len(trace) - int(400 / TICK):
            continue  # too close to the end to see the eventual count
        later = counts_after[start]
        if steady:
            assert all(c == held for c in later), (start, held, later[:10])
        else:
            assert any(c != held for c in later), (start, held)


def test_steady_without_load_is_false_while_there_is_load() -> None:
    scaler = kpa(mrc=4)
    scaler.record(T0, 40.0)
    scaler.decide(T0, ready=1, current=1)
    assert not scaler.steady_without_load(T0, ready=1, current=1)


def test_zero_gap_fill_decides_as_if_it_had_ticked_through_the_gap() -> None:
    """A watcher that slept through 100 s of zero load decides on a step like one that kept ticking."""
    ticking, sleeping = kpa(mrc=4, lo=1), kpa(mrc=4, lo=1)
    for i in range(int(100 / TICK)):
        ticking.record(T0 + i * TICK, 0.0)
        ticking.decide(T0 + i * TICK, ready=1, current=1)
    sleeping.record(T0, 0.0)
    sleeping.decide(T0, ready=1, current=1)
    step_at = T0 + 100
    sleeping.record_zero_until(step_at)
    for scaler in (ticking, sleeping):
        scaler.record(step_at, 8.0)
    a = ticking.decide(step_at, ready=1, current=1)
    b = sleeping.decide(step_at, ready=1, current=1)
    assert a.desired == b.desired
    assert a.stableLoad == pytest.approx(b.stableLoad)
    assert a.stableLoad < 1.0  # diluted by the zero seconds, not the raw step


def test_steady_without_load_sees_the_minute_in_progress_complete() -> None:
    """NVCF stickiness counts completed minutes: a burst late in a minute breaches once it completes."""
    config = {
        "scaleUpDetails": {
            "factor": 2.0,
            "threshold": 60,
            "stickiness": {"size": "PT3M", "threshold": "PT1M"},
        }
    }
    scaler = nvcf(config, mrc=4, lo=1, hi=8)
    trace = piecewise((1.0, 45), (8.0, 13))
    for i, load in enumerate(trace):
        scaler.record(T0 + i * TICK, load)
        scaler.decide(T0 + i * TICK, ready=1, current=1)
    now = T0 + len(trace) * TICK
    scaler.record(now, 0.0)
    assert scaler.decide(now, ready=1, current=1).desired == 1
    assert not scaler.steady_without_load(now, ready=1, current=1)
    later = [now + i * TICK for i in range(1, 20)]
    for moment in later:
        scaler.record(moment, 0.0)
    assert scaler.decide(later[-1], ready=1, current=1).desired == 2
