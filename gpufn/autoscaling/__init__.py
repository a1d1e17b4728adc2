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

The package, one job per module: `windows` (shared window math), `models` (settings, decisions, saved
state), `kpa` (the KPA policy), `nvcf` (NVCF's wire objects and threshold policy) and `decider`
(`Autoscaler`, which records load and runs the pipeline).
"""

from __future__ import annotations

from gpufn.autoscaling.decider import Autoscaler
from gpufn.autoscaling.models import AutoscalerSettings, AutoscalerState, ScalingDecision
from gpufn.autoscaling.nvcf import (
    NVCF_DEFAULT_SCALE_DOWN_FACTOR,
    NVCF_DEFAULT_SCALE_DOWN_THRESHOLD,
    NVCF_DEFAULT_SCALE_UP_FACTOR,
    NVCF_DEFAULT_SCALE_UP_THRESHOLD,
    AutoscalingConfiguration,
    NvcfPolicy,
    ScaleDownDetails,
    ScaleUpDetails,
    StickinessDetails,
    resolve_nvcf_policy,
)
from gpufn.autoscaling.windows import ScalingRule

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
