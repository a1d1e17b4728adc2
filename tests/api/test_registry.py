"""Function registry over real HTTP against the real dev server: NVCF's bodies, defaults and round trips."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gpufn.sealing import SecretBox, secret_context
from tests.api.helpers import FUNCTIONS, assert_problem, create, metadata_path, version_path, workflow_text
from tests.conftest import Stack, cpu_spec, echo_function, eventually
from workflows import function_version_workflow_id
from workflows.function_version import FunctionVersionWorkflow

SECRET_VALUE = "s3cr3t-" + uuid.uuid4().hex
JSON_SECRET_VALUE = "j50n-" + uuid.uuid4().hex


async def listed(stack: Stack, path: str = FUNCTIONS, key: str | None = None) -> list[dict[str, Any]]:
    response = await stack.http.get(path, headers=stack.headers(key))
    assert response.status_code == 200, response.text
    functions: list[dict[str, Any]] = response.json()["functions"]
    return functions


async def listed_version_ids(stack: Stack, path: str = FUNCTIONS, key: str | None = None) -> set[str]:
    return {f["versionId"] for f in await listed(stack, path, key)}


async def function_ids(stack: Stack, path: str = FUNCTIONS + "/ids", key: str | None = None) -> list[str]:
    response = await stack.http.get(path, headers=stack.headers(key))
    assert response.status_code == 200, response.text
    ids: list[str] = response.json()["functionIds"]
    return ids


# --- Create: response body and NVCF defaults ------------------------------------------------------------


async def test_create_answers_the_function_wrapper_with_nvcf_fields(stack: Stack) -> None:
    response = await stack.http.post(FUNCTIONS, json=echo_function("wrapper", tags=["team:a", "x=1"]))
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"function"}
    function = response.json()["function"]
    uuid.UUID(function["id"])
    uuid.UUID(function["versionId"])
    assert function["ncaId"] == stack.settings.admin_account
    assert function["name"] == "wrapper"
    assert function["status"] == "INACTIVE"
    assert function["inferenceUrl"] == "/echo"
    assert function["inferencePort"] == 8000
    assert function["containerImage"] == "example.com/echo:1.0"
    assert function["tags"] == ["team:a", "x=1"]
    assert function["health"] == {
        "protocol": "HTTP",
        "uri": "/health",
        "port": 8000,
        "timeout": "PT5S",
        "expectedStatusCode": 200,
    }
    assert function["healthUri"] == "/health"
    assert function["createdAt"].endswith("Z")


async def test_create_applies_nvcf_defaults(stack: Stack) -> None:
    function = await create(
        stack, {"name": "defaults", "inferenceUrl": "/infer", "containerImage": "example.com/model:1"}
    )
    assert function["description"] == "defaults"
    assert function["apiBodyFormat"] == "CUSTOM"
    assert function["functionType"] == "DEFAULT"
    assert function["health"] == {
        "protocol": "HTTP",
        "uri": "/v2/health/ready",
        "port": 8000,
        "timeout": "PT10S",
        "expectedStatusCode": 200,
    }
    assert function["healthUri"] == "/v2/health/ready"
    assert function["tags"] == []
    assert "inferencePort" not in function


async def test_default_health_uses_health_uri_and_inference_port(stack: Stack) -> None:
    function = await create(
        stack,
        {
            "name": "legacy-health",
            "inferenceUrl": "/infer",
            "inferencePort": 9001,
            "healthUri": "/ready",
            "containerImage": "example.com/model:1",
        },
    )
    assert function["health"]["uri"] == "/ready"
    assert function["health"]["port"] == 9001
    assert function["healthUri"] == "/ready"


async def test_grpc_inference_url_defaults_health_protocol_to_grpc(stack: Stack) -> None:
    function = await create(
        stack, {"name": "grpc-fn", "inferenceUrl": "/grpc", "containerImage": "example.com/grpc:1"}
    )
    assert function["health"]["protocol"] == "gRPC"


async def test_create_echoes_helm_and_model_fields(stack: Stack) -> None:
    body = {
        "name": "helm-fn",
        "inferenceUrl": "/infer",
        "helmChart": "https://helm.ngc.nvidia.com/org/team/charts/name-1.0.0.tgz",
        "helmChartServiceName": "entry",
        "models": [{"name": "m1", "version": "1", "uri": "ngc://org/m1:1"}],
        "resources": [{"name": "r1", "version": "2", "uri": "ngc://org/r1:2"}],
        "apiBodyFormat": "PREDICT_V2",
        "functionType": "STREAMING",
        "description": "a helm chart",
    }
    function = await create(stack, body)
    for name in ("helmChart", "helmChartServiceName", "models", "resources", "apiBodyFormat", "functionType"):
        assert function[name] == body[name], name
    assert function["description"] == "a helm chart"
    assert "containerImage" not in function


async def test_unknown_request_fields_are_ignored(stack: Stack) -> None:
    function = await create(stack, echo_function("unknown-fields", somethingNew={"x": 1}, nvcfFuture=True))
    assert "somethingNew" not in function and "nvcfFuture" not in function


# --- Round trip -------------------------------------------------------------------------------------


async def test_round_trip_create_get_list_ids_versions_tags_delete(stack: Stack) -> None:
    function = await create(stack, echo_function("round-trip", tags=["v1"]))
    response = await stack.http.get(version_path(function))
    assert response.status_code == 200, response.text
    assert response.json() == {"function": function}

    await eventually(lambda: _contains(stack, FUNCTIONS, function["versionId"]))
    assert function["id"] in await function_ids(stack)
    versions = await listed(stack, f"{FUNCTIONS}/{function['id']}/versions")
    assert [v["versionId"] for v in versions] == [function["versionId"]]

    response = await stack.http.put(metadata_path(function), json={"tags": ["v2", "stage:prod"]})
    assert response.status_code == 200, response.text
    assert response.json()["function"]["tags"] == ["v2", "stage:prod"]
    response = await stack.http.get(version_path(function))
    assert response.json()["function"]["tags"] == ["v2", "stage:prod"]

    response = await stack.http.delete(version_path(function))
    assert response.status_code == 204, response.text
    assert response.content == b""
    response = await stack.http.get(version_path(function))
    assert_problem(response, 404, function["id"], "Not found for account")

    async def gone() -> bool:
        return function["versionId"] not in await listed_version_ids(stack) and function["id"] not in (
            await function_ids(stack)
        )

    await eventually(gone)
    response = await stack.http.get(f"{FUNCTIONS}/{function['id']}/versions")
    assert_problem(response, 404, f"Function '{function['id']}': Not found for account")


async def _contains(stack: Stack, path: str, version_id: str) -> bool:
    return version_id in await listed_version_ids(stack, path)


async def test_new_version_joins_its_function(stack: Stack) -> None:
    first = await create(stack, echo_function("versioned"))
    response = await stack.http.post(f"{FUNCTIONS}/{first['id']}/versions", json=echo_function("versioned"))
    assert response.status_code == 200, response.text
    second = response.json()["function"]
    assert second["id"] == first["id"]
    assert second["versionId"] != first["versionId"]

    async def both() -> bool:
        versions = await listed_version_ids(stack, f"{FUNCTIONS}/{first['id']}/versions")
        return versions == {first["versionId"], second["versionId"]}

    await eventually(both)
    assert (await function_ids(stack)).count(first["id"]) == 1


async def test_list_versions_sees_a_version_just_created(stack: Stack) -> None:
    function = await create(stack, echo_function("just-created"))
    versions = await listed(stack, f"{FUNCTIONS}/{function['id']}/versions")
    assert [v["versionId"] for v in versions] == [function["versionId"]]


async def test_version_with_another_function_type_is_400(stack: Stack) -> None:
    first = await create(stack, echo_function("typed"))
    response = await stack.http.post(
        f"{FUNCTIONS}/{first['id']}/versions", json=echo_function("typed", functionType="STREAMING")
    )
    assert_problem(response, 400, "functionType")


async def test_list_entries_are_full_function_objects(stack: Stack) -> None:
    function = await create(stack, echo_function("list-entry"))

    async def entry() -> dict[str, Any] | None:
        return next((f for f in await listed(stack) if f["versionId"] == function["versionId"]), None)

    assert await eventually(entry) == function


async def test_visibility_filters_the_listing(stack: Stack) -> None:
    function = await create(stack, echo_function("visible"))
    await eventually(lambda: _contains(stack, FUNCTIONS + "?visibility=private", function["versionId"]))
    assert await listed(stack, FUNCTIONS + "?visibility=public") == []
    assert await function_ids(stack, FUNCTIONS + "/ids?visibility=authorized") == []
    assert function["id"] in await function_ids(
        stack, FUNCTIONS + "/ids?visibility=authorized&visibility=private"
    )
    response = await stack.http.get(FUNCTIONS + "?visibility=everyone")
    assert_problem(response, 400, "visibility")


# --- Tags -----------------------------------------------------------------------------------------


async def test_tags_put_replaces_the_tags(stack: Stack) -> None:
    function = await create(stack, echo_function("tagged", tags=["a", "b"]))
    response = await stack.http.put(metadata_path(function), json={"tags": ["c"]})
    assert response.status_code == 200, response.text
    assert response.json()["function"]["tags"] == ["c"]
    response = await stack.http.put(metadata_path(function), json={"tags": []})
    assert response.json()["function"]["tags"] == []

    async def listed_tags() -> bool:
        entry = next(f for f in await listed(stack) if f["versionId"] == function["versionId"])
        return entry["tags"] == []

    await eventually(listed_tags)


async def test_tags_put_keeps_everything_else(stack: Stack) -> None:
    function = await create(stack, echo_function("tags-only"))
    response = await stack.http.put(metadata_path(function), json={"tags": ["new"]})
    assert response.json()["function"] == {**function, "tags": ["new"]}


async def test_tags_put_rejects_invalid_tags(stack: Stack) -> None:
    function = await create(stack, echo_function("bad-tags"))
    response = await stack.http.put(metadata_path(function), json={"tags": ["no spaces"]})
    assert_problem(response, 400, "tags")
    response = await stack.http.put(metadata_path(function), json={})
    assert_problem(response, 400, "tags")


# --- Unknown functions and versions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "template", "body"),
    [
        ("GET", "/v2/nvcf/functions/{fid}/versions/{vid}", None),
        ("GET", "/v2/nvcf/functions/{fid}/versions", None),
        ("POST", "/v2/nvcf/functions/{fid}/versions", echo_function("nobody")),
        ("PUT", "/v2/nvcf/metadata/functions/{fid}/versions/{vid}", {"tags": ["x"]}),
        ("DELETE", "/v2/nvcf/functions/{fid}/versions/{vid}", None),
    ],
)
async def test_unknown_function_is_404_with_nvcf_detail(
    stack: Stack, method: str, template: str, body: dict[str, Any] | None
) -> None:
    function_id, version_id = str(uuid.uuid4()), str(uuid.uuid4())
    path = template.format(fid=function_id, vid=version_id)
    response = await stack.http.request(method, path, json=body)
    detail = assert_problem(response, 404)["detail"]
    assert detail.startswith(f"Function '{function_id}'")
    assert detail.endswith(f"Not found for account '{stack.settings.admin_account}'")


async def test_unknown_version_of_a_known_function_is_404(stack: Stack) -> None:
    function = await create(stack, echo_function("known"))
    other = str(uuid.uuid4())
    response = await stack.http.get(f"{FUNCTIONS}/{function['id']}/versions/{other}")
    assert_problem(response, 404, function["id"], other, "Not found for account")


async def test_deleting_twice_is_404(stack: Stack) -> None:
    function = await create(stack, echo_function("twice"))
    assert (await stack.http.delete(version_path(function))).status_code == 204
    assert_problem(await stack.http.delete(version_path(function)), 404, "Not found for account")


async def test_deleted_version_cannot_be_tagged(stack: Stack) -> None:
    function = await create(stack, echo_function("deleted-tags"))
    assert (await stack.http.delete(version_path(function))).status_code == 204
    response = await stack.http.put(metadata_path(function), json={"tags": ["x"]})
    assert_problem(response, 404, "Not found for account")


# --- Org-scoped prefixes ---------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/v2/orgs/{org}/nvcf", "/v2/orgs/{org}/teams/default/nvcf"])
async def test_org_prefixed_paths_serve_the_callers_org(stack: Stack, prefix: str) -> None:
    account = "org-" + uuid.uuid4().hex[:8]
    key = await stack.create_key(account, ["register_function", "list_functions", "update_function"])
    base = prefix.format(org=account)
    response = await stack.http.post(
        base + "/functions", json=echo_function("org-fn"), headers=stack.headers(key)
    )
    assert response.status_code == 200, response.text
    function = response.json()["function"]
    assert function["ncaId"] == account

    response = await stack.http.get(version_path(function, base), headers=stack.headers(key))
    assert response.status_code == 200, response.text
    assert response.json()["function"] == function
    versions = await listed(stack, f"{base}/functions/{function['id']}/versions", key)
    assert [v["versionId"] for v in versions] == [function["versionId"]]
    await eventually(lambda: _contains_for(stack, base + "/functions", function["versionId"], key))
    assert await function_ids(stack, base + "/functions/ids", key) == [function["id"]]
    response = await stack.http.put(
        metadata_path(function, base), json={"tags": ["org"]}, headers=stack.headers(key)
    )
    assert response.status_code == 200, response.text
    assert response.json()["function"]["tags"] == ["org"]


async def _contains_for(stack: Stack, path: str, version_id: str, key: str) -> bool:
    return version_id in await listed_version_ids(stack, path, key)


@pytest.mark.parametrize("prefix", ["/v2/orgs/{org}/nvcf", "/v2/orgs/{org}/teams/default/nvcf"])
async def test_org_prefixed_paths_refuse_another_org(stack: Stack, prefix: str) -> None:
    mine = "mine-" + uuid.uuid4().hex[:8]
    key = await stack.create_key(mine, ["register_function", "list_functions"])
    base = prefix.format(org="someone-else")
    response = await stack.http.get(base + "/functions", headers=stack.headers(key))
    assert_problem(response, 403, "someone-else")
    response = await stack.http.post(base + "/functions", json=echo_function("x"), headers=stack.headers(key))
    assert_problem(response, 403, "someone-else")


# --- Secrets ---------------------------------------------------------------------------------------


@dataclass
class SecretFunction:
    """A deployed function created with secrets, and every API answer seen about it."""

    function: dict[str, Any]
    answers: list[str] = field(default_factory=list)
    api_log: str = ""


@pytest.fixture(scope="module")
async def secret_function(stack: Stack) -> AsyncIterator[SecretFunction]:
    """Create, read, list and deploy a function with secrets (the worker opens them to start it)."""
    handler = _Collect()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        body = echo_function(
            "with-secrets",
            secrets=[
                {"name": "API_TOKEN", "value": SECRET_VALUE},
                {"name": "config.json", "value": {"password": JSON_SECRET_VALUE}},
            ],
        )
        response = await stack.http.post(FUNCTIONS, json=body)
        assert response.status_code == 200, response.text
        result = SecretFunction(function=response.json()["function"], answers=[response.text])
        function = result.function
        path = f"/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}"
        response = await stack.http.post(path, json=cpu_spec(1, 1))
        assert response.status_code == 200, response.text
        result.answers.append(response.text)

        async def active() -> bool:
            answer = await stack.http.get(path)
            result.answers.append(answer.text)
            return bool(answer.json()["deployment"]["functionStatus"] == "ACTIVE")

        await eventually(active, timeout=30)
        for url in (version_path(function), f"{FUNCTIONS}/{function['id']}/versions", FUNCTIONS):
            result.answers.append((await stack.http.get(url)).text)
        result.api_log = "\n".join(handler.lines)
        yield result
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def test_secret_names_are_returned_without_values(secret_function: SecretFunction) -> None:
    assert secret_function.function["secrets"] == ["API_TOKEN", "config.json"]


async def test_secret_values_appear_in_no_api_response(secret_function: SecretFunction) -> None:
    for answer in secret_function.answers:
        assert SECRET_VALUE not in answer
        assert JSON_SECRET_VALUE not in answer


async def test_include_secrets_false_omits_secret_names(
    stack: Stack, secret_function: SecretFunction
) -> None:
    response = await stack.http.get(version_path(secret_function.function) + "?includeSecrets=false")
    assert response.status_code == 200, response.text
    assert "secrets" not in response.json()["function"]
    response = await stack.http.get(version_path(secret_function.function) + "?includeSecrets=true")
    assert response.json()["function"]["secrets"] == ["API_TOKEN", "config.json"]


async def test_secret_values_appear_nowhere_in_the_workflow(
    stack: Stack, secret_function: SecretFunction
) -> None:
    function = secret_function.function
    text = await workflow_text(
        stack.client, function_version_workflow_id(function["id"], function["versionId"])
    )
    assert "API_TOKEN" in text
    assert SECRET_VALUE not in text
    assert JSON_SECRET_VALUE not in text


async def test_secret_values_appear_nowhere_in_the_worker_log(
    stack: Stack, secret_function: SecretFunction
) -> None:
    log = (stack.settings.home / "worker.log").read_text(errors="replace")
    assert log
    assert SECRET_VALUE not in log
    assert JSON_SECRET_VALUE not in log


async def test_secret_values_appear_nowhere_in_the_api_log(secret_function: SecretFunction) -> None:
    assert SECRET_VALUE not in secret_function.api_log
    assert JSON_SECRET_VALUE not in secret_function.api_log


async def test_put_version_updates_tags_and_rate_limit_keeping_what_is_left_out(stack: Stack) -> None:
    created = await stack.http.post(
        "/v2/nvcf/functions",
        json={"name": "put-version", "inferenceUrl": "/echo", "containerImage": "e.com/e:1", "tags": ["a"]},
    )
    function = created.json()["function"]
    path = f"/v2/nvcf/functions/{function['id']}/versions/{function['versionId']}"
    limited = await stack.http.put(path, json={"rateLimit": {"rateLimit": "10-S"}})
    assert limited.status_code == 200, limited.text
    assert limited.json()["function"]["tags"] == ["a"]
    assert limited.json()["function"]["rateLimit"]["rateLimit"] == "10-S"
    tagged = await stack.http.put(path, json={"tags": ["b", "c"]})
    assert tagged.json()["function"]["tags"] == ["b", "c"]
    assert tagged.json()["function"]["rateLimit"]["rateLimit"] == "10-S"
    empty = await stack.http.put(path, json={})
    assert empty.status_code == 400
    assert empty.headers["content-type"] == "application/problem+json"
    bad = await stack.http.put(path, json={"rateLimit": {"rateLimit": "ten per second"}})
    assert bad.status_code == 400


def secrets_path(function: dict[str, Any]) -> str:
    return f"/v2/nvcf/secrets/functions/{function['id']}/versions/{function['versionId']}"


async def sealed_secrets(stack: Stack, function: dict[str, Any]) -> dict[str, str]:
    """Open the version's stored secrets with the stack's key (what a worker does to start instances)."""
    handle = stack.client.get_workflow_handle(
        function_version_workflow_id(function["id"], function["versionId"])
    )
    view = await handle.query(FunctionVersionWorkflow.describe)
    box = SecretBox(stack.settings.resolved_secret_key())
    return {
        name: box.open(sealed, secret_context(function["versionId"], name))
        for name, sealed in view.state.spec.encryptedSecrets.items()
    }


async def test_secrets_are_merged_sealed_and_never_echoed(stack: Stack) -> None:
    function = await create(stack, echo_function("secrets-later"))
    first = await stack.http.put(
        secrets_path(function), json={"secrets": [{"name": "TOKEN", "value": "v1-s3cr3t"}]}
    )
    assert first.status_code == 204, first.text
    assert first.text == ""
    merged = await stack.http.put(
        secrets_path(function),
        json={"secrets": [{"name": "TOKEN", "value": "v2-s3cr3t"}, {"name": "conf", "value": {"a": 1}}]},
    )
    assert merged.status_code == 204, merged.text
    described = await stack.http.get(version_path(function))
    assert described.json()["function"]["secrets"] == ["TOKEN", "conf"]
    assert "s3cr3t" not in described.text
    assert await sealed_secrets(stack, function) == {"TOKEN": "v2-s3cr3t", "conf": '{"a": 1}'}
    workflow = function_version_workflow_id(function["id"], function["versionId"])
    assert "s3cr3t" not in await workflow_text(stack.client, workflow)


@pytest.mark.parametrize(
    ("body", "field_name"),
    [
        ({"secrets": []}, "secrets"),
        ({"secrets": [{"name": "-bad", "value": "x"}]}, "name"),
        ({"secrets": [{"name": "EMPTY", "value": ""}]}, "value"),
        ({"secrets": [{"name": "A", "value": "hidden-1"}, {"name": "A", "value": "hidden-2"}]}, "duplicate"),
    ],
)
async def test_invalid_secrets_are_refused_without_echoing_values(
    stack: Stack, body: dict[str, Any], field_name: str
) -> None:
    function = await create(stack, echo_function("secrets-invalid"))
    response = await stack.http.put(secrets_path(function), json=body)
    problem = assert_problem(response, 400)
    assert field_name in response.text
    assert "hidden-" not in response.text
    assert problem["status"] == 400
    assert (await stack.http.get(version_path(function))).json()["function"].get("secrets") in (None, [])


async def test_secrets_are_added_to_a_version_without_any_only_while_inactive(stack: Stack) -> None:
    bare = await create(stack, echo_function("secrets-deployed"))
    with_one = await create(stack, echo_function("secrets-kept", secrets=[{"name": "KEY", "value": "old"}]))
    for function in (bare, with_one):
        path = f"/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}"
        assert (await stack.http.post(path, json=cpu_spec(0, 1))).status_code == 200
    refused = await stack.http.put(secrets_path(bare), json={"secrets": [{"name": "KEY", "value": "new"}]})
    assert_problem(refused, 400, "INACTIVE")
    updated = await stack.http.put(
        secrets_path(with_one), json={"secrets": [{"name": "KEY", "value": "new"}]}
    )
    assert updated.status_code == 204, updated.text
    assert await sealed_secrets(stack, with_one) == {"KEY": "new"}
    unknown = await stack.http.put(
        f"/v2/nvcf/secrets/functions/{uuid.uuid4()}/versions/{uuid.uuid4()}",
        json={"secrets": [{"name": "KEY", "value": "x"}]},
    )
    assert_problem(unknown, 404)
