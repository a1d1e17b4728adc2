"""The lifecycle workflow's activity options, patch names and timings, shared by its parts.

`workflows/function_version.py` is the workflow; `version_status.py` (observations, status, healthInfo,
publication), `version_watching.py` (waiting for a change) and `version_steps.py` (the reconcile and
teardown steps) are its parts, as base classes, so each module has one job.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, CancelledError

from workflows.models import (
    DeploymentSpecification,
    InstanceRecord,
)

# Activity options, chosen deliberately: every call has a heartbeat timeout short enough that a killed
# worker is noticed in seconds, and retries back off to at most 10 s.
QUICK_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10))
"""Unbounded: only the watchers (restarted anyway) and versions started before `LIFECYCLE_STEPS_PATCH`."""
ACTION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10), maximum_attempts=8
)
"""A transient fault is retried for about 45 s (1+2+4+8+10+10+10 s); then the workflow decides: a heal
backoff and a line in healthInfo, and the deploy deadline still fires. A permanent fault (a non-retryable
`ApplicationError`, see `activities.backend.classified_faults`) is not retried at all."""
PREPARE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10), maximum_attempts=6
)
"""A registry still unreachable after about 30 s ends the deployment in ERROR with the reason."""
ACTION_TIMEOUT = timedelta(minutes=10)
ACTION_HEARTBEAT = timedelta(seconds=10)
WATCH_MAX_WAIT_SECONDS = 86400.0
"""A watcher with nothing to report still returns once a day, so none runs forever."""
WATCH_HEARTBEAT = timedelta(minutes=5)
"""The watcher runs as long as a version is deployed and every heartbeat is a write on the Temporal
server, so it beats rarely (every 0.8 x this). A restarted worker does not wait for a dead worker's
watchers to time out: it sends `reconcile_now` to every deployed version, which restarts them."""
LEGACY_WATCH_MAX_WAIT_SECONDS = 3600.0
LEGACY_WATCH_HEARTBEAT = timedelta(seconds=60)
ONE_WATCHER_PATCH = "one-version-watcher"
"""Versions started before it wait on two watchers (instances, load); they keep doing so until they
continue as new. Remove the old path with `workflow.deprecate_patch` once none is left."""
FAILURES_BEFORE_HEALTH_INFO = 3
"""Consecutive failures of a spec's instances after which the failure is shown in healthInfo."""
LIFECYCLE_STEPS_PATCH = "cancellable-lifecycle-steps"
"""Versions started with it run each reconcile step as a task that undeploy, delete and the deploy
deadline cancel; only the main loop runs backend activities, and handlers hold no lock across one.
Versions started before it keep the old path (handlers tearing down under a lock) until they continue
as new. The choice is made once per run, at its start, so a run never mixes the two."""
GRACEFUL_CHECK_SECONDS = 5.0
"""A graceful undeploy first asks the gateways this long at most whether anything is queued or running."""
TEARDOWN_RETRY_AFTER_SECONDS = 30.0
"""A teardown that failed after its retries is tried again after this long, for as long as it fails."""
DEADLINE_DOWNTIME_PATCH = "deadline-skips-platform-downtime"
"""Versions started with it (and `LIFECYCLE_STEPS_PATCH`) do not count time during which the platform
(worker or Temporal) was stopped against the deploy deadline: while DEPLOYING no timer is longer than
`DEADLINE_CHECK`, and a wake-up later than its timer by more than `PLATFORM_STOP_MARGIN` is added to
`Deployment.deployPausedSeconds`. Decided once per run, like `LIFECYCLE_STEPS_PATCH`."""
DEADLINE_CHECK = timedelta(seconds=60)
"""The longest timer the workflow waits on while DEPLOYING, so a stop of the platform is noticed by at
most this much time after it began."""
PLATFORM_STOP_MARGIN = timedelta(seconds=30)
"""A wake-up later than its timer by more than this was not a slow worker: nothing ran the workflow."""


def raise_if_cancelled(err: ActivityError) -> None:
    """Re-raise an activity ended by the workflow's own cancellation as a cancellation of the caller.

    A cancelled activity surfaces as an `ActivityError`; it is no fault of the activity, and the step
    that awaited it must end cancelled instead of recording a failure.
    """
    if isinstance(err.cause, CancelledError):
        raise asyncio.CancelledError() from err


def spec_failure_text(spec: DeploymentSpecification, instance: InstanceRecord) -> str:
    """Return what healthInfo says of a failed instance: its error and its last log lines."""
    text = instance.error or f"instance {instance.instanceId} failed"
    if instance.logTail:
        text = f"{text}\nLast log lines of {instance.instanceId}:\n{instance.logTail}"
    return text
