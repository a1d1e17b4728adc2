"""The OpenAPI document is complete and truthful: request bodies with NVCF's names and limits, problem
answers, the invocation endpoints; and a property-based run (schemathesis) over real HTTP against the
real stack finds no 5xx and no answer that breaks its documented schema."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from api.principal import ALL_SCOPES
from tests.api.helpers import create
from tests.conftest import Stack, echo_function

BODY_METHODS = ("post", "put", "patch")


async def openapi(stack: Stack) -> dict[str, Any]:
    response = await stack.http.get("/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a `$ref` (and a nullable `anyOf` around one) to the schema it names."""
    if "anyOf" in schema:
        schema = next(s for s in schema["anyOf"] if s.get("type") != "null")
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        target: dict[str, Any] = document["components"]["schemas"][name]
        return target
    return schema


def body_schema(document: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    body = document["paths"][path][method]["requestBody"]
    return resolve(document, body["content"]["application/json"]["schema"])


async def test_every_body_operation_documents_its_request_body(stack: Stack) -> None:
    document = await openapi(stack)
    operations = [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in BODY_METHODS
    ]
    assert len(operations) >= 30
    for path, method, operation in operations:
        content = operation.get("requestBody", {}).get("content")
        assert content, f"{method.upper()} {path} has no request body schema"
        for media in content.values():
            schema = media["schema"]
            if "invocation" in operation.get("tags", []):
                continue  # pexec bodies go verbatim to the function: any JSON or bytes
            assert resolve(document, schema).get("properties"), f"{method.upper()} {path}: {schema}"


async def test_request_bodies_carry_nvcf_names_and_limits(stack: Stack) -> None:
    document = await openapi(stack)
    create = body_schema(document, "/v2/nvcf/functions", "post")
    props = create["properties"]
    assert {"name", "inferenceUrl"} <= set(create["required"])
    assert (props["name"]["minLength"], props["name"]["maxLength"]) == (1, 128)
    assert props["name"]["pattern"] == "^[a-z0-9A-Z][a-z0-9A-Z\\-_]*$"
    assert props["description"]["anyOf"][0]["maxLength"] == 256
    assert props["tags"]["maxItems"] == 64 and props["tags"]["items"]["maxLength"] == 128
    assert resolve(document, props["inferencePort"])["maximum"] == 65535
    health = resolve(document, props["health"])
    assert set(health["required"]) == {"protocol", "uri", "port", "timeout", "expectedStatusCode"}
    assert health["additionalProperties"] is False
    secret = resolve(document, resolve(document, props["secrets"])["items"])
    assert (secret["properties"]["name"]["maxLength"], secret["properties"]["name"]["minLength"]) == (48, 1)
    assert set(props) >= {
        "containerImage", "containerArgs", "containerEnvironment", "helmChart", "helmChartServiceName",
        "models", "resources", "apiBodyFormat", "functionType", "secrets", "rateLimit", "telemetries",
    }  # fmt: skip

    deploy = body_schema(document, "/v2/nvcf/deployments/functions/{functionId}/versions/{versionId}", "post")
    specs = deploy["properties"]["deploymentSpecifications"]
    assert (specs["minItems"], specs["maxItems"]) == (1, 32)
    spec = resolve(document, specs["items"])
    assert set(spec["required"]) == {"gpu", "instanceType", "minInstances", "maxInstances"}
    limits = {name: (spec["properties"][name]["minimum"], spec["properties"][name]["maximum"]) for name in (
        "minInstances", "maxInstances", "maxRequestConcurrency")}  # fmt: skip
    assert limits == {
        "minInstances": (0, 1000),
        "maxInstances": (1, 1000),
        "maxRequestConcurrency": (1, 1024),
    }

    patch = body_schema(
        document, "/v2/nvcf/deployments/{deploymentId}/gpu-specifications/{gpuSpecificationId}", "patch"
    )
    assert not patch.get("required")  # a partial body
    assert {
        "minInstances",
        "maxInstances",
        "autoscalingConfiguration",
        "autoscalingConfigurationPolicy",
    } <= set(patch["properties"])
    policy = resolve(document, patch["properties"]["autoscalingConfigurationPolicy"])
    assert set(policy["enum"]) == {"CUSTOM_CONFIGURATION", "PLATFORM_CONFIGURATION"}

    key = body_schema(document, "/v2/gpufn/keys", "post")
    assert key["required"] == ["scopes"]
    assert "invoke_function" in key["properties"]["scopes"]["items"]["enum"]
    assert key["properties"]["account"]["maxLength"] == 128

    rate = body_schema(document, "/v2/nvcf/ratelimit/functions/{functionId}/versions/{versionId}", "put")
    assert rate["required"] == ["rateLimit"] and "pattern" in rate["properties"]["rateLimit"]


async def test_errors_are_documented_as_problem_json(stack: Stack) -> None:
    document = await openapi(stack)
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, f"{method} {path}"
            for code in ("400", "401", "403", "404"):
                content = responses[code]["content"]
                schema = content["application/problem+json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Problem"}, f"{method} {path} {code}"


async def test_invocation_endpoints_are_documented(stack: Stack) -> None:
    paths = (await openapi(stack))["paths"]
    for prefix in ("/v2/nvcf", "/v2/orgs/{org}/nvcf", "/v2/orgs/{org}/teams/{team}/nvcf"):
        invoke = paths[f"{prefix}/pexec/functions/{{functionId}}"]["post"]
        assert "NVCF-POLL-SECONDS" in {p["name"] for p in invoke["parameters"]}
        assert set(invoke["responses"]["202"]["headers"]) == {"NVCF-REQID", "NVCF-STATUS"}
        assert set(invoke["responses"]["200"]["headers"]) == {"NVCF-REQID", "NVCF-STATUS"}
        assert {"400", "401", "404", "429"} <= set(invoke["responses"])
        assert f"{prefix}/pexec/functions/{{functionId}}/versions/{{versionId}}" in paths
        assert "202" in paths[f"{prefix}/pexec/status/{{requestId}}"]["get"]["responses"]
        assert f"{prefix}/queues/functions/{{functionId}}" in paths
        assert f"{prefix}/queues/functions/{{functionId}}/versions/{{versionId}}" in paths
        assert f"{prefix}/queues/{{requestId}}/position" in paths


async def test_docs_page_serves(stack: Stack) -> None:
    response = await stack.http.get("/docs")
    assert response.status_code == 200 and "/openapi.json" in response.text


# --- Property-based run --------------------------------------------------------------------------

MAX_EXAMPLES = 3
TIME_LIMIT_SECONDS = 55


async def test_property_based_run_finds_no_5xx_and_no_schema_violation(stack: Stack, tmp_path: Path) -> None:
    """Run schemathesis over every documented operation, with its own account's key, on the real stack.

    Checks: no answer is a 5xx, and every answer's status, content type and body match the document.
    Bounded by a fixed number of examples per operation and a wall-clock limit. The org-scoped copies
    of each path are left out: they run the same handlers, and would triple the run's time.
    """
    # A fresh account's key: the admin's account on the session's shared Temporal server also holds
    # the versions of earlier test modules' stacks, whose workers are gone.
    account = f"fuzz-{uuid.uuid4().hex[:8]}"
    key = await stack.create_key(account, sorted(ALL_SCOPES - {"manage_keys"}))
    await create(stack, echo_function("fuzzed"), key=key)  # ids for the run to find and reuse
    command = [
        os.path.join(os.path.dirname(sys.executable), "st"),
        "run",
        f"{stack.api_url}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--phases",
        "examples,fuzzing",
        "--generation-deterministic",
        "--header",
        f"Authorization: Bearer {key}",
        "--request-timeout",
        "10",
        "--workers",
        "1",
        "--no-color",
        # The org-scoped forms run the same handlers (their org rules are tested in test_keys.py).
        "--exclude-path-regex",
        "^/v2/orgs/",
    ]
    # Asynchronously: the API under test serves on this test's event loop.
    process = await asyncio.create_subprocess_exec(
        *command, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), TIME_LIMIT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"schemathesis ran over {TIME_LIMIT_SECONDS} s") from None
    output = stdout.decode(errors="replace")
    assert process.returncode == 0, output[-12000:]
