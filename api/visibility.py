"""Raw visibility listing: the executions matching a query, page by page, without per-item decoding.

The SDK's `list_workflows` builds a `WorkflowExecution` per item (search attributes, memo objects);
for a thousand versions that decoding costs as much as the query, and the callers here only need one
memo field's JSON bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from temporalio.api.workflow.v1 import WorkflowExecutionInfo
from temporalio.api.workflowservice.v1 import ListWorkflowExecutionsRequest
from temporalio.client import Client

PAGE_SIZE = 1000


def query_literal(value: str) -> str:
    """Return `value` as a quoted string literal of Temporal's visibility query language.

    Every query built from input goes through here: quotes and backslashes are escaped, and a value with
    a control character (NUL included, which the SQL stores behind visibility choke on) is refused.

    Raises:
        ValueError: `value` holds a control character.
    """
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError("a control character cannot be part of a visibility query")
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


async def executions(client: Client, query: str) -> AsyncIterator[WorkflowExecutionInfo]:
    """Yield every execution matching `query`, as the visibility RPC returns it."""
    token = b""
    while True:
        page = await client.workflow_service.list_workflow_executions(
            ListWorkflowExecutionsRequest(
                namespace=client.namespace, query=query, page_size=PAGE_SIZE, next_page_token=token
            )
        )
        for info in page.executions:
            yield info
        token = page.next_page_token
        if not token:
            return


def memo_json(info: WorkflowExecutionInfo, field: str) -> bytes | None:
    """Return a memo field's JSON bytes as stored (None when absent or not plain JSON)."""
    payload = info.memo.fields.get(field)
    if payload is None or payload.metadata.get("encoding") != b"json/plain":
        return None
    return payload.data
