"""The local container backend (GPUFN_LOCAL_RUNTIME=podman): a version's real image runs under podman.

Real components throughout: podman with runc, a `docker-registry` on loopback holding the echo image
(built from Debian's archive, tests/local/build-images.sh), the worker and API of a test stack.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from activities.local import stop_recorded_instances
from activities.local.containers import container_state_dir, podman_command, podman_env
from tests.conftest import Stack, cpu_spec, eventually, running_stack
from tests.lifecycle.helpers import (
    create,
    deploy,
    instance_records,
    pexec,
    undeploy,
    wait_running,
    wait_status,
)
from tests.local.images import container_function, containers_unavailable, local_registry

pytestmark = pytest.mark.skipif(
    containers_unavailable() is not None, reason=f"containers cannot run here: {containers_unavailable()}"
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with local_registry(tmp_path_factory.mktemp("registry")) as host:
        yield host


@pytest.fixture(scope="module")
async def stack(
    temporal_address: str, tmp_path_factory: pytest.TempPathFactory, registry: str
) -> AsyncIterator[Stack]:
    async with running_stack(
        temporal_address, tmp_path_factory.mktemp("gpufn-home"), local_runtime="podman"
    ) as running:
        yield running


def containers_of(stack: Stack) -> set[str]:
    """Return the names of the stack's containers, as podman lists them."""
    done = subprocess.run(
        [*podman_command(stack.settings.home), "ps", "--all", "--format", "{{.Names}}"],
        env=podman_env(stack.settings.home),
        capture_output=True,
        text=True,
        check=True,
    )
    return set(done.stdout.split())


def netns_names() -> set[str]:
    return {
        line.split()[0]
        for line in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True
        ).stdout.splitlines()
        if line
    }


async def test_image_deploys_answers_is_adopted_and_is_removed(stack: Stack, registry: str) -> None:
    function = await create(stack, container_function(registry, "container-echo"))
    await deploy(stack, function, cpu_spec())
    await wait_running(stack, function, 1, timeout=60)
    answer = await stack.http.post(pexec(function), json={"hello": "container"})
    assert answer.status_code == 200 and answer.json() == {"hello": "container"}

    [record] = instance_records(stack, function)
    assert record["runtime"] == "podman"
    # The digest the tag pointed at when the version was deployed, not the tag.
    assert record["image"].startswith(f"{registry}/echo@sha256:")
    assert f"gpufn-{record['instanceId']}" in containers_of(stack)
    assert record["slot"]["netns"] in netns_names()
    uid = next(
        int(line.split()[1])
        for line in Path(f"/proc/{record['pid']}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
    assert uid == record["slot"]["uid"] != 0

    # A new worker adopts the running container: same instance, no restart.
    stack.kill_worker()
    stack.restart_worker()
    await wait_running(stack, function, 1, timeout=60)
    [adopted] = instance_records(stack, function)
    assert (adopted["instanceId"], adopted["pid"]) == (record["instanceId"], record["pid"])
    answer = await stack.http.post(pexec(function), json={"after": "restart"})
    assert answer.status_code == 200 and answer.json() == {"after": "restart"}

    await undeploy(stack, function)

    async def removed() -> bool:
        return not instance_records(stack, function) and f"gpufn-{record['instanceId']}" not in containers_of(
            stack
        )

    await eventually(removed, timeout=30)
    assert record["slot"]["netns"] not in netns_names()


async def test_missing_tag_ends_in_error_naming_it(stack: Stack, registry: str) -> None:
    function = await create(stack, container_function(registry, "missing-tag", image="echo:no-such-tag"))
    await deploy(stack, function, cpu_spec())
    body = await wait_status(stack, function, "ERROR", timeout=60)
    errors = " ".join(entry["error"] for entry in body["healthInfo"])
    assert "echo:no-such-tag" in errors, body["healthInfo"]
    assert not instance_records(stack, function)


async def test_container_that_exits_ends_in_error_with_its_output(stack: Stack, registry: str) -> None:
    function = await create(
        stack,
        container_function(
            registry,
            "container-exits",
            containerArgs="python3 -c \"print('model weights missing'); exit(3)\"",
        ),
    )
    await deploy(stack, function, cpu_spec())
    body = await wait_status(stack, function, "ERROR", timeout=60)
    [info] = body["healthInfo"]
    assert "exited with code 3" in info["error"], info
    assert "model weights missing" in info["error"], info


async def test_stack_stop_frees_containers_and_the_next_worker_starts_them_again(
    stack: Stack, registry: str
) -> None:
    function = await create(stack, container_function(registry, "container-restart"))
    await deploy(stack, function, cpu_spec())
    await wait_running(stack, function, 1, timeout=60)
    [record] = instance_records(stack, function)

    # What `make up` does on Ctrl-C: the worker goes, then every instance is stopped.
    stack.kill_worker()
    stop_recorded_instances(stack.settings.home, grace_seconds=2)
    # The containers' storage was memory: nothing of it is left (images stay on disk).
    assert not container_state_dir(stack.settings.home).exists()
    assert not containers_of(stack)  # (podman makes an empty storage again to answer)
    assert record["slot"]["netns"] not in netns_names()

    stack.restart_worker()
    await wait_running(stack, function, 1, timeout=60)
    [again] = instance_records(stack, function)
    assert again["instanceId"] == record["instanceId"] and again["pid"] != record["pid"]
    # Its slot was free again: same address, so the gateways' routes to it still hold.
    assert again["host"] == record["host"]
    await wait_status(stack, function, "ACTIVE", timeout=60)
    answer = await stack.http.post(pexec(function), json={"after": "stack restart"})
    assert answer.status_code == 200 and answer.json() == {"after": "stack restart"}, answer.text
