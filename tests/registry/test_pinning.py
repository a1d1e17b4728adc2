"""Deployments pin their image: pods run the digest resolved at deploy time, and a missing image fails the
deployment at once with the registry's words in healthInfo, before any pod exists.

The real stack (worker process, API over HTTP), the local Kubernetes cluster and a real registry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from gpufn.kube_inventory import cluster_group_name, read_json
from tests.cluster.harness import TestCluster
from tests.conftest import echo_function, eventually, running_stack
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
    """The real stack (worker process + API) with artifact resolution on, as `make up` runs it."""
    settings = {**KUBE_SETTINGS, "resolve_artifacts": True}
    async with running_stack(
        temporal_address,
        tmp_path_factory.mktemp("pinned-home"),
        kubeconfigs=[Path(kube_cluster.kubeconfig_path)],
        instance_start_timeout=8.0,
        **settings,
    ) as stack:
        with kube_cluster.api_client() as kube:
            yield PinnedStack(stack.http, cluster_group_name(Path(kube_cluster.kubeconfig_path)), kube)


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
