"""Deployments pin their image: pods run the digest resolved at deploy time, and a missing image fails the
deployment at once with the registry's words in healthInfo, before any pod exists.

A real worker (in this process, so that its backends can be wrapped in `PinningBackend` the way worker.py
is to wire them), the API over HTTP, the local Kubernetes cluster and a real registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

import worker as worker_module
from activities.backend import Backend, BackendActivities
from activities.local import stop_recorded_instances
from activities.registry import PinningBackend, RegistryConfig, RegistryResolver
from gpufn.kube_inventory import cluster_group_name, read_json
from tests.cluster.harness import TestCluster
from tests.conftest import ADMIN_KEY, echo_function, eventually, free_port, make_settings, serve_api
from tests.kubernetes.conftest import KUBE_SETTINGS, echo_command, gpu_spec
from tests.registry.conftest import REPOSITORY, push
from tests.registry.servers import RegistryServer

pytestmark = pytest.mark.kubernetes


@dataclass
class PinnedStack:
    http: httpx.AsyncClient
    group: str
    kube: client.ApiClient


@pytest.fixture(scope="module")
async def pinned_stack(
    temporal_address: str, kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[PinnedStack]:
    home = tmp_path_factory.mktemp("pinned-home")
    settings = make_settings(
        home,
        temporal_address,
        f"gpufn-pin-{uuid.uuid4().hex[:8]}",
        free_port(),
        kubeconfigs=[Path(kube_cluster.kubeconfig_path)],
        instance_start_timeout=8.0,
    )
    temporal = await Client.connect(temporal_address, data_converter=pydantic_data_converter)
    resolver = RegistryResolver(RegistryConfig())

    def pinning(backends: dict[str, Backend]) -> BackendActivities:
        return BackendActivities({name: PinningBackend(b, resolver) for name, b in backends.items()})

    with pytest.MonkeyPatch.context() as patch:
        for name, value in KUBE_SETTINGS.items():
            patch.setenv(name, value)
        patch.setattr(worker_module, "BackendActivities", pinning)
        async with worker_module.build_worker(temporal, settings, settings.task_queue) as (worker, _):
            running = asyncio.create_task(worker.run())
            server, serving = await serve_api(settings)
            try:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{settings.api_port}",
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                    timeout=30,
                ) as http:
                    with kube_cluster.api_client() as kube:
                        yield PinnedStack(http, cluster_group_name(Path(kube_cluster.kubeconfig_path)), kube)
            finally:
                server.should_exit = True
                await serving
                await worker.shutdown()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
                await resolver.close()
                stop_recorded_instances(home, grace_seconds=2)


async def deploy(stack: PinnedStack, image: str, name: str) -> tuple[dict[str, Any], str]:
    created = await stack.http.post(
        "/v2/nvcf/functions", json=echo_function(name, containerImage=image, containerArgs=echo_command())
    )
    assert created.status_code == 200, created.text
    function: dict[str, Any] = created.json()["function"]
    path = f"/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}"
    deployed = await stack.http.post(path, json=gpu_spec(stack.group))
    assert deployed.status_code == 200, deployed.text
    return function, path


async def status(stack: PinnedStack, path: str, wanted: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        body: dict[str, Any] = (await stack.http.get(path)).json()["deployment"]
        return body if body["functionStatus"] == wanted else None

    result: dict[str, Any] = await eventually(reached, timeout=30)
    return result


def objects(stack: PinnedStack, function: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    selector = f"gpufn.io/version-id={function['versionId']}"
    apps, core = client.AppsV1Api(stack.kube), client.CoreV1Api(stack.kube)
    return {
        "deployments": read_json(apps.list_deployment_for_all_namespaces, label_selector=selector)["items"],
        "pods": read_json(core.list_pod_for_all_namespaces, label_selector=selector)["items"],
    }


async def test_pods_run_the_digest_resolved_at_deploy_time(
    pinned_stack: PinnedStack, open_registry: RegistryServer, image_layouts: dict[str, tuple[Path, str]]
) -> None:
    reference = push(open_registry, image_layouts["first"], "pinned")
    function, path = await deploy(pinned_stack, reference, "pinned-image")
    await status(pinned_stack, path, "ACTIVE")

    # Retagged after the deployment: the running version keeps the digest it was deployed with.
    push(open_registry, image_layouts["second"], "pinned")
    found = objects(pinned_stack, function)
    [deployment] = found["deployments"]
    images = {c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert images == {f"{open_registry.host}/{REPOSITORY}@{image_layouts['first'][1]}"}
    assert all(p["spec"]["containers"][0]["image"] in images for p in found["pods"])

    answer = await pinned_stack.http.post(f"/v2/nvcf/pexec/functions/{function['id']}", json={"pinned": True})
    assert answer.status_code == 200, answer.text
    assert (await pinned_stack.http.delete(path)).status_code == 200


async def test_missing_tag_fails_before_any_pod(
    pinned_stack: PinnedStack, open_registry: RegistryServer
) -> None:
    reference = f"{open_registry.host}/{REPOSITORY}:v9"
    function, path = await deploy(pinned_stack, reference, "missing-tag")

    body = await status(pinned_stack, path, "ERROR")

    [info] = body["healthInfo"]
    assert reference in info["error"] and "manifest unknown" in info["error"]
    assert body["instances"] == []
    assert objects(pinned_stack, function) == {"deployments": [], "pods": []}
