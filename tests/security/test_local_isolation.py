"""A hostile tenant on the local backend finds nothing and reaches nothing (issue 14, item 1).

Two accounts deploy on one stack: a victim (the echo example, with a secret) and an attacker whose
function (tests/security/hostile.py) searches the state directory, its stdout, its environment and every
process's environment, and connects to Temporal, the API and the victim. The platform runs as root here
(as in CI), so instances run isolated: their own uid and network namespace. The hostile test runs on
both local runtimes: processes, and containers under podman (the images of tests/local/build-images.sh,
served by a real local registry).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpufn.isolation_check import unavailable_reason
from tests.conftest import Stack, cpu_spec, echo_function, eventually, running_stack
from tests.lifecycle.helpers import create, deploy, instance_records, wait_running
from tests.local.images import container_function, containers_unavailable, local_registry

VICTIM_SECRET = "victim-secret-value-5d1f0c9a"

pytestmark = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"instance isolation needs root: {unavailable_reason()}"
)

FunctionBody = Callable[..., dict[str, Any]]
"""Builds a create-function body: (name, role "victim" or "attacker", overrides) -> body."""


@pytest.fixture(scope="module")
async def stack(temporal_address: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(temporal_address, tmp_path_factory.mktemp("gpufn-home")) as running:
        yield running


def _process_body(name: str, role: str, **overrides: Any) -> dict[str, Any]:
    if role == "attacker":
        overrides.setdefault("containerArgs", "python tests/security/hostile.py")
    return echo_function(name, **overrides)


@pytest.fixture(scope="module", params=["process", "podman"])
async def runtime_stack(
    request: pytest.FixtureRequest, temporal_address: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Stack, FunctionBody]]:
    """A stack per local runtime, with how to write a function body for it."""
    runtime: str = request.param
    with ExitStack() as resources:
        body: FunctionBody = _process_body
        if runtime == "podman":
            if containers_unavailable() is not None:
                pytest.skip(f"containers cannot run here: {containers_unavailable()}")
            registry = resources.enter_context(local_registry(tmp_path_factory.mktemp("registry")))

            def body(name: str, role: str, **overrides: Any) -> dict[str, Any]:
                image = "hostile:1" if role == "attacker" else "echo:1"
                return container_function(registry, name, image=image, **overrides)

        home = tmp_path_factory.mktemp(f"gpufn-home-{runtime}")
        async with running_stack(temporal_address, home, local_runtime=runtime) as running:
            yield running, body


async def _client_for(stack: Stack, account: str) -> httpx.AsyncClient:
    key = await stack.create_key(account, ["register_function", "deploy_function", "invoke_function"])
    return httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers(key), timeout=30)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


async def _deploy_as(stack: Stack, client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v2/nvcf/functions", json=body)
    assert response.status_code == 200, response.text
    function: dict[str, Any] = response.json()["function"]
    path = f"/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}"
    deployed = await client.post(path, json=cpu_spec())
    assert deployed.status_code == 200, deployed.text

    async def running() -> bool:
        answer = await client.get(path)
        assert answer.status_code == 200, answer.text
        instances = answer.json()["deployment"]["instances"]
        return len(instances) == 1 and instances[0]["status"] == "RUNNING"

    await eventually(running, timeout=30)
    return function


async def test_hostile_function_finds_nothing_and_reaches_nothing(
    runtime_stack: tuple[Stack, FunctionBody],
) -> None:
    stack, body = runtime_stack
    victim_client = await _client_for(stack, "victim-account")
    attacker_client = await _client_for(stack, "attacker-account")
    async with victim_client, attacker_client:
        victim = await _deploy_as(
            stack,
            victim_client,
            body("victim", "victim", secrets=[{"name": "TOKEN", "value": VICTIM_SECRET}]),
        )
        [victim_record] = instance_records(stack, victim)
        temporal_port = stack.settings.temporal_target.rsplit(":", 1)[1]
        api_port = str(stack.settings.api_port)
        targets = [
            f"127.0.0.1:{temporal_port}",
            f"127.0.0.1:{api_port}",
            f"{victim_record['host']}:{victim_record['port']}",
        ]
        attacker = await _deploy_as(
            stack,
            attacker_client,
            body(
                "attacker",
                "attacker",
                inferenceUrl="/probe",
                containerEnvironment=[
                    {"key": "STATE_DIR", "value": str(stack.settings.home.resolve())},
                    {"key": "TARGETS", "value": ",".join(targets)},
                ],
            ),
        )
        [attacker_record] = instance_records(stack, attacker)
        # The host end of the attacker's veth pair is the one host address its namespace can route to.
        gateway = attacker_record["slot"]["hostAddress"]
        extra = [f"{gateway}:{temporal_port}", f"{gateway}:{api_port}", f"{gateway}:22"]

        probe = await attacker_client.post(f"/v2/nvcf/pexec/functions/{attacker['id']}", json={})
        assert probe.status_code == 200, probe.text
        findings = probe.json()
        text = probe.text

        # Nothing of the platform's or the victim's secrets, wherever it looked.
        for secret in (
            VICTIM_SECRET,
            stack.settings.resolved_admin_key(),
            stack.settings.resolved_secret_key(),
        ):
            assert secret not in text
        assert findings["stateDir"] == {}
        if stack.settings.local_runtime == "podman":
            # A container's stdout is its own pipe to conmon: reading it yields at most its own output.
            own = {"hostile function starting"}
            assert set((findings["stdoutTarget"] or "").splitlines()) <= own, findings["stdoutTarget"]
        else:
            # A process's stdout is the platform's log file, which its uid cannot open.
            assert findings["stdoutTarget"] is None
        assert findings["otherEnvironments"] == {}
        assert not any(name.startswith("GPUFN_") for name in findings["environment"])
        assert findings["reached"] == {target: False for target in targets}
        # Its own identity: not root, not the victim's.
        assert findings["uid"] != 0
        assert _uid_of(victim_record["pid"]) not in (0, findings["uid"])

    # Connections to the host side of its own network are dropped too (services bound to every address).
    reach = await _reach_from(attacker_record, extra)
    assert reach == {target: False for target in extra}

    # The victim's secret reached its process, and no file of the platform holds it in plain text.
    assert VICTIM_SECRET in Path(f"/proc/{victim_record['pid']}/environ").read_text()
    for path in stack.settings.home.rglob("*"):
        if path.is_file():
            assert VICTIM_SECRET.encode() not in path.read_bytes(), path
    assert "TOKEN" not in victim_record["env"]


async def _reach_from(record: dict[str, Any], targets: list[str]) -> dict[str, bool]:
    """Try TCP connections from inside an instance's namespace, as its uid."""
    import asyncio

    from activities.isolation import Slot, launch_prefix

    script = (
        "import socket,sys,json\n"
        "r={}\n"
        "for t in sys.argv[1:]:\n"
        "    h,p=t.rsplit(':',1); s=socket.socket(); s.settimeout(2)\n"
        "    r[t]=s.connect_ex((h,int(p)))==0; s.close()\n"
        "print(json.dumps(r))\n"
    )
    # The instance's own PATH leads to a Python its uid can run; a container's record has none (its image
    # has one), and the system's Python runs in its namespace instead.
    path = record["env"].get("PATH", "/usr/local/bin:/usr/bin:/bin")
    process = await asyncio.create_subprocess_exec(
        *launch_prefix(Slot(**record["slot"])),
        "python3",
        "-c",
        script,
        *targets,
        stdout=asyncio.subprocess.PIPE,
        env={**record["env"], "PATH": path},
    )
    out, _ = await process.communicate()
    result: dict[str, bool] = json.loads(out)
    return result


async def test_a_normal_function_deploys_is_invoked_and_heals_when_isolated(stack: Stack) -> None:
    function = await create(stack, echo_function("isolated-echo", secrets=[{"name": "TOKEN", "value": "t"}]))
    await deploy(stack, function, cpu_spec())
    await wait_running(stack, function, 1)
    invoke = f"/v2/nvcf/pexec/functions/{function['id']}"
    answer = await stack.http.post(invoke, json={"hello": "isolated"})
    assert answer.status_code == 200 and answer.json() == {"hello": "isolated"}

    [record] = instance_records(stack, function)
    assert record["host"] == record["slot"]["instanceAddress"]
    os.kill(record["pid"], signal.SIGKILL)

    async def replaced() -> bool:
        ids = [r["instanceId"] for r in instance_records(stack, function)]
        return ids not in ([], [record["instanceId"]])

    await eventually(replaced, timeout=60)
    await wait_running(stack, function, 1, timeout=60)
    [healed] = instance_records(stack, function)
    assert healed["slot"]["uid"] != 0
    answer = await stack.http.post(invoke, json={"hello": "healed"})
    assert answer.status_code == 200 and answer.json() == {"hello": "healed"}
