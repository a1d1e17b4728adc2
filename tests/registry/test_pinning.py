"""Deployments pin their image: pods run the digest resolved at deploy time, and a missing image fails the
deployment at once with the registry's words in healthInfo, before any pod exists.

The real stack (worker process, API over HTTP) and the test cluster's real node, which pulls from the
cluster's own registry: the pinned image is the echo example's, retagged to another built image afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from gpufn.kube_inventory import cluster_group_name, read_json
from tests.cluster.harness import TestCluster
from tests.cluster.images import ensure_images, push
from tests.conftest import echo_function, eventually, running_stack
from tests.kubernetes.conftest import ECHO_IMAGE, gpu_spec, stack_settings
from tests.registry.conftest import REPOSITORY
from tests.registry.servers import skopeo_digest

OTHER_IMAGE = "gpufn-base:bookworm"
"""Another image of the built layout: what the tag points at after the deployment."""

pytestmark = pytest.mark.kubernetes


@dataclass
class PinnedStack:
    http: httpx.AsyncClient
    group: str
    kube: client.ApiClient


@pytest.fixture(scope="module")
async def pinned_stack(
    temporal_address: str, real_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[PinnedStack]:
    """The real stack (worker process + API) with artifact resolution on, as `make up` runs it."""
    settings = {**stack_settings(real_cluster), "resolve_artifacts": True}
    async with running_stack(
        temporal_address,
        tmp_path_factory.mktemp("pinned-home"),
        kubeconfigs=[Path(real_cluster.kubeconfig_path)],
        instance_start_timeout=15.0,
        # An account (so a function namespace) of its own on the session's shared cluster: the account
        # namespace's NetworkPolicy is made once, with the first stack's gateway settings, and
        # tests/kubernetes/test_isolation.py checks its own.
        admin_account="registry-pinning",
        **settings,
    ) as stack:
        with real_cluster.api_client() as kube:
            yield PinnedStack(stack.http, cluster_group_name(Path(real_cluster.kubeconfig_path)), kube)


def push_as(cluster: TestCluster, built_tag: str, tag: str) -> tuple[str, str]:
    """Push a built image to the cluster's registry as `team/echo:<tag>`; return (reference, its digest)."""
    reference = f"{cluster.registry_host}/{REPOSITORY}:{tag}"
    push(ensure_images(), built_tag, reference)
    return reference, skopeo_digest(reference)


async def deploy(stack: PinnedStack, image: str, name: str) -> tuple[dict[str, Any], str]:
    created = await stack.http.post(
        # No containerArgs: the image's own command (the echo server) runs.
        "/v2/nvcf/functions",
        json=echo_function(name, containerImage=image, containerArgs=None),
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
    pinned_stack: PinnedStack, real_cluster: TestCluster
) -> None:
    tag = f"pinned-{uuid.uuid4().hex[:6]}"
    reference, echo_digest = push_as(real_cluster, ECHO_IMAGE, tag)
    function, path = await deploy(pinned_stack, reference, "pinned-image")
    await status(pinned_stack, path, "ACTIVE")

    # Retagged after the deployment: the running version keeps the digest it was deployed with.
    _, other_digest = push_as(real_cluster, OTHER_IMAGE, tag)
    assert other_digest != echo_digest
    found = objects(pinned_stack, function)
    [deployment] = found["deployments"]
    images = {c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert images == {f"{real_cluster.registry_host}/{REPOSITORY}@{echo_digest}"}
    assert all(p["spec"]["containers"][0]["image"] in images for p in found["pods"])

    answer = await pinned_stack.http.post(f"/v2/nvcf/pexec/functions/{function['id']}", json={"pinned": True})
    assert answer.status_code == 200, answer.text
    assert (await pinned_stack.http.delete(path)).status_code == 200


async def test_missing_tag_fails_before_any_pod(pinned_stack: PinnedStack, real_cluster: TestCluster) -> None:
    push_as(real_cluster, ECHO_IMAGE, "v1")
    reference = f"{real_cluster.registry_host}/{REPOSITORY}:v9"
    function, path = await deploy(pinned_stack, reference, "missing-tag")

    body = await status(pinned_stack, path, "ERROR")

    [info] = body["healthInfo"]
    assert reference in info["error"] and "manifest unknown" in info["error"]
    assert body["instances"] == []
    assert objects(pinned_stack, function) == {"deployments": [], "pods": []}
