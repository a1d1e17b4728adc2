"""The API's only way to Temporal for function versions: start, list, describe and update their workflows.

Lists cost one visibility call (the memo carries what a list shows); reading one version is one query;
changing one is one validated update. Temporal errors become problem details here, at the edge.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.gateway.route_lookup import is_uuid
from api.problems import ProblemError
from api.visibility import executions, memo_json, query_literal
from workflows import errors, function_version_workflow_id
from workflows import search_attributes as sa
from workflows.function_version import FunctionVersionWorkflow
from workflows.models import (
    DeployRequest,
    FunctionStatus,
    FunctionVersionInput,
    VersionState,
    VersionView,
)
from workflows.routes import route_memo, summary_memo

VISIBILITY_SETTLE_SECONDS = 2.0
"""How long a lookup by function ID retries while a just-created version reaches visibility."""


def _quote(value: str) -> str:
    try:
        return query_literal(value)
    except ValueError as err:
        raise ProblemError(400, f"Invalid identifier {value!r}: {err}") from None


def _list_query(account: str, function_id: str | None) -> str:
    """Return the visibility query of an account's live versions (of one function, when given)."""
    if function_id is not None and not is_uuid(function_id):
        # Every function id is a UUID: anything else names no function, and never reaches a query.
        raise not_found(function_id, None, account)
    query = f"GpufnAccount = {_quote(account)} AND ExecutionStatus = 'Running' AND GpufnStatus != 'DELETED'"
    if function_id is not None:
        query += f" AND GpufnFunctionId = {_quote(function_id)}"
    return query


def not_found(function_id: str, version_id: str | None, account: str) -> ProblemError:
    """Return NVCF's 404 for a function or version the account does not have."""
    if version_id is None:
        return ProblemError(404, f"Function '{function_id}': Not found for account '{account}'")
    return ProblemError(
        404, f"Function '{function_id}' version '{version_id}': Not found for account '{account}'"
    )


_LEGACY_NOT_FOUND_TYPES = frozenset({"LookupError"})
"""What workers older than the declared errors raised for "not found" (Python class names)."""


def refusal_problem(err: WorkflowUpdateFailedError, missing: ProblemError | None = None) -> ProblemError:
    """Return the problem an update refused by the workflow becomes: the one place this is decided.

    The workflow declares each refusal with an `ApplicationError` type (`workflows.errors`): "no such
    thing" types are a 404, every other refusal a 400 carrying the workflow's text. `missing` is the
    API's own 404 for the version (NVCF's words), answered for `VersionNotFound`.
    """
    cause = err.cause
    if not isinstance(cause, ApplicationError):
        return ProblemError(400, str(cause))
    if cause.type == errors.VERSION_NOT_FOUND and missing is not None:
        return missing
    if cause.type in errors.NOT_FOUND_TYPES or cause.type in _LEGACY_NOT_FOUND_TYPES:
        return ProblemError(404, cause.message)
    return ProblemError(400, cause.message)


class FunctionRegistry:
    """Function versions as Temporal workflows.

    Args:
        client: The Temporal client.
        task_queue: The task queue of the workers that run the workflows.
        deploy_timeout: Seconds a new deployment may stay DEPLOYING (`GPUFN_DEPLOY_TIMEOUT`); every
            deploy request carries it to the workflow.
    """

    def __init__(self, client: Client, task_queue: str, deploy_timeout: float = 900.0) -> None:
        self._client = client
        self._task_queue = task_queue
        self._deploy_timeout = deploy_timeout

    async def create(self, state: VersionState) -> None:
        """Start the entity workflow of a new version, with its search attributes and memo."""
        spec = state.spec
        await self._client.start_workflow(
            FunctionVersionWorkflow.run,
            FunctionVersionInput(state=state),
            id=function_version_workflow_id(spec.id, spec.versionId),
            task_queue=self._task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(sa.ACCOUNT, spec.ncaId),
                    SearchAttributePair(sa.FUNCTION_ID, spec.id),
                    SearchAttributePair(sa.FUNCTION_NAME, spec.name),
                    SearchAttributePair(sa.VERSION_ID, spec.versionId),
                    SearchAttributePair(sa.STATUS, state.status.value),
                    SearchAttributePair(sa.ROUTES_UPDATED_AT, datetime.now(UTC)),
                ]
            ),
            memo={"summary": summary_memo(state), "route": route_memo(state)},
            static_summary=f"{spec.name} ({spec.id} version {spec.versionId})",
        )

    async def list_summaries(self, account: str, function_id: str | None = None) -> list[dict[str, Any]]:
        """Return the list entries of the account's live versions (of one function, when given)."""
        summaries: list[dict[str, Any]] = json.loads(await self.list_summaries_json(account, function_id))
        return summaries

    async def list_summaries_json(self, account: str, function_id: str | None = None) -> bytes:
        """Return the list entries as one JSON array, spliced from the memos' raw JSON without re-encoding.

        A thousand versions cost one visibility call and no per-item decoding, which keeps a full list
        well under half a second on the embedded stack.
        """
        # The raw RPC, not the SDK's iterator: building a WorkflowExecution per item (search attributes,
        # memo objects) cost as much as the visibility query itself for a thousand versions.
        entries: list[tuple[int, bytes]] = []
        async for info in executions(self._client, _list_query(account, function_id)):
            data = memo_json(info, "summary")
            if data is not None:
                entries.append((info.start_time.ToNanoseconds(), data))
        entries.sort(key=lambda entry: entry[0])
        return b"[" + b",".join(data for _, data in entries) + b"]"

    async def find_deployment(self, account: str, deployment_id: str) -> tuple[str, str]:
        """Return (function ID, version ID) of the account's version deployed as `deployment_id`, or 404.

        Reads the route entries of the account's deployed versions from visibility (one call), since
        a deployment ID is not an indexed attribute; NVCF's lookup by deployment ID is rarely used.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VISIBILITY_SETTLE_SECONDS
        while True:
            found = await self._find_deployment_once(account, deployment_id)
            if found is not None:
                return found
            if loop.time() >= deadline:
                raise ProblemError(404, f"Deployment '{deployment_id}' not found in account '{account}'")
            # A deployment made a moment ago may not have reached visibility yet.
            await asyncio.sleep(0.2)

    async def _find_deployment_once(self, account: str, deployment_id: str) -> tuple[str, str] | None:
        query = (
            f"GpufnAccount = {_quote(account)} AND ExecutionStatus = 'Running' AND GpufnStatus != 'INACTIVE'"
        )
        async for info in executions(self._client, query):
            data = memo_json(info, "route")
            if data is None or deployment_id.encode() not in data:
                continue
            route = json.loads(data)
            if route.get("deploymentId") == deployment_id and route.get("accountId") == account:
                return str(route["functionId"]), str(route["versionId"])
        return None

    async def list_deployments(self, account: str) -> list[dict[str, Any]]:
        """Return NVCF's deployment objects of the account's deployed versions, oldest version first.

        One visibility call: the route memo carries each version's deployment fields.
        """
        query = (
            f"GpufnAccount = {_quote(account)} AND ExecutionStatus = 'Running' AND GpufnStatus != 'DELETED'"
        )
        found: list[tuple[int, dict[str, Any]]] = []
        async for info in executions(self._client, query):
            data = memo_json(info, "route")
            if data is None:
                continue
            route = json.loads(data)
            if not route.get("deploymentId") or route.get("accountId") != account:
                continue
            body: dict[str, Any] = {
                "functionId": route["functionId"],
                "functionVersionId": route["versionId"],
                "deploymentId": route["deploymentId"],
                "functionName": route.get("functionName", ""),
                "ncaId": route["accountId"],
                "functionStatus": route.get("status", FunctionStatus.INACTIVE.value),
            }
            # A version that has not republished its memo since the `deployment` entry was added
            # lists what its route entry holds.
            body.update(route.get("deployment") or {})
            found.append((info.start_time.ToNanoseconds(), body))
        found.sort(key=lambda item: item[0])
        return [body for _, body in found]

    async def function_versions(self, account: str, function_id: str) -> list[dict[str, Any]]:
        """Return a function's versions, waiting briefly for a just-created one to reach visibility."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VISIBILITY_SETTLE_SECONDS
        while True:
            versions = await self.list_summaries(account, function_id)
            if versions or loop.time() >= deadline:
                return versions
            await asyncio.sleep(0.1)

    def handle(self, function_id: str, version_id: str) -> WorkflowHandle[FunctionVersionWorkflow, None]:
        """Return the handle of a version's workflow."""
        return self._client.get_workflow_handle_for(
            FunctionVersionWorkflow.run, function_version_workflow_id(function_id, version_id)
        )

    async def describe(self, account: str, function_id: str, version_id: str) -> VersionState:
        """Return a version's state, or 404 when the account has no such live version."""
        try:
            view = await self.handle(function_id, version_id).query(FunctionVersionWorkflow.describe)
        except RPCError as err:
            if err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
                raise not_found(function_id, version_id, account) from err
            raise
        state = view.state
        if state.spec.ncaId != account or state.deleted or state.status == FunctionStatus.DELETED:
            raise not_found(function_id, version_id, account)
        return state

    async def update(
        self, account: str, function_id: str, version_id: str, update: Any, argument: Any
    ) -> VersionState:
        """Run a validated update of a version's workflow; a rejection becomes a 400 (or 404)."""
        await self.describe(account, function_id, version_id)
        if isinstance(argument, DeployRequest) and argument.deployTimeoutSeconds is None:
            argument = argument.model_copy(update={"deployTimeoutSeconds": self._deploy_timeout})
        try:
            view: VersionView = await self.handle(function_id, version_id).execute_update(update, argument)
        except WorkflowUpdateFailedError as err:
            raise refusal_problem(err) from err
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                raise not_found(function_id, version_id, account) from err
            raise
        return view.state

    async def deploy(
        self, account: str, function_id: str, version_id: str, request: DeployRequest
    ) -> VersionState:
        """Deploy a version in one round trip to Temporal: the `deploy` update, whose validator checks
        that the version is the account's and live (no describe first), and whose answer is the state.

        A refusal becomes the same problem the describe-then-update path answered: 404 for a version the
        account does not have (or that is deleted), else the workflow's 400.
        """
        request = request.model_copy(
            update={
                "accountId": account,
                "deployTimeoutSeconds": (
                    request.deployTimeoutSeconds
                    if request.deployTimeoutSeconds is not None
                    else self._deploy_timeout
                ),
            }
        )
        try:
            view: VersionView = await self.handle(function_id, version_id).execute_update(
                FunctionVersionWorkflow.deploy, request
            )
        except WorkflowUpdateFailedError as err:
            raise refusal_problem(err, not_found(function_id, version_id, account)) from err
        except RPCError as err:
            if err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
                raise not_found(function_id, version_id, account) from err
            raise
        return view.state

    async def is_running(self, function_id: str, version_id: str) -> bool:
        """Return whether the version's workflow is still running."""
        try:
            description = await self.handle(function_id, version_id).describe()
        except RPCError:
            return False
        return description.raw_description.workflow_execution_info.status == (
            WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING
        )
