"""Every number a request body carries is bounded, and specs that cannot run are refused at creation.

Each case is the HTTP call a client makes against a real stack; the answer must be a 400 problem that
names the field, never an accepted value that the platform cannot honour (issue 14 items 3 and 5).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.helpers import FUNCTIONS, assert_problem, create
from tests.conftest import Stack, cpu_spec, echo_function

IMAGE = {"name": "limits", "inferenceUrl": "/infer", "containerImage": "example.com/img:1"}
HEALTH = {"protocol": "HTTP", "uri": "/health", "port": 8000, "timeout": "PT5S", "expectedStatusCode": 200}


def deployment_path(function: dict[str, Any]) -> str:
    return f"/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}"


INVALID_SPECS: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "max-instances-huge",
        {"maxInstances": 10**18},
        ["field=deploymentSpecifications.0.maxInstances", "1000"],
    ),
    (
        "min-instances-huge",
        {"minInstances": 10**18},
        ["field=deploymentSpecifications.0.minInstances", "1000"],
    ),
    ("max-instances-1001", {"maxInstances": 1001}, ["maxInstances", "1000"]),
    ("concurrency-1025", {"maxRequestConcurrency": 1025}, ["maxRequestConcurrency", "1024"]),
    ("concurrency-zero", {"maxRequestConcurrency": 0}, ["maxRequestConcurrency"]),
    ("concurrency-huge", {"maxRequestConcurrency": 10**30}, ["maxRequestConcurrency", "1024"]),
    ("preferred-order-100", {"preferredOrder": 100}, ["preferredOrder", "99"]),
    (
        "scale-up-factor-huge",
        {"autoscalingConfiguration": {"scaleUpDetails": {"factor": 1e300, "threshold": 70}}},
        ["scaleUpDetails.factor", "100"],
    ),
    (
        "scale-threshold-over-100",
        {"autoscalingConfiguration": {"scaleDownDetails": {"factor": 0.5, "threshold": 101}}},
        ["scaleDownDetails.threshold"],
    ),
    (
        "stickiness-over-an-hour",
        {
            "autoscalingConfiguration": {
                "scaleUpDetails": {
                    "factor": 2,
                    "threshold": 70,
                    "stickiness": {"size": "P9999D", "threshold": "PT1M"},
                }
            }
        },
        ["stickiness"],
    ),
    ("scale-up-rate-huge", {"gpufnAutoscaler": {"maxScaleUpRate": 1e300}}, ["maxScaleUpRate", "1000"]),
    ("scale-down-rate-huge", {"gpufnAutoscaler": {"maxScaleDownRate": 1e300}}, ["maxScaleDownRate"]),
    ("idle-seconds-huge", {"gpufnAutoscaler": {"scaleToZeroIdleSeconds": 1e300}}, ["scaleToZeroIdleSeconds"]),
    ("drain-seconds-huge", {"gpufnAutoscaler": {"drainTimeoutSeconds": 1e300}}, ["drainTimeoutSeconds"]),
]


@pytest.mark.parametrize(("change", "words"), [pytest.param(c, w, id=i) for i, c, w in INVALID_SPECS])
async def test_out_of_bounds_deployment_numbers_are_400(
    stack: Stack, change: dict[str, Any], words: list[str]
) -> None:
    function = await create(stack, echo_function("bounds"))
    body = cpu_spec(0, 2)
    body["deploymentSpecifications"][0].update(change)
    response = await stack.http.post(deployment_path(function), json=body)
    assert_problem(response, 400, "Validation failed", *words)
    # Nothing was deployed: the version can still be deployed with a valid body.
    assert (await stack.http.get(deployment_path(function))).status_code == 404


async def test_too_many_deployment_specifications_are_400(stack: Stack) -> None:
    function = await create(stack, echo_function("many-specs"))
    spec = cpu_spec(0, 1)["deploymentSpecifications"][0]
    response = await stack.http.post(
        deployment_path(function), json={"deploymentSpecifications": [spec] * 33}
    )
    assert_problem(response, 400, "deploymentSpecifications", "32")


async def test_limit_values_of_a_deployment_are_accepted(stack: Stack) -> None:
    function = await create(stack, echo_function("limit-values"))
    body = cpu_spec(0, 1000, maxRequestConcurrency=1024)
    response = await stack.http.post(deployment_path(function), json=body)
    assert response.status_code == 200, response.text
    (spec,) = response.json()["deployment"]["deploymentSpecifications"]
    assert (spec["maxInstances"], spec["maxRequestConcurrency"]) == (1000, 1024)
    assert (await stack.http.delete(deployment_path(function))).status_code == 200


async def test_put_deployment_refuses_out_of_bounds_concurrency(stack: Stack) -> None:
    function = await create(stack, echo_function("put-bounds"))
    assert (await stack.http.post(deployment_path(function), json=cpu_spec(0, 1))).status_code == 200
    response = await stack.http.put(
        deployment_path(function), json=cpu_spec(0, 1, maxRequestConcurrency=2048)
    )
    assert_problem(response, 400, "maxRequestConcurrency", "1024")
    await stack.http.delete(deployment_path(function))


INVALID_FUNCTIONS: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "container-args-unterminated-quote",
        {**IMAGE, "containerArgs": "python 'unterminated"},
        ["field=containerArgs", "command line", "No closing quotation"],
    ),
    (
        "container-args-trailing-escape",
        {**IMAGE, "containerArgs": "python server.py \\"},
        ["field=containerArgs", "command line"],
    ),
    ("container-args-nul", {**IMAGE, "containerArgs": "python\u0000x"}, ["field=containerArgs", "NUL"]),
    (
        "health-unknown-field",
        {**IMAGE, "health": {**HEALTH, "intervalSeconds": 5}},
        ["field=health.intervalSeconds", "Extra inputs"],
    ),
    (
        "health-misspelt-field",
        {**IMAGE, "health": {**HEALTH, "expectedStatus": 200}},
        ["field=health.expectedStatus"],
    ),
    ("health-uri-not-a-path", {**IMAGE, "health": {**HEALTH, "uri": "health"}}, ["field=health.uri"]),
    (
        "health-timeout-a-year",
        {**IMAGE, "health": {**HEALTH, "timeout": "P365D"}},
        ["field=health.timeout", "PT1H"],
    ),
    ("health-port-huge", {**IMAGE, "health": {**HEALTH, "port": 10**20}}, ["field=health.port"]),
    ("health-uri-nul", {**IMAGE, "health": {**HEALTH, "uri": "/h\u0000"}}, ["field=health.uri"]),
    ("health-uri-legacy-not-a-path", {**IMAGE, "healthUri": "ready"}, ["field=healthUri"]),
    ("inference-url-nul", {**IMAGE, "inferenceUrl": "/a\u0000b"}, ["field=inferenceUrl", "control"]),
    ("inference-port-huge", {**IMAGE, "inferencePort": 10**18}, ["field=inferencePort"]),
    (
        "environment-key-with-equals",
        {**IMAGE, "containerEnvironment": [{"key": "A=B", "value": "1"}]},
        ["field=containerEnvironment.0.key"],
    ),
    (
        "environment-key-empty",
        {**IMAGE, "containerEnvironment": [{"key": "", "value": "1"}]},
        ["field=containerEnvironment.0.key"],
    ),
    (
        "environment-value-nul",
        {**IMAGE, "containerEnvironment": [{"key": "A", "value": "x\u0000y"}]},
        ["field=containerEnvironment.0.value", "NUL"],
    ),
    (
        "environment-too-many",
        {**IMAGE, "containerEnvironment": [{"key": f"K{i}", "value": "v"} for i in range(257)]},
        ["field=containerEnvironment", "256"],
    ),
    ("container-image-blank", {**IMAGE, "containerImage": "  "}, ["field=containerImage"]),
]


@pytest.mark.parametrize(("body", "words"), [pytest.param(b, w, id=i) for i, b, w in INVALID_FUNCTIONS])
async def test_specs_that_cannot_run_are_refused_at_creation(
    stack: Stack, body: dict[str, Any], words: list[str]
) -> None:
    response = await stack.http.post(FUNCTIONS, json=body)
    assert_problem(response, 400, "Validation failed", *words)


async def test_top_level_unknown_fields_stay_ignored(stack: Stack) -> None:
    function = await create(
        stack, {**IMAGE, "someFutureField": {"x": 1}, "containerArgs": "python -c 'print(1)'"}
    )
    assert function["containerArgs"] == "python -c 'print(1)'"
