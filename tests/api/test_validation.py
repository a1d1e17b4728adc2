"""NVCF's create-request rules (reference 2.1), case by case, and error handling of malformed input."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.api.helpers import FUNCTIONS, assert_problem, create, version_path
from tests.conftest import Stack, echo_function

HELM = {
    "name": "helm",
    "inferenceUrl": "/infer",
    "helmChart": "https://helm.ngc.nvidia.com/org/team/charts/name-1.0.0.tgz",
    "helmChartServiceName": "entry",
}
IMAGE = {"name": "image", "inferenceUrl": "/infer", "containerImage": "example.com/img:1"}
HEALTH = {"protocol": "HTTP", "uri": "/health", "port": 8000, "timeout": "PT5S", "expectedStatusCode": 200}


def without(body: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in names}


def health(**changes: Any) -> dict[str, Any]:
    return {**IMAGE, "health": {**HEALTH, **changes}}


INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    # name: required, regex, 1-128
    ("name-missing", without(IMAGE, "name"), ["field=name"]),
    ("name-empty", {**IMAGE, "name": ""}, ["field=name", "1-128"]),
    ("name-too-long", {**IMAGE, "name": "a" * 129}, ["field=name", "1-128"]),
    ("name-leading-dash", {**IMAGE, "name": "-fn"}, ["field=name"]),
    ("name-leading-underscore", {**IMAGE, "name": "_fn"}, ["field=name"]),
    ("name-space", {**IMAGE, "name": "my fn"}, ["field=name"]),
    ("name-dot", {**IMAGE, "name": "my.fn"}, ["field=name"]),
    ("name-not-a-string", {**IMAGE, "name": 42}, ["field=name"]),
    # inferenceUrl
    ("inference-url-missing", without(IMAGE, "inferenceUrl"), ["field=inferenceUrl"]),
    ("inference-url-blank", {**IMAGE, "inferenceUrl": " "}, ["field=inferenceUrl"]),
    ("inference-url-not-a-path", {**IMAGE, "inferenceUrl": "echo"}, ["field=inferenceUrl"]),
    ("inference-port-zero", {**IMAGE, "inferencePort": 0}, ["field=inferencePort"]),
    ("inference-port-too-big", {**IMAGE, "inferencePort": 70000}, ["field=inferencePort"]),
    ("inference-port-not-a-number", {**IMAGE, "inferencePort": "http"}, ["field=inferencePort"]),
    # description
    ("description-too-long", {**IMAGE, "description": "d" * 257}, ["field=description", "256"]),
    # tags: at most 64, each 1-128 of [a-zA-Z0-9-_:=]
    ("tags-too-many", {**IMAGE, "tags": [f"t{i}" for i in range(65)]}, ["field=tags", "64"]),
    ("tag-too-long", {**IMAGE, "tags": ["t" * 129]}, ["field=tags", "128"]),
    ("tag-empty", {**IMAGE, "tags": [""]}, ["field=tags"]),
    ("tag-space", {**IMAGE, "tags": ["a b"]}, ["field=tags"]),
    ("tag-slash", {**IMAGE, "tags": ["a/b"]}, ["field=tags"]),
    ("tags-not-a-list", {**IMAGE, "tags": "a"}, ["field=tags"]),
    # one of containerImage / helmChart / models
    ("no-artifact", without(IMAGE, "containerImage"), ["containerImage", "helmChart", "models"]),
    ("image-and-helm", {**HELM, "containerImage": "example.com/img:1"}, ["containerImage", "helmChart"]),
    # helm-only and container-only fields
    ("helm-without-service-name", without(HELM, "helmChartServiceName"), ["helmChartServiceName"]),
    ("service-name-without-helm", {**IMAGE, "helmChartServiceName": "entry"}, ["helmChartServiceName"]),
    ("helm-with-container-args", {**HELM, "containerArgs": "serve"}, ["containerArgs", "helmChart"]),
    (
        "helm-with-container-environment",
        {**HELM, "containerEnvironment": [{"key": "A", "value": "1"}]},
        ["containerEnvironment", "helmChart"],
    ),
    (
        "environment-entry-without-value",
        {**IMAGE, "containerEnvironment": [{"key": "A"}]},
        ["containerEnvironment"],
    ),
    # models and resources
    (
        "model-names-not-unique",
        {**without(IMAGE, "containerImage"), "models": [{"name": "m", "version": "1", "uri": "u"}] * 2},
        ["model names"],
    ),
    ("model-without-version", {**IMAGE, "models": [{"name": "m", "uri": "u"}]}, ["model 'm'", "version"]),
    ("model-without-uri", {**IMAGE, "models": [{"name": "m", "version": "1"}]}, ["model 'm'", "uri"]),
    ("model-without-name", {**IMAGE, "models": [{"version": "1", "uri": "u"}]}, ["field=models.0.name"]),
    ("resource-without-uri", {**IMAGE, "resources": [{"name": "r", "version": "1"}]}, ["resource 'r'"]),
    # health: all five fields, positive port, ISO-8601 timeout, non-blank uri
    ("health-missing-field", {**IMAGE, "health": without(HEALTH, "timeout")}, ["field=health.timeout"]),
    ("health-blank-uri", health(uri=" "), ["field=health.uri"]),
    ("health-port-zero", health(port=0), ["field=health.port"]),
    ("health-timeout-not-iso", health(timeout="10s"), ["field=health.timeout"]),
    ("health-timeout-zero", health(timeout="PT0S"), ["field=health.timeout"]),
    ("health-protocol-unknown", health(protocol="TCP"), ["field=health.protocol"]),
    ("health-status-not-http", health(expectedStatusCode=999), ["field=health.expectedStatusCode"]),
    # enums
    ("api-body-format-unknown", {**IMAGE, "apiBodyFormat": "JSON"}, ["field=apiBodyFormat"]),
    ("function-type-unknown", {**IMAGE, "functionType": "BATCH"}, ["field=functionType"]),
    # secrets: name regex and 1-48 chars, value 1-32768 chars, names unique
    ("secret-name-empty", {**IMAGE, "secrets": [{"name": "", "value": "v"}]}, ["field=secrets.0.name"]),
    (
        "secret-name-too-long",
        {**IMAGE, "secrets": [{"name": "s" * 49, "value": "v"}]},
        ["field=secrets.0.name"],
    ),
    (
        "secret-name-leading-dot",
        {**IMAGE, "secrets": [{"name": ".s", "value": "v"}]},
        ["field=secrets.0.name"],
    ),
    ("secret-name-slash", {**IMAGE, "secrets": [{"name": "a/b", "value": "v"}]}, ["field=secrets.0.name"]),
    ("secret-value-missing", {**IMAGE, "secrets": [{"name": "s"}]}, ["field=secrets.0.value"]),
    ("secret-value-empty", {**IMAGE, "secrets": [{"name": "s", "value": ""}]}, ["field=secrets.0", "value"]),
    (
        "secret-value-too-long",
        {**IMAGE, "secrets": [{"name": "s", "value": "v" * 32769}]},
        ["field=secrets.0", "32768"],
    ),
    (
        "secret-names-duplicate",
        {**IMAGE, "secrets": [{"name": "s", "value": "1"}, {"name": "s", "value": "2"}]},
        ["secret names"],
    ),
    # rate limit and telemetries
    (
        "rate-limit-malformed",
        {**IMAGE, "rateLimit": {"rateLimit": "100 per second"}},
        ["field=rateLimit.rateLimit"],
    ),
    (
        "rate-limit-unit-twice",
        {**IMAGE, "rateLimit": {"rateLimit": "1-S,2-S"}},
        ["field=rateLimit.rateLimit"],
    ),
    (
        "rate-limit-count-too-large",
        {**IMAGE, "rateLimit": {"rateLimit": "10000000000-S"}},
        ["field=rateLimit.rateLimit"],
    ),
    (
        "rate-limit-per-account-malformed",
        {**IMAGE, "rateLimit": {"rateLimit": "1-S", "perNcaIdRate": {"acme": "often"}}},
        ["field=rateLimit.perNcaIdRate"],
    ),
    ("telemetries-empty", {**IMAGE, "telemetries": {}}, ["field=telemetries", "logsTelemetryId"]),
]


@pytest.mark.parametrize(("body", "words"), [pytest.param(b, w, id=i) for i, b, w in INVALID])
async def test_invalid_create_request_is_400_naming_the_field(
    stack: Stack, body: dict[str, Any], words: list[str]
) -> None:
    response = await stack.http.post(FUNCTIONS, json=body)
    detail = assert_problem(response, 400, *words)["detail"]
    assert detail.startswith(("Validation failed: ", "Invalid request: "))


async def test_invalid_new_version_is_400_naming_the_field(stack: Stack) -> None:
    function = await create(stack, echo_function("valid-first"))
    response = await stack.http.post(f"{FUNCTIONS}/{function['id']}/versions", json={**IMAGE, "name": "-x"})
    assert_problem(response, 400, "field=name")


VALID: list[tuple[str, dict[str, Any]]] = [
    ("name-128-chars", {**IMAGE, "name": "a" * 128}),
    ("name-with-dash-and-underscore", {**IMAGE, "name": "A9_b-c"}),
    ("description-256-chars", {**IMAGE, "description": "d" * 256}),
    ("tags-64", {**IMAGE, "tags": [f"t{i}" for i in range(64)]}),
    ("tag-128-chars-all-classes", {**IMAGE, "tags": ["aZ09-_:=" + "t" * 120]}),
    ("secret-name-48-chars", {**IMAGE, "secrets": [{"name": "S" * 48, "value": "v"}]}),
    ("secret-name-dots-dashes", {**IMAGE, "secrets": [{"name": "a.b-c_d", "value": "v"}]}),
    ("secret-value-32768-chars", {**IMAGE, "secrets": [{"name": "s", "value": "v" * 32768}]}),
    ("secret-value-json-object", {**IMAGE, "secrets": [{"name": "s", "value": {"k": "v"}}]}),
    (
        "models-only",
        {**without(IMAGE, "containerImage"), "models": [{"name": "m", "version": "1", "uri": "u"}]},
    ),
    ("image-with-models", {**IMAGE, "models": [{"name": "m", "version": "1", "uri": "u"}]}),
    ("helm-with-models", {**HELM, "models": [{"name": "m", "version": "1", "uri": "u"}]}),
    ("health-grpc", health(protocol="gRPC")),
    ("rate-limit", {**IMAGE, "rateLimit": {"rateLimit": "10-S,500-M"}}),
    ("telemetries-one-id", {**IMAGE, "telemetries": {"logsTelemetryId": str(uuid.uuid4())}}),
]


@pytest.mark.parametrize("body", [pytest.param(b, id=i) for i, b in VALID])
async def test_limit_values_are_accepted(stack: Stack, body: dict[str, Any]) -> None:
    function = await create(stack, body)
    assert function["name"] == body["name"]


async def test_duplicate_tags_collapse_as_a_set(stack: Stack) -> None:
    function = await create(stack, {**IMAGE, "tags": ["a", "b", "a"]})
    assert function["tags"] == ["a", "b"]


# --- Malformed input never yields a 500 ------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        pytest.param(b"{not json", ["Malformed JSON"], id="broken-json"),
        pytest.param(b"", ["JSON object"], id="empty-body"),
        pytest.param(b"[1, 2]", ["JSON object"], id="array"),
        pytest.param(b'"text"', ["JSON object"], id="string"),
        pytest.param(b"null", ["JSON object"], id="null"),
        pytest.param(b'{"name": "\xff\xfe"}', ["Malformed JSON"], id="invalid-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, [], id="deeply-nested"),
        pytest.param(b'{"name": 1e999999}', [], id="huge-number"),
        pytest.param(b'{"inferencePort": 123456789012345678901234567890}', [], id="huge-integer"),
        pytest.param(
            b'{"inferencePort": ' + b"9" * 5000 + b"}", ["Malformed JSON"], id="integer-over-digit-limit"
        ),
        pytest.param(b'{"name": "a", "name": ', ["Malformed JSON"], id="truncated"),
    ],
)
async def test_malformed_body_is_400(stack: Stack, content: bytes, words: list[str]) -> None:
    response = await stack.http.post(FUNCTIONS, content=content, headers={"Content-Type": "application/json"})
    assert_problem(response, 400, *words)


async def test_oversized_body_is_413(stack: Stack) -> None:
    body = {**IMAGE, "description": "d" * (2 * 1024 * 1024)}
    response = await stack.http.post(FUNCTIONS, json=body)
    assert_problem(response, 413)


async def test_wrong_types_everywhere_are_400(stack: Stack) -> None:
    body = {
        "name": ["x"],
        "inferenceUrl": {"a": 1},
        "health": "yes",
        "models": {"name": "m"},
        "secrets": "s",
        "containerEnvironment": [1],
    }
    response = await stack.http.post(FUNCTIONS, json=body)
    assert_problem(
        response, 400, "field=name", "field=inferenceUrl", "field=health", "field=models", "field=secrets"
    )


async def test_rejected_secret_values_are_not_echoed(stack: Stack) -> None:
    secret = "leaky-" + uuid.uuid4().hex
    payloads: list[Any] = [
        [{"name": "s", "value": value}, {"name": "-bad", "value": secret}]
        for value in ([secret], 12345678987654321, "", {"k": secret * 2000})
    ]
    payloads.append(secret)
    payloads.append([secret])
    for secrets in payloads:
        response = await stack.http.post(FUNCTIONS, json={**IMAGE, "secrets": secrets})
        body = assert_problem(response, 400, "field=secrets")
        assert secret not in response.text and "12345678987654321" not in response.text, body


async def test_oversized_values_are_truncated_in_the_detail(stack: Stack) -> None:
    response = await stack.http.post(FUNCTIONS, json={**IMAGE, "name": "-" + "n" * 10_000})
    body = assert_problem(response, 400, "field=name")
    assert len(body["detail"]) < 1000


async def test_invalid_query_parameter_is_400(stack: Stack) -> None:
    function = await create(stack, echo_function("query-param"))
    response = await stack.http.get(version_path(function) + "?includeSecrets=maybe")
    assert_problem(response, 400, "includeSecrets")


async def test_unknown_endpoint_is_404_problem(stack: Stack) -> None:
    response = await stack.http.get("/v2/nvcf/nothing-here")
    assert_problem(response, 404)


async def test_wrong_method_is_405_problem(stack: Stack) -> None:
    response = await stack.http.patch(FUNCTIONS, json={})
    assert_problem(response, 405)


@pytest.mark.parametrize(
    "function_id",
    [
        pytest.param("f" * 5000, id="very-long"),
        pytest.param("a'b\"c\\d", id="quotes"),
        pytest.param("x OR 1=1", id="query-injection"),
    ],
)
async def test_odd_function_ids_are_404(stack: Stack, function_id: str) -> None:
    for path in (
        f"{FUNCTIONS}/{function_id}/versions",
        f"{FUNCTIONS}/{function_id}/versions/{function_id}",
    ):
        response = await stack.http.get(path)
        assert_problem(response, 404, "Not found for account")
