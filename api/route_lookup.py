"""The gateway's route source: a version's routing entry read from its workflow, for route-table misses.

Visibility (which the route poller reads) lags the workflow by up to a poll interval; the workflow's
`describe` query does not: it answers with the state the management API reports. So when an invocation
misses the gateway's table, `api/gateway/route_lookup.MissResolver` asks here before it answers 404.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api.visibility import executions, query_literal
from workflows import function_version_workflow_id
from workflows.function_version import FunctionVersionWorkflow
from workflows.models import FunctionStatus
from workflows.routes import route_memo

QUERY_TIMEOUT = timedelta(seconds=2)


class TemporalRouteSource:
    """Routing entries as the version workflows hold them right now."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def version_route(self, function_id: str, version_id: str) -> dict[str, Any] | None:
        """Return the version's routing entry, or None when it does not exist or was deleted."""
        handle = self._client.get_workflow_handle_for(
            FunctionVersionWorkflow.run, function_version_workflow_id(function_id, version_id)
        )
        try:
            view = await handle.query(FunctionVersionWorkflow.describe, rpc_timeout=QUERY_TIMEOUT)
        except RPCError as err:
            if err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
                return None
            raise
        state = view.state
        if state.deleted or state.status == FunctionStatus.DELETED:
            return None
        return route_memo(state)

    async def function_version_ids(self, function_id: str) -> list[str]:
        """Return the ids of the function's running version workflows, as visibility lists them."""
        prefix = function_version_workflow_id(function_id, "")
        query = f"GpufnFunctionId = {query_literal(function_id)} AND ExecutionStatus = 'Running'"
        return [
            info.execution.workflow_id.removeprefix(prefix)
            async for info in executions(self._client, query)
            if info.execution.workflow_id.startswith(prefix)
        ]
