"""Durable Temporal workflows: one entity workflow per function version, plus the key registry."""

TASK_QUEUE = "gpufn"
"""The task queue every gpufn worker polls; tests override it with a unique queue."""

KEY_REGISTRY_WORKFLOW_ID = "gpufn-key-registry"
"""The single entity workflow that holds the (hashed) API keys of every account."""


def function_version_workflow_id(function_id: str, version_id: str) -> str:
    """Return the deterministic workflow ID of a function version's entity workflow."""
    return f"function:{function_id}:{version_id}"
