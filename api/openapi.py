"""The API's OpenAPI document: FastAPI's, from the routes' own models, plus what FastAPI cannot see.

Added here: the `Problem` schema as `application/problem+json` for every error status an operation
answers (FastAPI's 422 is dropped: validation errors are 400 here), and the invocation endpoints, which
the gateway serves as raw ASGI in front of FastAPI (so no route exists for FastAPI to describe).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.problems import PROBLEM_CONTENT_TYPE
from api.responses import Problem

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
ERROR_STATUSES = {
    "400": "Bad request: malformed JSON, a field that breaks a rule (the detail names it), a bad parameter",
    "401": "Missing or unknown API key",
    "403": "The key lacks the scope, or belongs to another org",
    "404": "No such function, version, deployment or key in the caller's account",
    "413": "Request body too large",
    "503": "The control plane (Temporal) is unavailable; retry",
}
INVOCATION_ERROR_STATUSES = {
    "400": "Bad request: e.g. NVCF-POLL-SECONDS out of 0-3600, or the only versions are DEGRADED",
    "401": "Missing or unknown API key",
    "403": "The key lacks the scope, or belongs to another org",
    "404": "No such function or version, not deployed, or an unknown or expired request id",
    "413": "Request body over the gateway's limit",
    "429": "Over the version's rate limit, or its queue is full (see Retry-After)",
    "500": "The function's instance failed (NVCF-STATUS: errored)",
    "502": "The instance could not be reached",
    "503": "No instance can serve now",
    "504": "The instance did not answer in time",
}
NVCF_PREFIXES = ("/v2/nvcf", "/v2/orgs/{org}/nvcf", "/v2/orgs/{org}/teams/{team}/nvcf")


def _problem_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_CONTENT_TYPE: {"schema": PROBLEM_REF}}}


def _header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "schema": schema or {"type": "string"}}


REQID_HEADER = _header("The request's id: poll GET /v2/nvcf/pexec/status/{requestId} with it")
STATUS_HEADER = _header(
    "fulfilled, in-progress or errored",
    {"type": "string", "enum": ["fulfilled", "in-progress", "errored"]},
)


def _prefix_parameters(prefix: str) -> list[dict[str, Any]]:
    names = [n for n in ("org", "team") if "{" + n + "}" in prefix]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def _path_parameter(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": description,
    }


def _invocation_paths() -> dict[str, dict[str, Any]]:
    """Return the gateway's endpoints (NVCF section 5) under every prefix."""
    poll = {
        "name": "NVCF-POLL-SECONDS",
        "in": "header",
        "required": False,
        "schema": {"type": "integer", "minimum": 0, "maximum": 3600, "default": 5},
        "description": "How long to wait for the result before answering 202 (0-3600 s)",
    }
    accepted = {
        "description": "Not done within the poll window: poll the status endpoint with NVCF-REQID",
        "headers": {"NVCF-REQID": REQID_HEADER, "NVCF-STATUS": STATUS_HEADER},
    }
    fulfilled = {
        "description": "The instance's answer, verbatim (any content type)",
        "headers": {"NVCF-REQID": REQID_HEADER, "NVCF-STATUS": STATUS_HEADER},
        "content": {"*/*": {"schema": {}}},
    }
    errors = {code: _problem_response(text) for code, text in INVOCATION_ERROR_STATUSES.items()}
    function_id = _path_parameter("functionId", "The function's id")
    version_id = _path_parameter("versionId", "The version's id")
    request_id = _path_parameter("requestId", "NVCF-REQID of an earlier invocation")
    invoke_body = {
        "required": False,
        "description": "Passed verbatim to the version's inferenceUrl",
        "content": {"application/json": {"schema": {}}, "*/*": {"schema": {}}},
    }
    queue_schema = {
        "type": "object",
        "required": ["functionId", "queues"],
        "properties": {
            "functionId": {"type": "string"},
            "queues": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "functionVersionId": {"type": "string"},
                        "functionName": {"type": "string"},
                        "functionStatus": {"type": "string"},
                        "queueDepth": {"type": "integer"},
                    },
                },
            },
        },
    }
    position_schema = {
        "type": "object",
        "properties": {
            "functionId": {"type": "string"},
            "functionVersionId": {"type": "string"},
            "positionInQueue": {"type": "integer"},
        },
    }
    paths: dict[str, dict[str, Any]] = {}
    for prefix in NVCF_PREFIXES:
        common = _prefix_parameters(prefix)
        tag = ["invocation"]
        suffix = prefix.replace("/", "_").replace("{", "").replace("}", "")
        invoke = {
            "tags": tag,
            "parameters": [*common, poll],
            "requestBody": invoke_body,
            "responses": {"200": fulfilled, "202": accepted, **errors},
        }
        paths[f"{prefix}/pexec/functions/{{functionId}}"] = {
            "post": {
                **invoke,
                "operationId": f"invoke_function{suffix}",
                "summary": "Invoke a function (a random ACTIVE or DEGRADING version)",
                "parameters": [*common, function_id, poll],
            }
        }
        paths[f"{prefix}/pexec/functions/{{functionId}}/versions/{{versionId}}"] = {
            "post": {
                **invoke,
                "operationId": f"invoke_function_version{suffix}",
                "summary": "Invoke one version of a function",
                "parameters": [*common, function_id, version_id, poll],
            }
        }
        paths[f"{prefix}/pexec/status/{{requestId}}"] = {
            "get": {
                "tags": tag,
                "operationId": f"invocation_status{suffix}",
                "summary": "Poll an invocation's result (long-polls like the invocation; the result once)",
                "parameters": [*common, request_id, poll],
                "responses": {"200": fulfilled, "202": accepted, **errors},
            }
        }
        queue_responses = {
            "200": {
                "description": "Queue depth per version",
                "content": {"application/json": {"schema": queue_schema}},
            },
            **errors,
        }
        paths[f"{prefix}/queues/functions/{{functionId}}"] = {
            "get": {
                "tags": tag,
                "operationId": f"function_queues{suffix}",
                "summary": "Queue depth of each deployed version of a function",
                "parameters": [*common, function_id],
                "responses": queue_responses,
            }
        }
        paths[f"{prefix}/queues/functions/{{functionId}}/versions/{{versionId}}"] = {
            "get": {
                "tags": tag,
                "operationId": f"version_queue{suffix}",
                "summary": "Queue depth of one version",
                "parameters": [*common, function_id, version_id],
                "responses": queue_responses,
            }
        }
        paths[f"{prefix}/queues/{{requestId}}/position"] = {
            "get": {
                "tags": tag,
                "operationId": f"queue_position{suffix}",
                "summary": "Position of a queued request",
                "parameters": [*common, request_id],
                "responses": {
                    "200": {
                        "description": "Estimated position",
                        "content": {"application/json": {"schema": position_schema}},
                    },
                    **errors,
                },
            }
        }
    return paths


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """Return the complete OpenAPI document of the API process."""
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas["Problem"] = problem
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            # The org-scoped prefixes are on the routers, not the routes: declare their parameters.
            declared = {p["name"] for p in operation.get("parameters", [])}
            missing = [p for p in _prefix_parameters(path) if p["name"] not in declared]
            operation["parameters"] = missing + operation.get("parameters", [])
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for code, text in ERROR_STATUSES.items():
                if code not in responses:
                    responses[code] = _problem_response(text)
                else:
                    # A route's own error response (e.g. /health's 503) keeps its JSON schema.
                    responses[code].setdefault("content", {}).setdefault(
                        PROBLEM_CONTENT_TYPE, {"schema": PROBLEM_REF}
                    )
            if method in ("get", "delete") and "requestBody" in operation:
                del operation["requestBody"]
    document["paths"].update(_invocation_paths())
    return document


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi`'s document at /openapi.json (and so in /docs), built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
