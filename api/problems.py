"""RFC 9457 problem details, with NVCF's `type` URNs, for every error the API returns."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"

_KINDS = {
    400: "bad-request",
    401: "unauthorized",
    402: "payment-required",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    408: "request-timeout",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "unprocessable-entity",
    429: "too-many-requests",
    500: "internal-server-error",
    502: "upstream",
    503: "service-unavailable",
    504: "gateway-timeout",
}


def problem_type(status: int) -> str:
    """Return NVCF's problem type URN for a status code."""
    kind = _KINDS.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "-")
    return f"urn:nv-boot:problem-details:{kind}"


def problem_body(status: int, detail: str, instance: str | None = None, **extra: Any) -> dict[str, Any]:
    """Return a problem-details object for `status` with a readable `detail`."""
    body: dict[str, Any] = {
        "type": problem_type(status),
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    body.update(extra)
    return body


def problem_bytes(status: int, detail: str, instance: str | None = None, **extra: Any) -> bytes:
    """Return a serialized problem-details body."""
    return json.dumps(problem_body(status, detail, instance, **extra)).encode()


class ProblemError(Exception):
    """An expected error that the API answers with problem details (never a 500)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
