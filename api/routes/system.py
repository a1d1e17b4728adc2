"""Health and internal endpoints: readiness of the stack, the gateway's load for the workers."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

from api.deps import AppContext, Context, require
from api.principal import Principal
from api.problems import ProblemError
from api.responses import LoadReport, StackHealth

router = APIRouter(tags=["system"])

HEALTH_CACHE_SECONDS = 1.0
WORKER_SEEN_WITHIN = timedelta(seconds=70)

_health_cache: dict[int, tuple[float, int, dict[str, Any]]] = {}


async def _check(context: AppContext) -> tuple[int, dict[str, Any]]:
    checks: dict[str, Any] = {"api": "ok"}
    try:
        await asyncio.wait_for(context.client.service_client.check_health(), timeout=2)
        checks["temporal"] = "ok"
    except Exception as err:
        checks["temporal"] = f"unreachable: {err}"
        checks["worker"] = "unknown"
        return 503, checks
    try:
        described = await asyncio.wait_for(
            context.client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=context.client.namespace,
                    task_queue=TaskQueue(name=context.settings.task_queue),
                    task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                )
            ),
            timeout=2,
        )
        pollers = [
            p
            for p in described.pollers
            if time.time() - p.last_access_time.seconds < WORKER_SEEN_WITHIN.seconds
        ]
        checks["worker"] = "ok" if pollers else "no worker polls the task queue"
    except Exception as err:
        checks["worker"] = f"unknown: {err}"
    status = 200 if all(v == "ok" for v in checks.values()) else 503
    return status, checks


@router.get(
    "/health",
    response_model=None,
    responses={
        200: {"model": StackHealth, "description": "The API, Temporal and a worker are ready"},
        503: {"model": StackHealth, "description": "A check failed; `checks` says which"},
    },
)
async def health(request: Request, context: Context) -> JSONResponse:
    """Answer 200 only when the API, Temporal and a worker are ready (no key needed)."""
    now = time.monotonic()
    cached = _health_cache.get(id(context))
    if cached is None or now - cached[0] > HEALTH_CACHE_SECONDS:
        status, checks = await _check(context)
        _health_cache[id(context)] = (now, status, checks)
    else:
        _, status, checks = cached
    return JSONResponse(
        {"status": "ok" if status == 200 else "unavailable", "checks": checks}, status_code=status
    )


Admin = Annotated[Principal, Depends(require("manage_keys"))]


@router.get("/internal/v1/load", response_model=LoadReport)
async def load(
    principal: Admin, context: Context, since: int | None = None, epoch: str | None = None
) -> dict[str, Any]:
    """Return this replica's per-version load (the autoscaler's signal and the drain's).

    With `since` and `epoch` from the caller's last report, only the versions that changed after it.
    """
    if not principal.admin:
        raise ProblemError(403, "Internal endpoint: admin key only")
    return context.gateway.load_report(since, epoch)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(principal: Admin, context: Context) -> PlainTextResponse:
    """Return this API process's metrics in Prometheus' text format (admin key).

    The same registry is served without a key on `GPUFN_API_METRICS_ADDRESS` when the operator sets one.
    """
    if not principal.admin:
        raise ProblemError(403, "Metrics: admin key only")
    body = generate_latest(context.gateway.observer.metrics.registry)
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)
