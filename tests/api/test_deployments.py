"""The deployments list and the partial PATCH of one GPU specification, as NVCF clients call them.

The NGC SDK's `deployments.list()` calls `GET /v2/nvcf/deployments`; its autoscaling update sends a
PATCH with only the fields to change (NVCF reference section 3.4).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.helpers import assert_problem, create
from tests.conftest import Stack, cpu_spec, echo_function, eventually

PREFIXES = ["/v2/nvcf", "/v2/orgs/{org}/nvcf", "/v2/orgs/{org}/teams/default/nvcf"]


def deployment_path(function: dict[str, Any]) -> str:
    return f"/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}"


async def deployed(stack: Stack, name: str, key: str | None = None, **spec: Any) -> dict[str, Any]:
    """Create a function and deploy it at zero instances (ACTIVE at once); return its deployment."""
    function = await create(stack, echo_function(name), key=key)
    body = cpu_spec(0, 2, **spec)
    response = await stack.http.post(deployment_path(function), json=body, headers=stack.headers(key))
    assert response.status_code == 200, response.text
    deployment: dict[str, Any] = response.json()["deployment"]
    return deployment


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_list_shows_the_accounts_deployments_as_get_by_id_does(stack: Stack, prefix: str) -> None:
    account = f"lister-{prefix.count('/')}"
    key = await stack.create_key(account, ["register_function", "deploy_function", "list_functions"])
    first = await deployed(stack, "listed-a", key)
    second = await deployed(stack, "listed-b", key)
    other = await deployed(stack, "not-mine")  # the admin's own account
    path = prefix.format(org=account) + "/deployments"

    async def both_listed() -> list[dict[str, Any]] | None:
        response = await stack.http.get(path, headers=stack.headers(key))
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["deployments"]
        ids = {d["deploymentId"] for d in items}
        return items if {first["deploymentId"], second["deploymentId"]} <= ids else None

    listed = {d["deploymentId"]: d for d in await eventually(both_listed)}
    assert other["deploymentId"] not in listed
    for made in (first, second):
        by_id = await stack.http.get(
            f"/v2/nvcf/deployments/{made['deploymentId']}", headers=stack.headers(key)
        )
        expected = {k: v for k, v in by_id.json()["deployment"].items() if k not in ("instances", "scaling")}
        assert listed[made["deploymentId"]] == expected
        assert expected["deploymentSpecifications"][0]["maxInstances"] == 2


async def test_list_drops_an_undeployed_version(stack: Stack) -> None:
    account = "lister-undeploy"
    key = await stack.create_key(account, ["register_function", "deploy_function"])
    made = await deployed(stack, "gone-soon", key)
    function = {"id": made["functionId"], "versionId": made["functionVersionId"]}
    assert (await stack.http.delete(deployment_path(function), headers=stack.headers(key))).status_code == 200

    async def gone() -> bool:
        response = await stack.http.get("/v2/nvcf/deployments", headers=stack.headers(key))
        return made["deploymentId"] not in {d["deploymentId"] for d in response.json()["deployments"]}

    await eventually(gone)


async def test_list_needs_the_deploy_scope(stack: Stack) -> None:
    key = await stack.create_key("lister-no-scope", ["list_functions"])
    assert_problem(
        await stack.http.get("/v2/nvcf/deployments", headers=stack.headers(key)), 403, "deploy_function"
    )


def spec_path(deployment: dict[str, Any], spec_id: str | None = None) -> str:
    spec_id = spec_id or deployment["deploymentSpecifications"][0]["gpuSpecificationId"]
    return f"/v2/nvcf/deployments/{deployment['deploymentId']}/gpu-specifications/{spec_id}"


async def test_patch_changes_only_the_given_fields_and_answers_the_gpu_specification(stack: Stack) -> None:
    deployment = await deployed(stack, "patched", maxRequestConcurrency=4)
    spec_id = deployment["deploymentSpecifications"][0]["gpuSpecificationId"]
    response = await stack.http.patch(spec_path(deployment), json={"maxInstances": 5})
    assert response.status_code == 200, response.text
    spec = response.json()["gpuSpecification"]
    assert spec == {**deployment["deploymentSpecifications"][0], "maxInstances": 5}
    assert spec["gpuSpecificationId"] == spec_id

    autoscaling = {
        "scaleUpDetails": {"factor": 2.0, "threshold": 80},
        "scaleDownDetails": {"factor": 0.5, "threshold": 20},
    }
    response = await stack.http.patch(
        spec_path(deployment), json={"autoscalingConfiguration": autoscaling, "minInstances": 1}
    )
    assert response.status_code == 200, response.text
    spec = response.json()["gpuSpecification"]
    assert (spec["minInstances"], spec["maxInstances"], spec["maxRequestConcurrency"]) == (1, 5, 4)
    assert spec["autoscalingConfiguration"]["scaleUpDetails"]["threshold"] == 80

    response = await stack.http.patch(
        spec_path(deployment),
        json={"autoscalingConfigurationPolicy": "PLATFORM_CONFIGURATION", "minInstances": 0},
    )
    assert response.status_code == 200, response.text
    assert response.json()["gpuSpecification"].get("autoscalingConfiguration") in (None, {})

    by_id = await stack.http.get(f"/v2/nvcf/deployments/{deployment['deploymentId']}")
    (stored,) = by_id.json()["deployment"]["deploymentSpecifications"]
    assert (stored["minInstances"], stored["maxInstances"]) == (0, 5)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        pytest.param({"minInstances": 3}, ["minInstances", "maxInstances"], id="min-over-stored-max"),
        pytest.param({"maxInstances": 1, "minInstances": 2}, ["minInstances"], id="min-over-given-max"),
        pytest.param({}, ["at least one"], id="empty"),
        pytest.param({"gpu": "CPU"}, ["at least one"], id="only-fixed-fields"),
        pytest.param({"gpu": "H100", "maxInstances": 2}, ["gpu", "cannot be changed"], id="other-gpu"),
        pytest.param({"maxInstances": 10**18}, ["maxInstances", "1000"], id="huge"),
        pytest.param({"maxRequestConcurrency": 1025}, ["maxRequestConcurrency", "1024"], id="concurrency"),
        pytest.param(
            {"autoscalingConfigurationPolicy": "SOMETIMES"}, ["autoscalingConfigurationPolicy"], id="policy"
        ),
    ],
)
async def test_patch_refuses_bad_combinations(stack: Stack, body: dict[str, Any], words: list[str]) -> None:
    deployment = await deployed(stack, "patch-bad")
    assert_problem(await stack.http.patch(spec_path(deployment), json=body), 400, *words)
    by_id = await stack.http.get(f"/v2/nvcf/deployments/{deployment['deploymentId']}")
    assert by_id.json()["deployment"]["deploymentSpecifications"] == deployment["deploymentSpecifications"]


async def test_patch_of_an_unknown_specification_is_404(stack: Stack) -> None:
    deployment = await deployed(stack, "patch-unknown")
    assert_problem(
        await stack.http.patch(spec_path(deployment, "nope"), json={"maxInstances": 3}), 404, "nope"
    )
