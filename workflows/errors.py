"""The declared errors of the function-version workflow: why an update is refused, why an activity failed.

Each is an `ApplicationError` with a stable `type`, so callers (the API, scripts) recognise a refusal by
its declared type and never by a Python class name. `api/registry.py` maps the types to HTTP problems in
one place. Pure data: safe inside the workflow sandbox.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

VERSION_NOT_FOUND = "VersionNotFound"
"""The caller's account has no such live version (HTTP 404, in NVCF's words, which the API knows)."""
VERSION_DELETED = "VersionDeleted"
"""The version is deleted (or being deleted): nothing about it can change any more (HTTP 404)."""
NOT_DEPLOYED = "NotDeployed"
"""An undeploy of a version that has no deployment (HTTP 404, as NVCF answers)."""
INVALID_STATE = "InvalidState"
"""The version's status forbids the change now (HTTP 400); the text says what to do instead."""
DEPLOYMENT_FINISHING = "DeploymentFinishing"
"""A graceful undeploy is still draining; the same request succeeds once it finished (HTTP 400)."""
INVALID_DEPLOYMENT = "InvalidDeployment"
"""The request contradicts the existing deployment (HTTP 400)."""

PERMANENT_FAULT = "PermanentFault"
"""An activity met a fault that no retry can repair (a command line that cannot be split, a bad field)."""

NOT_FOUND_TYPES = frozenset({VERSION_NOT_FOUND, VERSION_DELETED, NOT_DEPLOYED})
"""Refusals that mean "no such thing" rather than "not now"."""


def refused(kind: str, message: str, retry_can_help: bool = False) -> ApplicationError:
    """Return the error an update validator raises to refuse an update, declared by `kind`."""
    return ApplicationError(message, type=kind, non_retryable=not retry_can_help)


def permanent_fault(message: str) -> ApplicationError:
    """Return the error an activity raises for a fault that a retry cannot repair."""
    return ApplicationError(message, type=PERMANENT_FAULT, non_retryable=True)
