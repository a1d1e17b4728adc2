"""Container functions on Kubernetes, end to end: a real API server, scheduler and controller-manager, a real
node (containerd + kubelet) running the echo image from the cluster's registry, a real worker process, the API
and its gateway over HTTP."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest
from kubernetes import client

from activities.kube.names import deployment_name, namespace_name
from gpufn.kube_inventory import read_json
from tests.cluster.harness import TestCluster
from tests.conftest import Stack, echo_function, eventually
from tests.kubernetes.conftest import ECHO_IMAGE, START_TIMEOUT, gpu_spec
from tests.lifecycle.helpers import (
    create,
    deploy,
    deployment,
    deployment_path,
    pexec,
    undeploy,
    wait_running,
    wait_status,
)

pytestmark = pytest.mark.kubernetes

NAMESPACE_PREFIX = "gpufn-"


def namespace_of(function: dict[str, Any]) -> str:
    return namespace_name(NAMESPACE_PREFIX, function["ncaId"])


def objects_of(
    api: client.ApiClient, function: dict[str, Any], live_pods_only: bool = False
) -> dict[str, list[str]]:
    """The names of the version's objects in the cluster, by kind."""
    selector = f"gpufn.io/version-id={function['versionId']}"
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)

    def names(fn: Any) -> list[str]:
        items = read_json(fn, label_selector=selector)["items"]
        if live_pods_only:
            items = [i for i in items if not i["metadata"].get("deletionTimestamp")]
        return sorted(i["metadata"]["name"] for i in items)

    return {
        "deployments": names(apps.list_deployment_for_all_namespaces),
        "replicasets": names(apps.list_replica_set_for_all_namespaces),
        "pods": names(core.list_pod_for_all_namespaces),
        "secrets": names(core.list_secret_for_all_namespaces),
    }


NOTHING: dict[str, list[str]] = {"deployments": [], "replicasets": [], "pods": [], "secrets": []}


async def wait_gone(api: client.ApiClient, function: dict[str, Any], timeout: float = 30) -> None:
    async def gone() -> bool:
        return objects_of(api, function) == NOTHING

    await eventually(gone, timeout=timeout)


async def test_cluster_group_comes_from_the_nodes(
    echo_fields: dict[str, Any], kube_stack: Stack, group: str
) -> None:
    response = await kube_stack.http.get("/v2/nvcf/clusterGroups")
    assert response.status_code == 200, response.text
    groups = {g["name"]: g for g in response.json()["clusterGroups"]}
    assert set(groups) == {"local", group}
    [gpu] = groups[group]["gpus"]
    assert gpu["name"] == "H100" and gpu["capacity"] == 8
    assert [t["name"] for t in gpu["instanceTypes"]] == [
        f"{group.upper()}.GPU.H100_{n}x" for n in (1, 2, 4, 8)
    ]
    assert groups[group]["clusters"][0]["k8sVersion"] == "v1.20.2"

    function = await create(kube_stack, echo_function("k8s-placement", **echo_fields))
    unknown_gpu = {
        "gpu": "A100",
        "instanceType": f"{group.upper()}.GPU.A100_1x",
        "minInstances": 1,
        "maxInstances": 1,
    }
    response = await kube_stack.http.post(
        deployment_path(function), json={"deploymentSpecifications": [unknown_gpu]}
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "Invalid GPU 'A100'" in response.json()["detail"]
    response = await kube_stack.http.post(
        deployment_path(function),
        json={
            "deploymentSpecifications": [
                {**unknown_gpu, "gpu": "H100", "instanceType": f"{group.upper()}.GPU.H100_3x"}
            ]
        },
    )
    assert response.status_code == 400
    assert "Invalid InstanceType" in response.json()["detail"]


async def test_deploy_then_invoke_a_pod_through_the_gateway(
    echo_fields: dict[str, Any],
    kube_stack: Stack,
    kube_api: client.ApiClient,
    kube_cluster: TestCluster,
    group: str,
) -> None:
    function = await create(
        kube_stack,
        echo_function(
            "k8s-echo",
            **echo_fields,
            containerEnvironment=[{"key": "ECHO_MODE", "value": "k8s"}],
            secrets=[{"name": "MODEL_TOKEN", "value": "s3cret-value"}],
        ),
    )
    response = await kube_stack.http.post(deployment_path(function), json=gpu_spec(group))
    assert response.status_code == 200, response.text
    assert response.json()["deployment"]["functionStatus"] == "DEPLOYING"
    body = await wait_status(kube_stack, function, "ACTIVE", timeout=60)
    [instance] = body["instances"]
    assert instance["status"] == "RUNNING"

    core, apps = client.CoreV1Api(kube_api), client.AppsV1Api(kube_api)
    namespace = namespace_of(function)
    pod = read_json(core.read_namespaced_pod, instance["instanceId"], namespace)
    assert instance["address"] == f"http://{pod['status']['podIP']}:8000"
    assert pod["spec"]["nodeName"] == "gpu-node-1"
    # The worker pinned the image to the digest the registry serves for its tag.
    assert pod["spec"]["containers"][0]["image"].startswith(f"{kube_cluster.registry_host}/echo@sha256:")
    name = deployment_name(function["versionId"], 0)
    created = read_json(apps.read_namespaced_deployment, name, namespace)
    labels = created["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "gpufn"
    assert labels["gpufn.io/function-id"] == function["id"]
    assert labels["gpufn.io/version-id"] == function["versionId"]
    assert labels["gpufn.io/account"] == function["ncaId"]
    [container] = created["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"

    # The secret is a Kubernetes Secret owned by the Deployment, referenced (never inlined) by the pod.
    secret = read_json(core.read_namespaced_secret, name, namespace)
    assert base64.b64decode(secret["data"]["MODEL_TOKEN"]).decode() == "s3cret-value"
    [owner] = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("Deployment", created["metadata"]["uid"])
    [token_env] = [e for e in container["env"] if e["name"] == "MODEL_TOKEN"]
    assert token_env == {
        "name": "MODEL_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": name, "key": "MODEL_TOKEN"}},
    }
    environ = kube_cluster.pod_environ(namespace, pod["metadata"]["name"])
    assert "MODEL_TOKEN=s3cret-value" in environ and "ECHO_MODE=k8s" in environ

    async def invoked() -> httpx.Response | None:
        answer = await kube_stack.http.post(pexec(function), json={"hello": "kubernetes"})
        return answer if answer.status_code == 200 else None

    answer = await eventually(invoked, timeout=20, interval=0.2)
    assert answer.json() == {"hello": "kubernetes"}
    await undeploy(kube_stack, function)


async def test_undeploy_leaves_no_object_behind(
    echo_fields: dict[str, Any], kube_stack: Stack, kube_api: client.ApiClient, group: str
) -> None:
    function = await create(
        kube_stack,
        echo_function("k8s-undeploy", **echo_fields, secrets=[{"name": "KEY", "value": "v"}]),
    )
    await deploy(kube_stack, function, gpu_spec(group, min_instances=2, max_instances=2))
    await wait_running(kube_stack, function, 2, timeout=60)
    assert len(objects_of(kube_api, function)["pods"]) == 2
    response = await kube_stack.http.delete(deployment_path(function))
    assert response.status_code == 200, response.text
    assert response.json()["function"]["status"] == "INACTIVE"
    # The DELETE answers at once; the teardown that follows deletes every object, and waits for the pods
    # (real ones: their processes get SIGTERM and the grace period) to be gone.
    await wait_gone(kube_api, function, timeout=60)
    namespace = read_json(client.CoreV1Api(kube_api).read_namespace, namespace_of(function))
    assert namespace["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gpufn"


async def test_updated_secrets_reach_the_pods_started_afterwards(
    echo_fields: dict[str, Any],
    kube_stack: Stack,
    kube_api: client.ApiClient,
    kube_cluster: TestCluster,
    group: str,
) -> None:
    function = await create(
        kube_stack,
        echo_function("k8s-secret-update", **echo_fields, secrets=[{"name": "TOKEN", "value": "v1"}]),
    )
    await deploy(kube_stack, function, gpu_spec(group, min_instances=1, max_instances=2))
    [first] = (await wait_running(kube_stack, function, 1, timeout=60))["instances"]
    path = f"/v2/nvcf/secrets/functions/{function['id']}/versions/{function['versionId']}"
    assert (
        await kube_stack.http.put(path, json={"secrets": [{"name": "TOKEN", "value": "v2"}]})
    ).status_code == 204
    scaled = await kube_stack.http.put(
        deployment_path(function), json=gpu_spec(group, min_instances=2, max_instances=2)
    )
    assert scaled.status_code == 200, scaled.text
    body = await wait_running(kube_stack, function, 2, timeout=60)
    [second] = [i for i in body["instances"] if i["instanceId"] != first["instanceId"]]

    namespace = namespace_of(function)

    def environ(instance: dict[str, Any]) -> list[str]:
        return kube_cluster.pod_environ(namespace, instance["instanceId"])

    # The running pod keeps the value it started with; the new one gets the updated value.
    assert "TOKEN=v1" in environ(first)
    assert "TOKEN=v2" in environ(second)
    await undeploy(kube_stack, function)


async def test_not_enough_gpus_ends_in_error_with_the_scheduler_reason(
    echo_fields: dict[str, Any], kube_stack: Stack, kube_api: client.ApiClient, group: str
) -> None:
    big = await create(kube_stack, echo_function("k8s-all-gpus", **echo_fields))
    await deploy(kube_stack, big, gpu_spec(group, gpus=4, min_instances=2, max_instances=2))
    try:
        await wait_status(kube_stack, big, "ACTIVE", timeout=60)
        small = await create(kube_stack, echo_function("k8s-no-gpu-left", **echo_fields))
        await deploy(kube_stack, small, gpu_spec(group))
        reason = "Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."

        async def explained() -> dict[str, Any] | None:
            # While it waits for GPUs, the instance and the deployment say why.
            body = await deployment(kube_stack, small)
            starting = [
                i for i in body["instances"] if i["status"] == "STARTING" and i.get("error") == reason
            ]
            return body if starting and body["functionStatus"] == "DEPLOYING" else None

        body = await eventually(explained, timeout=10, interval=0.05)
        assert [h["error"] for h in body["healthInfo"]] == [reason]
        body = await wait_status(kube_stack, small, "ERROR", timeout=30)
        [info] = body["healthInfo"]
        assert "Insufficient nvidia.com/gpu" in info["error"], info
        assert "could not be scheduled" in info["error"]
        assert (info["gpu"], info["instanceType"]) == ("H100", f"{group.upper()}.GPU.H100_1x")
        await wait_gone(kube_api, small)
    finally:
        await undeploy(kube_stack, big)
    # Its real pods hold all the GPUs until they are gone (SIGTERM, exit, the kubelet's clean-up).
    await wait_gone(kube_api, big, timeout=60)


async def test_object_the_api_server_refuses_ends_in_error_at_once(
    echo_fields: dict[str, Any], kube_stack: Stack, kube_api: client.ApiClient, group: str
) -> None:
    function = await create(
        kube_stack,
        echo_function(
            "k8s-refused",
            **echo_fields,
            containerEnvironment=[{"key": "NOT VALID", "value": "x"}],
        ),
    )
    await deploy(kube_stack, function, gpu_spec(group))
    body = await wait_status(kube_stack, function, "ERROR", timeout=20)
    [info] = body["healthInfo"]
    # The server-side dry run at prepare refuses it, with the API server's own words.
    assert "cannot create a Deployment: 422" in info["error"], info
    assert "NOT VALID" in info["error"]
    assert objects_of(kube_api, function) == NOTHING


async def test_image_pull_failure_ends_in_error(
    echo_fields: dict[str, Any],
    kube_stack: Stack,
    kube_api: client.ApiClient,
    kube_cluster: TestCluster,
    group: str,
) -> None:
    # The registry has the image's manifest (the worker resolves it to a digest at deploy) but lost its
    # layers: the kubelet's pull really fails.
    broken = kube_cluster.image_without_layers(ECHO_IMAGE, "lost-layers")
    function = await create(
        kube_stack, echo_function("k8s-bad-image", **{**echo_fields, "containerImage": broken})
    )
    await deploy(kube_stack, function, gpu_spec(group))
    try:
        body = await wait_status(kube_stack, function, "ERROR", timeout=60)
    except AssertionError as err:
        raise AssertionError(f"{err}; the deployment: {await deployment(kube_stack, function)}") from err
    [info] = body["healthInfo"]
    assert "could not pull its image" in info["error"], info
    assert "ErrImagePull" in info["error"] or "ImagePullBackOff" in info["error"]
    assert f"{kube_cluster.registry_host}/lost-layers@sha256:" in info["error"]

    # ERROR tears the deployment down. The pod is deleted, but a 1.20 kubelet removes a pod whose container
    # never started only once its container GC (every minute) took the sandbox away: wait for no live pod.
    async def torn_down() -> bool:
        return objects_of(kube_api, function, live_pods_only=True) == NOTHING

    await eventually(torn_down, timeout=30)


async def test_crash_loop_ends_in_error(
    echo_fields: dict[str, Any], kube_stack: Stack, kube_api: client.ApiClient, group: str
) -> None:
    command = "sh -c 'echo model weights missing; exit 3'"
    fields = {**echo_fields, "containerArgs": command}
    function = await create(kube_stack, echo_function("k8s-crash", **fields))
    await deploy(kube_stack, function, gpu_spec(group))
    body = await wait_status(kube_stack, function, "ERROR", timeout=30)
    [info] = body["healthInfo"]
    assert "CrashLoopBackOff" in info["error"], info
    assert "exited with code 3" in info["error"]
    await wait_gone(kube_api, function)


async def test_readiness_that_never_passes_ends_in_error(
    echo_fields: dict[str, Any], kube_stack: Stack, group: str
) -> None:
    health = {
        "protocol": "HTTP",
        "uri": "/not-there",
        "port": 8000,
        "timeout": "PT1S",
        "expectedStatusCode": 200,
    }
    function = await create(kube_stack, echo_function("k8s-never-ready", **echo_fields, health=health))
    await deploy(kube_stack, function, gpu_spec(group))
    body = await deployment(kube_stack, function)
    assert body["functionStatus"] == "DEPLOYING"
    body = await wait_status(kube_stack, function, "ERROR", timeout=40)
    [info] = body["healthInfo"]
    assert f"did not pass its readiness probe within {START_TIMEOUT:g} s" in info["error"], info


async def test_deleted_pod_degrades_then_heals(
    echo_fields: dict[str, Any], kube_stack: Stack, kube_api: client.ApiClient, group: str
) -> None:
    function = await create(kube_stack, echo_function("k8s-heal", **echo_fields))
    await deploy(kube_stack, function, gpu_spec(group))
    body = await wait_status(kube_stack, function, "ACTIVE", timeout=60)
    [instance] = body["instances"]
    client.CoreV1Api(kube_api).delete_namespaced_pod(instance["instanceId"], namespace_of(function))
    seen: list[str] = []

    async def healed() -> bool:
        current = await deployment(kube_stack, function)
        seen.append(current["functionStatus"])
        running = [i for i in current["instances"] if i["status"] == "RUNNING"]
        return (
            current["functionStatus"] == "ACTIVE"
            and len(running) == 1
            and running[0]["instanceId"] != instance["instanceId"]
        )

    await eventually(healed, timeout=30, interval=0.05)
    assert "DEGRADED" in seen, seen
    await undeploy(kube_stack, function)


async def test_scale_up_and_down_without_a_failed_request(
    echo_fields: dict[str, Any], kube_stack: Stack, kube_api: client.ApiClient, group: str
) -> None:
    # Pods take a few seconds to become ready, as GPU pods do (the echo image's are ready in about a second
    # otherwise). Kubernetes 1.20 has no pod-deletion-cost: the backend releases the drained pod from its
    # ReplicaSet before lowering replicas, and the ReplicaSet's own replacement must still be starting
    # when the count drops, so that it (not a serving pod) is the one the ReplicaSet removes.
    slow_start = [{"key": "ECHO_START_SECONDS", "value": "3"}]
    function = await create(
        kube_stack, echo_function("k8s-scale", **echo_fields, containerEnvironment=slow_start)
    )
    await deploy(kube_stack, function, gpu_spec(group))
    body = await wait_running(kube_stack, function, 1, timeout=60)
    [first] = [i["instanceId"] for i in body["instances"]]

    async def invoked() -> bool:
        return (await kube_stack.http.post(pexec(function), json={})).status_code == 200

    await eventually(invoked, timeout=20, interval=0.2)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        async with httpx.AsyncClient(
            base_url=kube_stack.api_url, headers=kube_stack.headers(), timeout=30
        ) as http:
            while not stop.is_set():
                response = await http.post(pexec(function), json={"delaySeconds": 0.05})
                statuses.append(response.status_code)

    clients = [asyncio.create_task(load()) for _ in range(4)]
    try:
        response = await kube_stack.http.put(deployment_path(function), json=gpu_spec(group, 1, 2, 2))
        assert response.status_code == 200, response.text
        body = await wait_running(kube_stack, function, 2, timeout=60)
        second = [i["instanceId"] for i in body["instances"] if i["instanceId"] != first]
        assert len(second) == 1
        response = await kube_stack.http.put(deployment_path(function), json=gpu_spec(group, 1, 1, 1))
        assert response.status_code == 200, response.text
        body = await wait_running(kube_stack, function, 1, timeout=60)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    # The newest instance was drained, then exactly its pod removed: the first one still serves.
    assert [i["instanceId"] for i in body["instances"]] == [first]
    assert objects_of(kube_api, function, live_pods_only=True)["pods"] == [first]
    name = deployment_name(function["versionId"], 0)
    created = read_json(client.AppsV1Api(kube_api).read_namespaced_deployment, name, namespace_of(function))
    assert created["spec"]["replicas"] == 1
    failed = [s for s in statuses if s != 200]
    assert statuses and not failed, f"{len(failed)} of {len(statuses)} requests failed: {sorted(set(failed))}"
    await undeploy(kube_stack, function)


async def test_worker_killed_mid_deploy_leaves_no_duplicates(
    echo_fields: dict[str, Any], kube_stack: Stack, kube_api: client.ApiClient, group: str
) -> None:
    slow = echo_function(
        "k8s-worker-crash",
        **echo_fields,
        containerEnvironment=[{"key": "ECHO_START_SECONDS", "value": "3"}],
    )
    function = await create(kube_stack, slow)
    await deploy(kube_stack, function, gpu_spec(group, min_instances=2, max_instances=2))

    async def deployment_exists() -> bool:
        return bool(objects_of(kube_api, function)["deployments"])

    await eventually(deployment_exists, timeout=20, interval=0.02)
    kube_stack.kill_worker()
    assert len(objects_of(kube_api, function)["deployments"]) == 1
    kube_stack.restart_worker()
    body = await wait_running(kube_stack, function, 2, timeout=90)
    assert body["functionStatus"] == "ACTIVE"
    found = objects_of(kube_api, function, live_pods_only=True)
    assert len(found["deployments"]) == 1 and len(found["replicasets"]) == 1, found
    assert sorted(found["pods"]) == sorted(i["instanceId"] for i in body["instances"])
    await undeploy(kube_stack, function)
