"""Request records (beyond NVCF): what happened to one invocation, phase by phase."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from api.deps import Context, require
from api.principal import Principal
from api.problems import ProblemError

router = APIRouter(tags=["observability"])

Invoker = Annotated[Principal, Depends(require("invoke_function"))]
RequestId = Annotated[str, Path(alias="requestId", description="The NVCF-REQID of the invocation")]


@router.get("/v2/gpufn/requests/{requestId}")
async def request_record(request_id: RequestId, principal: Invoker, context: Context) -> dict[str, Any]:
    """Return the record of an invocation this API replica accepted: function, version, instance, status,
    outcome, when each phase happened, how long it waited (queue, cold start) and ran, and its sizes.

    Only the account that made the request sees it (another account gets 404, as NVCF hides other
    accounts' objects); records are kept for `GPUFN_REQUEST_RECORD_RETENTION` seconds.
    """
    record = context.gateway.observer.records.get(request_id)
    if record is None or (record.account != principal.account and not principal.admin):
        raise ProblemError(
            404, f"Request id '{request_id}' not found (unknown, past its retention, or on another replica)"
        )
    return record.as_json()
