"""What a failed Kubernetes API call means to Temporal: an `ApplicationError`, retryable or not."""

from __future__ import annotations

import json

from kubernetes.client.exceptions import ApiException
from temporalio.exceptions import ApplicationError

RETRYABLE_CLIENT_ERRORS = frozenset({401, 404, 408, 409, 429})
"""4xx statuses that may succeed on a retry (credentials are refreshed, conflicts and throttling pass);
callers treat 404 and 409 as success where they are the idempotent outcome."""


class AlreadyExists(Exception):
    """A create found the object there (409): the idempotent outcome."""


def _status_message(err: ApiException) -> str:
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        return str(err.body or "")[:500]
    return str(body.get("message") or "") if isinstance(body, dict) else ""


def api_error(err: ApiException, action: str) -> ApplicationError:
    """Return the ApplicationError of a failed API call: non-retryable when no retry can succeed.

    Invalid objects (400, 422) and refusals (403) are permanent, except a namespace being deleted;
    server errors, throttling, conflicts and expired credentials are retried by Temporal.
    """
    status = int(err.status or 0)
    message = _status_message(err)
    terminating = status == 403 and "being terminated" in message
    permanent = 400 <= status < 500 and status not in RETRYABLE_CLIENT_ERRORS and not terminating
    kind = {400: "KubernetesBadRequest", 403: "KubernetesForbidden", 422: "KubernetesInvalid"}.get(
        status, "KubernetesApiError"
    )
    return ApplicationError(
        f"Kubernetes API: cannot {action}: {status} {err.reason or ''}: {message}".strip(),
        type=kind,
        non_retryable=permanent,
    )


def invalid_spec(message: str) -> ApplicationError:
    """Return the error of a function spec that no cluster can run as it is."""
    return ApplicationError(message, type="InvalidSpec", non_retryable=True)


def unreachable(cluster_group: str, reason: str | None) -> ApplicationError:
    """Return the (retryable) error of a cluster whose objects could not be listed in time."""
    return ApplicationError(
        f"Cluster '{cluster_group}' cannot be reached: {reason or 'no answer'}", type="KubernetesUnavailable"
    )
