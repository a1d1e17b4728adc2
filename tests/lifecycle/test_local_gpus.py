"""The local backend's GPUs: instance types per GPU model, one GPU pinned per instance, capacity explained.

This machine has no NVIDIA GPU, so the GPU list comes from GPUFN_LOCAL_GPUS (the override that replaces
NVML discovery); everything else (processes, pinning, capacity) is real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Stack, echo_function, eventually, running_stack
from tests.lifecycle.helpers import create, deployment, deployment_path, instance_records, wait_running


@pytest.fixture(scope="module")
async def gpu_stack(temporal_address: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    home = tmp_path_factory.mktemp("gpufn-gpus")
    async with running_stack(temporal_address, home, local_gpus="H100,H100,L40S") as stack:
        yield stack


def gpu_spec(gpu: str, count: int) -> dict[str, object]:
    return {
        "deploymentSpecifications": [
            {"gpu": gpu, "instanceType": f"LOCAL.GPU.{gpu}_1x", "minInstances": count, "maxInstances": count}
        ]
    }


async def test_cluster_group_lists_local_gpus_and_cpu(gpu_stack: Stack) -> None:
    groups = (await gpu_stack.http.get("/v2/nvcf/clusterGroups")).json()["clusterGroups"]
    [local] = [g for g in groups if g["name"] == "local"]
    gpus = {g["name"]: g for g in local["gpus"]}
    assert set(gpus) == {"H100", "L40S", "CPU"}
    assert [t["name"] for t in gpus["H100"]["instanceTypes"]] == ["LOCAL.GPU.H100_1x"]
    assert [t["name"] for t in gpus["CPU"]["instanceTypes"]] == ["LOCAL.CPU"]


async def test_each_instance_is_pinned_to_its_own_gpu(gpu_stack: Stack) -> None:
    function = await create(gpu_stack, echo_function("pinned"))
    await gpu_stack.http.post(deployment_path(function), json=gpu_spec("H100", 2))
    await wait_running(gpu_stack, function, 2)
    devices = set()
    for record in instance_records(gpu_stack, function):
        environ = Path(f"/proc/{record['pid']}/environ").read_bytes().split(b"\0")
        [visible] = [e for e in environ if e.startswith(b"CUDA_VISIBLE_DEVICES=")]
        devices.add(visible.split(b"=", 1)[1])
    assert devices == {b"0", b"1"}
    await gpu_stack.http.delete(deployment_path(function))


async def test_more_instances_than_gpus_wait_and_say_why(gpu_stack: Stack) -> None:
    function = await create(gpu_stack, echo_function("no-room"))
    await gpu_stack.http.post(deployment_path(function), json=gpu_spec("L40S", 2))

    async def explained() -> dict[str, object] | None:
        body = await deployment(gpu_stack, function)
        running = [i for i in body["instances"] if i["status"] == "RUNNING"]
        info = body.get("healthInfo") or []
        if len(running) == 1 and info and "Insufficient capacity" in info[0]["error"]:
            return body
        return None

    body = await eventually(explained, timeout=30)
    assert body["functionStatus"] == "DEPLOYING"
    await gpu_stack.http.delete(deployment_path(function))
