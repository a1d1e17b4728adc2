"""Accounts, API keys and scopes over real HTTP: 401/403/404, isolation, revocation, introspection, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from api.auth import hash_key, key_registry_workflow_id
from api.principal import ALL_SCOPES
from tests.api.helpers import FUNCTIONS, assert_problem, create, metadata_path, version_path, workflow_text
from tests.conftest import ADMIN_KEY, Stack, echo_function, eventually

NVCF_SCOPES = sorted(ALL_SCOPES - {"manage_keys"})


@dataclass
class Account:
    """An account with a key carrying every NVCF scope, and one function of its own."""

    name: str
    key: str
    function: dict[str, Any]


async def new_account(stack: Stack, prefix: str) -> Account:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    key = await stack.create_key(name, NVCF_SCOPES)
    function = await create(stack, echo_function(f"{prefix}-fn"), key=key)
    return Account(name, key, function)


@pytest.fixture(scope="module")
async def alice(stack: Stack) -> Account:
    return await new_account(stack, "alice")


@pytest.fixture(scope="module")
async def bob(stack: Stack) -> Account:
    return await new_account(stack, "bob")


async def create_key_record(
    stack: Stack, account: str, scopes: list[str], key: str | None = None
) -> dict[str, Any]:
    response = await stack.http.post(
        "/v2/gpufn/keys", json={"account": account, "scopes": scopes}, headers=stack.headers(key)
    )
    assert response.status_code == 201, response.text
    record: dict[str, Any] = response.json()
    return record


# --- Authentication -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", [FUNCTIONS, FUNCTIONS + "/ids", "/v2/gpufn/keys", "/v2/orgs/gpufn-admin/nvcf/functions"]
)
async def test_missing_key_is_401(stack: Stack, path: str) -> None:
    response = await stack.http.get(path, headers={"Authorization": ""})
    assert_problem(response, 401, "Bearer")


@pytest.mark.parametrize(
    "header",
    [
        "Bearer nvapi-" + "x" * 64,
        "Bearer",
        "Bearer nvapi-",
        f"Basic {ADMIN_KEY}",
        ADMIN_KEY,
        f"Bearer {ADMIN_KEY}x",
    ],
    ids=["unknown-key", "no-key", "prefix-only", "basic-scheme", "no-scheme", "altered-key"],
)
async def test_bad_key_is_401(stack: Stack, header: str) -> None:
    response = await stack.http.get(FUNCTIONS, headers={"Authorization": header})
    assert_problem(response, 401)


async def test_bearer_scheme_is_case_insensitive(stack: Stack, alice: Account) -> None:
    response = await stack.http.get(FUNCTIONS, headers={"Authorization": f"bearer {alice.key}"})
    assert response.status_code == 200, response.text


async def test_created_key_looks_like_nvapi_and_is_shown_once(stack: Stack) -> None:
    record = await create_key_record(stack, "shown-once", ["list_functions"])
    assert record["key"].startswith("nvapi-") and len(record["key"]) > 40
    assert record["account"] == "shown-once"
    assert record["scopes"] == ["list_functions"]
    uuid.UUID(record["keyId"])
    response = await stack.http.get("/v2/gpufn/keys")
    assert response.status_code == 200, response.text
    [listed] = [k for k in response.json()["keys"] if k["keyId"] == record["keyId"]]
    assert listed == {k: v for k, v in record.items() if k != "key"}
    assert record["key"] not in response.text
    assert hash_key(record["key"]) not in response.text


async def test_keys_are_stored_hashed(stack: Stack) -> None:
    record = await create_key_record(stack, "hashed", ["list_functions"])
    text = await workflow_text(stack.client, key_registry_workflow_id(stack.settings.task_queue))
    assert hash_key(record["key"]) in text
    assert record["key"] not in text
    assert record["key"] not in (stack.settings.home / "worker.log").read_text(errors="replace")


async def test_revoked_key_is_401_within_two_seconds(stack: Stack) -> None:
    record = await create_key_record(stack, "revoked", ["list_functions"])
    headers = stack.headers(record["key"])
    assert (await stack.http.get(FUNCTIONS, headers=headers)).status_code == 200
    response = await stack.http.delete(f"/v2/gpufn/keys/{record['keyId']}")
    assert response.status_code == 204, response.text

    async def refused() -> bool:
        return (await stack.http.get(FUNCTIONS, headers=headers)).status_code == 401

    await eventually(refused, timeout=2)
    assert_problem(await stack.http.get(FUNCTIONS, headers=headers), 401)
    listing = (await stack.http.get("/v2/gpufn/keys")).json()["keys"]
    assert record["keyId"] not in {k["keyId"] for k in listing}


async def test_revoking_an_unknown_key_is_404(stack: Stack) -> None:
    response = await stack.http.delete(f"/v2/gpufn/keys/{uuid.uuid4()}")
    assert_problem(response, 404, "not found")


async def test_revoking_twice_is_404(stack: Stack) -> None:
    record = await create_key_record(stack, "twice", ["list_functions"])
    assert (await stack.http.delete(f"/v2/gpufn/keys/{record['keyId']}")).status_code == 204
    assert_problem(await stack.http.delete(f"/v2/gpufn/keys/{record['keyId']}"), 404)


# --- Key management rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"account": "a", "scopes": ["list_functions", "fly"]}, ["fly"]),
        ({"account": "a", "scopes": []}, ["field=scopes"]),
        ({"account": "a"}, ["field=scopes"]),
        ({"account": "not an account", "scopes": ["list_functions"]}, ["field=account"]),
        ({"account": "a", "scopes": "list_functions"}, ["field=scopes"]),
        ({"account": "a", "scopes": ["list_functions"], "description": "d" * 257}, ["field=description"]),
    ],
    ids=[
        "unknown-scope",
        "no-scopes",
        "scopes-missing",
        "bad-account",
        "scopes-not-a-list",
        "long-description",
    ],
)
async def test_invalid_key_request_is_400(stack: Stack, body: dict[str, Any], words: list[str]) -> None:
    assert_problem(await stack.http.post("/v2/gpufn/keys", json=body), 400, *words)


async def test_key_manager_creates_keys_for_its_own_account(stack: Stack) -> None:
    manager = await stack.create_key("managed", ["manage_keys", "list_functions"])
    record = await create_key_record(stack, "managed", ["list_functions"], key=manager)
    assert record["account"] == "managed"
    response = await stack.http.post(
        "/v2/gpufn/keys", json={"scopes": ["list_functions"]}, headers=stack.headers(manager)
    )
    assert response.status_code == 201 and response.json()["account"] == "managed", response.text
    listing = (await stack.http.get("/v2/gpufn/keys", headers=stack.headers(manager))).json()["keys"]
    assert {k["account"] for k in listing} == {"managed"}


async def test_key_manager_cannot_create_keys_for_another_account(stack: Stack) -> None:
    manager = await stack.create_key("managed-2", ["manage_keys"])
    response = await stack.http.post(
        "/v2/gpufn/keys",
        json={"account": "other", "scopes": ["list_functions"]},
        headers=stack.headers(manager),
    )
    assert_problem(response, 403, "another account")


async def test_key_manager_cannot_grant_manage_keys(stack: Stack) -> None:
    manager = await stack.create_key("managed-3", ["manage_keys"])
    response = await stack.http.post(
        "/v2/gpufn/keys", json={"scopes": ["manage_keys"]}, headers=stack.headers(manager)
    )
    assert_problem(response, 403, "manage_keys")


async def test_key_manager_cannot_revoke_another_accounts_key(stack: Stack) -> None:
    manager = await stack.create_key("managed-4", ["manage_keys"])
    victim = await create_key_record(stack, "victim", ["list_functions"])
    response = await stack.http.delete(f"/v2/gpufn/keys/{victim['keyId']}", headers=stack.headers(manager))
    assert_problem(response, 404)
    assert (await stack.http.get(FUNCTIONS, headers=stack.headers(victim["key"]))).status_code == 200


# --- Account isolation ----------------------------------------------------------------------------


async def test_key_lists_only_its_own_accounts_functions(stack: Stack, alice: Account, bob: Account) -> None:
    async def alice_listed() -> list[dict[str, Any]]:
        response = await stack.http.get(FUNCTIONS, headers=stack.headers(alice.key))
        functions: list[dict[str, Any]] = response.json()["functions"]
        return functions

    functions = await eventually(alice_listed)
    assert [f["id"] for f in functions] == [alice.function["id"]]
    assert {f["ncaId"] for f in functions} == {alice.name}
    response = await stack.http.get(FUNCTIONS + "/ids", headers=stack.headers(bob.key))
    assert response.json()["functionIds"] == [bob.function["id"]]


async def test_admin_key_does_not_list_other_accounts_functions(stack: Stack, alice: Account) -> None:
    response = await stack.http.get(FUNCTIONS + "/ids")
    assert alice.function["id"] not in response.json()["functionIds"]


@pytest.mark.parametrize(
    ("method", "kind", "body"),
    [
        ("GET", "version", None),
        ("GET", "versions", None),
        ("POST", "versions", echo_function("intruder")),
        ("PUT", "metadata", {"tags": ["mine"]}),
        ("DELETE", "version", None),
    ],
)
async def test_another_accounts_function_is_404(
    stack: Stack, alice: Account, bob: Account, method: str, kind: str, body: dict[str, Any] | None
) -> None:
    function = alice.function
    path = {
        "version": version_path(function),
        "versions": f"{FUNCTIONS}/{function['id']}/versions",
        "metadata": metadata_path(function),
    }[kind]
    response = await stack.http.request(method, path, json=body, headers=stack.headers(bob.key))
    assert_problem(response, 404, f"Function '{function['id']}'", f"Not found for account '{bob.name}'")
    response = await stack.http.get(version_path(function), headers=stack.headers(alice.key))
    assert response.status_code == 200, response.text
    assert response.json()["function"]["tags"] == []


async def test_another_org_prefix_is_403(stack: Stack, alice: Account, bob: Account) -> None:
    response = await stack.http.get(
        version_path(alice.function, f"/v2/orgs/{alice.name}/nvcf"), headers=stack.headers(bob.key)
    )
    assert_problem(response, 403, alice.name)


# --- Scopes ---------------------------------------------------------------------------------------

ENDPOINTS: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("register_function", "POST", "/v2/nvcf/functions", echo_function("scoped")),
    ("register_function", "POST", "/v2/nvcf/functions/{fid}/versions", echo_function("scoped")),
    ("list_functions", "GET", "/v2/nvcf/functions", None),
    ("list_functions", "GET", "/v2/nvcf/functions/ids", None),
    ("list_functions", "GET", "/v2/nvcf/functions/{fid}/versions", None),
    ("list_functions", "GET", "/v2/nvcf/functions/{fid}/versions/{vid}", None),
    ("update_function", "PUT", "/v2/nvcf/metadata/functions/{fid}/versions/{vid}", {"tags": ["x"]}),
    ("delete_function", "DELETE", "/v2/nvcf/functions/{fid}/versions/{vid}", None),
    ("manage_keys", "GET", "/v2/gpufn/keys", None),
    ("manage_keys", "POST", "/v2/gpufn/keys", {"scopes": ["list_functions"]}),
    ("manage_keys", "DELETE", "/v2/gpufn/keys/{fid}", None),
]


@pytest.mark.parametrize(
    ("scope", "method", "template", "body"),
    [pytest.param(*e, id=f"{e[1]} {e[2]}") for e in ENDPOINTS],
)
async def test_key_without_the_endpoints_scope_is_403(
    stack: Stack, alice: Account, scope: str, method: str, template: str, body: dict[str, Any] | None
) -> None:
    lacking = {scope, "list_functions_details"} if scope == "list_functions" else {scope}
    key = await stack.create_key(alice.name, sorted(ALL_SCOPES - lacking - {"manage_keys"}))
    path = template.format(fid=alice.function["id"], vid=alice.function["versionId"])
    response = await stack.http.request(method, path, json=body, headers=stack.headers(key))
    assert_problem(response, 403, scope)
    prefixed = path.replace("/v2/nvcf/", f"/v2/orgs/{alice.name}/nvcf/")
    if prefixed != path:
        response = await stack.http.request(method, prefixed, json=body, headers=stack.headers(key))
        assert_problem(response, 403, scope)


async def test_list_functions_details_scope_also_lists(stack: Stack, alice: Account) -> None:
    key = await stack.create_key(alice.name, ["list_functions_details"])
    for path in (
        FUNCTIONS,
        FUNCTIONS + "/ids",
        f"{FUNCTIONS}/{alice.function['id']}/versions",
        version_path(alice.function),
    ):
        response = await stack.http.get(path, headers=stack.headers(key))
        assert response.status_code == 200, f"{path}: {response.text}"


async def test_a_single_scope_is_enough_for_its_endpoint(stack: Stack, alice: Account) -> None:
    key = await stack.create_key(alice.name, ["register_function"])
    response = await stack.http.post(
        FUNCTIONS, json=echo_function("single-scope"), headers=stack.headers(key)
    )
    assert response.status_code == 200, response.text
    assert_problem(await stack.http.get(FUNCTIONS, headers=stack.headers(key)), 403, "list_functions")


# --- NGC key introspection ------------------------------------------------------------------------


async def test_get_caller_info_answers_the_keys_account_and_type(stack: Stack, alice: Account) -> None:
    response = await stack.http.post(
        "/v3/keys/get-caller-info", data={"credentials": alice.key}, headers={"Authorization": ""}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["orgName"] == alice.name
    assert body["type"] == "PERSONAL_KEY"
    assert alice.key not in response.text


async def test_get_caller_info_reads_multipart_forms(stack: Stack, alice: Account) -> None:
    response = await stack.http.post(
        "/v3/keys/get-caller-info", files={"credentials": (None, alice.key)}, headers={"Authorization": ""}
    )
    assert response.status_code == 200, response.text
    assert response.json()["orgName"] == alice.name


async def test_get_caller_info_of_the_admin_key(stack: Stack) -> None:
    response = await stack.http.post("/v3/keys/get-caller-info", data={"credentials": ADMIN_KEY})
    assert response.status_code == 200, response.text
    assert response.json()["orgName"] == stack.settings.admin_account


async def test_get_caller_info_of_an_unknown_key_is_401(stack: Stack) -> None:
    response = await stack.http.post(
        "/v3/keys/get-caller-info", data={"credentials": "nvapi-unknown"}, headers={"Authorization": ""}
    )
    assert_problem(response, 401)


async def test_get_caller_info_without_credentials_is_400(stack: Stack) -> None:
    response = await stack.http.post("/v3/keys/get-caller-info", data={}, headers={"Authorization": ""})
    assert_problem(response, 400, "credentials")


# --- CLI ------------------------------------------------------------------------------------------


async def cli(stack: Stack, tmp_path: Path, *args: str, key: str = ADMIN_KEY) -> tuple[int, str, str]:
    """Run `gpufn ...` in a subprocess (without blocking the API, which serves on this event loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFN_")}
    env.update({"GPUFN_API_URL": stack.api_url, "GPUFN_API_KEY": key, "GPUFN_HOME": str(tmp_path)})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from gpufn.cli import main; sys.exit(main(sys.argv[1:]))",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_creates_lists_and_revokes_keys(stack: Stack, tmp_path: Path) -> None:
    code, out, err = await cli(
        stack,
        tmp_path,
        "keys",
        "create",
        "--account",
        "cli-account",
        "--scopes",
        "list_functions,register_function",
    )
    assert code == 0, err
    created = json.loads(out)
    assert created["key"].startswith("nvapi-")
    assert created["account"] == "cli-account"
    assert created["scopes"] == ["list_functions", "register_function"]
    headers = stack.headers(created["key"])
    assert (await stack.http.get(FUNCTIONS, headers=headers)).status_code == 200

    code, out, err = await cli(stack, tmp_path, "keys", "list")
    assert code == 0, err
    assert created["keyId"] in {k["keyId"] for k in json.loads(out)["keys"]}
    assert created["key"] not in out

    code, out, err = await cli(stack, tmp_path, "keys", "revoke", created["keyId"])
    assert code == 0, err
    assert created["keyId"] in out

    async def refused() -> bool:
        return (await stack.http.get(FUNCTIONS, headers=headers)).status_code == 401

    await eventually(refused, timeout=2)


async def test_cli_reports_api_errors(stack: Stack, tmp_path: Path) -> None:
    code, _, err = await cli(stack, tmp_path, "keys", "revoke", str(uuid.uuid4()))
    assert code != 0
    assert "404" in err
    code, _, err = await cli(stack, tmp_path, "keys", "list", key="nvapi-wrong")
    assert code != 0
    assert "401" in err


# --- Keys cannot grow; the admin alone crosses accounts (issue 14 item 2) ----------------------------


async def test_key_can_grant_only_scopes_it_holds(stack: Stack) -> None:
    account = f"grower-{uuid.uuid4().hex[:8]}"
    manager = await stack.create_key(account, ["manage_keys", "list_functions"])
    response = await stack.http.post(
        "/v2/gpufn/keys",
        json={"scopes": ["list_functions", "invoke_function", "deploy_function"]},
        headers=stack.headers(manager),
    )
    assert_problem(response, 403, "holds", "deploy_function", "invoke_function")
    listing = (await stack.http.get("/v2/gpufn/keys", headers=stack.headers(manager))).json()["keys"]
    assert [k["scopes"] for k in listing] == [["list_functions", "manage_keys"]]
    # What it holds, it may pass on, in its own account.
    record = await create_key_record(stack, account, ["list_functions"], key=manager)
    assert (record["account"], record["scopes"]) == (account, ["list_functions"])


async def test_key_with_only_manage_keys_cannot_mint_an_invoking_key(stack: Stack) -> None:
    manager = await stack.create_key(f"only-keys-{uuid.uuid4().hex[:8]}", ["manage_keys"])
    for scopes in (["invoke_function"], NVCF_SCOPES):
        response = await stack.http.post(
            "/v2/gpufn/keys", json={"scopes": scopes}, headers=stack.headers(manager)
        )
        assert_problem(response, 403, "invoke_function")


async def test_admin_key_reaches_an_org_alike_on_management_and_invocation_paths(
    stack: Stack, alice: Account
) -> None:
    function = alice.function
    deploy = (
        f"/v2/orgs/{alice.name}/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}"
    )
    spec = {"gpu": "CPU", "instanceType": "LOCAL.CPU", "minInstances": 0, "maxInstances": 1}
    response = await stack.http.post(deploy, json={"deploymentSpecifications": [spec]})
    assert response.status_code == 200, response.text
    assert response.json()["deployment"]["ncaId"] == alice.name
    try:
        management = await stack.http.get(version_path(function, f"/v2/orgs/{alice.name}/nvcf"))
        invocation = await stack.http.get(f"/v2/orgs/{alice.name}/nvcf/queues/functions/{function['id']}")
        assert (management.status_code, invocation.status_code) == (200, 200), (
            management.text,
            invocation.text,
        )
        assert management.json()["function"]["id"] == function["id"]
        assert invocation.json()["functionId"] == function["id"]
        # The admin acts in the org's account, so the org's listing is the org's functions.
        listing = await stack.http.get(f"/v2/orgs/{alice.name}/nvcf/functions/ids")
        assert function["id"] in listing.json()["functionIds"]
    finally:
        assert (await stack.http.delete(deploy)).status_code == 200


async def test_other_keys_are_refused_alike_on_management_and_invocation_paths(
    stack: Stack, alice: Account, bob: Account
) -> None:
    function = alice.function
    management = await stack.http.get(
        version_path(function, f"/v2/orgs/{alice.name}/nvcf"), headers=stack.headers(bob.key)
    )
    invocation = await stack.http.get(
        f"/v2/orgs/{alice.name}/nvcf/queues/functions/{function['id']}", headers=stack.headers(bob.key)
    )
    assert (management.status_code, invocation.status_code) == (403, 403)


async def test_admin_org_must_be_an_account_name(stack: Stack) -> None:
    response = await stack.http.get("/v2/orgs/a%00b/nvcf/functions")
    assert_problem(response, 400, "org")
