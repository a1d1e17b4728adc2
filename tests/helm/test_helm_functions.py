"""Helm-chart functions end to end: the echo example chart served by a loopback chart repository, installed
with helm by a real worker process into the test cluster (real API server, scheduler and controllers, a real
node running the echo image), and invoked through the API's gateway over HTTP."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from activities.kube.releases import release_name, release_namespace
from gpufn.kube_inventory import read_json
from tests.cluster.harness import TestCluster
from tests.conftest import Stack, eventually
from tests.helm.conftest import (
    CHART_PATH,
    SIDECAR_CHART_PATH,
    SLOW_CHART_PATH,
    echo_values,
    helm_function,
    run_helm,
)
from tests.kubernetes.conftest import gpu_spec
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
from tests.registry.servers import StaticServer
from workflows.models import VersionRef

pytestmark = pytest.mark.kubernetes

NAMESPACE_PREFIX = "gpufn-"


def namespace_of(function: dict[str, Any]) -> str:
    ref = VersionRef(accountId=function["ncaId"], functionId=function["id"], versionId=function["versionId"])
    return release_namespace(NAMESPACE_PREFIX, ref, 0)


def release_of(function: dict[str, Any]) -> str:
    return release_name(function["versionId"], 0)


def releases(cluster: TestCluster, function: dict[str, Any]) -> list[dict[str, Any]]:
    """Every release of the function's namespace, whatever its status."""
    found: list[dict[str, Any]] = run_helm(cluster, "list", "--all", "--namespace", namespace_of(function))
    return found


def namespace_exists(api: client.ApiClient, function: dict[str, Any]) -> bool:
    try:
        client.CoreV1Api(api).read_namespace(namespace_of(function))
    except client.ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


async def answers(stack: Stack, function: dict[str, Any], body: dict[str, Any]) -> httpx.Response:
    async def invoked() -> httpx.Response | None:
        response = await stack.http.post(pexec(function), json=body)
        return response if response.status_code == 200 else None

    response: httpx.Response = await eventually(invoked, timeout=20, interval=0.2)
    return response


def kill_worker_and_its_helm(stack: Stack) -> None:
    """SIGKILL the worker and the helm it runs, as a killed worker container would lose both."""
    assert stack.worker is not None
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The parent pid is the 2nd field after the parenthesized command name.
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    family, added = {stack.worker.pid}, True
    while added:
        children = {pid for pid, parent in parents.items() if parent in family} - family
        family |= children
        added = bool(children)
    helm = []
    for pid in family - {stack.worker.pid}:
        try:
            if b"helm" in Path(f"/proc/{pid}/cmdline").read_bytes():
                helm.append(pid)
        except OSError:
            continue
    stack.kill_worker()
    for pid in helm:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


async def test_helm_function_deploys_and_answers_through_the_gateway(
    helm_stack: Stack, charts: StaticServer, kube_api: client.ApiClient, kube_cluster: TestCluster, group: str
) -> None:
    function = await create(helm_stack, helm_function("helm-echo", charts.url + CHART_PATH))
    assert function["helmChartServiceName"] == "echo"
    configuration = echo_values(kube_cluster, env={"ECHO_GREETING": "from-configuration"})
    await deploy(helm_stack, function, gpu_spec(group, configuration=configuration))
    body = await wait_status(helm_stack, function, "ACTIVE", timeout=60)
    [instance] = body["instances"]
    assert instance["status"] == "RUNNING"

    # The instance is the pod behind the `echo` Service, addressed by the Service's (named) target port.
    namespace = namespace_of(function)
    core, apps = client.CoreV1Api(kube_api), client.AppsV1Api(kube_api)
    pod = read_json(core.read_namespaced_pod, instance["instanceId"], namespace)
    assert instance["address"] == f"http://{pod['status']['podIP']}:8000"
    assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == release_of(function)

    # `configuration` is the release's values, with the instance count; the Deployment and the process
    # both have the environment variable it set.
    [release] = releases(kube_cluster, function)
    assert (release["name"], release["status"], release["chart"]) == (
        release_of(function),
        "deployed",
        "echo-0.1.0",
    )
    values = run_helm(kube_cluster, "get", "values", release_of(function), "--namespace", namespace)
    gpus = {"nvidia.com/gpu": 1}
    assert values == {**configuration, "replicaCount": 1, "resources": {"limits": gpus, "requests": gpus}}
    created = read_json(apps.read_namespaced_deployment, release_of(function), namespace)
    [container] = created["spec"]["template"]["spec"]["containers"]
    assert {"name": "ECHO_GREETING", "value": "from-configuration"} in container["env"]
    environ = kube_cluster.pod_environ(namespace, pod["metadata"]["name"])
    assert "ECHO_GREETING=from-configuration" in environ

    # The namespace records the release, for observing and tearing down by version id alone.
    recorded = read_json(core.read_namespace, namespace)["metadata"]
    assert recorded["labels"]["gpufn.io/version-id"] == function["versionId"]
    assert recorded["labels"]["gpufn.io/helm-release"] == release_of(function)
    assert recorded["annotations"]["gpufn.io/service-name"] == "echo"

    answer = await answers(helm_stack, function, {"hello": "helm"})
    assert answer.json() == {"hello": "helm"}
    await undeploy(helm_stack, function)


async def test_chart_pods_run_their_init_container_and_every_container(
    kube_cluster: TestCluster, helm_stack: Stack, charts: StaticServer, kube_api: client.ApiClient, group: str
) -> None:
    function = await create(helm_stack, helm_function("helm-sidecar", charts.url + SIDECAR_CHART_PATH))
    await deploy(helm_stack, function, gpu_spec(group, configuration=echo_values(kube_cluster)))
    [instance] = (await wait_running(helm_stack, function, 1, timeout=90))["instances"]
    namespace = namespace_of(function)
    pod = read_json(client.CoreV1Api(kube_api).read_namespaced_pod, instance["instanceId"], namespace)
    # The init container ran to completion before the others started; both containers run and are ready.
    [init] = pod["status"]["initContainerStatuses"]
    assert (init["name"], init["state"]["terminated"]["exitCode"]) == ("fetch-model", 0)
    statuses = {c["name"]: c for c in pod["status"]["containerStatuses"]}
    assert set(statuses) == {"echo", "sidecar"}
    assert all(c["ready"] and "running" in c["state"] for c in statuses.values()), statuses
    # The sidecar read what the init container wrote into their shared volume.
    assert kube_cluster.pod_log(namespace, instance["instanceId"], "sidecar").strip() == "weights-ready"
    # The GPU went to the container that serves (the one behind the Service), not to the sidecar.
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert containers["echo"]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert "resources" not in containers["sidecar"] or not containers["sidecar"]["resources"]
    answer = await answers(helm_stack, function, {"with": "sidecar"})
    assert answer.json() == {"with": "sidecar"}
    await undeploy(helm_stack, function)


async def test_put_scales_the_release_through_its_values(
    helm_stack: Stack, charts: StaticServer, kube_api: client.ApiClient, kube_cluster: TestCluster, group: str
) -> None:
    function = await create(helm_stack, helm_function("helm-scale", charts.url + CHART_PATH))
    await deploy(helm_stack, function, gpu_spec(group, configuration=echo_values(kube_cluster)))
    body = await wait_running(helm_stack, function, 1, timeout=60)
    [first] = [i["instanceId"] for i in body["instances"]]
    namespace = namespace_of(function)

    response = await helm_stack.http.put(deployment_path(function), json=gpu_spec(group, 1, 2, 2))
    assert response.status_code == 200, response.text
    await wait_running(helm_stack, function, 2, timeout=60)
    values = run_helm(kube_cluster, "get", "values", release_of(function), "--namespace", namespace)
    assert values["replicaCount"] == 2

    response = await helm_stack.http.put(deployment_path(function), json=gpu_spec(group, 1, 1, 1))
    assert response.status_code == 200, response.text
    body = await wait_running(helm_stack, function, 1, timeout=60)
    # The drained (newest) pod was deleted before the count went down: the first one still serves.
    assert [i["instanceId"] for i in body["instances"]] == [first]
    [release] = releases(kube_cluster, function)
    # One upgrade per change of count, none for the repeated ensures in between.
    assert (release["status"], release["revision"]) == ("deployed", "3")
    created = read_json(
        client.AppsV1Api(kube_api).read_namespaced_deployment, release_of(function), namespace
    )
    assert created["spec"]["replicas"] == 1
    await answers(helm_stack, function, {})
    await undeploy(helm_stack, function)


async def test_undeploy_uninstalls_the_release_and_leaves_nothing(
    helm_stack: Stack, charts: StaticServer, kube_api: client.ApiClient, kube_cluster: TestCluster, group: str
) -> None:
    function = await create(helm_stack, helm_function("helm-undeploy", charts.url + CHART_PATH))
    await deploy(helm_stack, function, gpu_spec(group, 1, 2, 2, configuration=echo_values(kube_cluster)))
    await wait_running(helm_stack, function, 2, timeout=60)
    assert len(releases(kube_cluster, function)) == 1

    response = await helm_stack.http.delete(deployment_path(function))
    assert response.status_code == 200, response.text
    assert response.json()["function"]["status"] == "INACTIVE"

    # The undeploy is answered within seconds (NVCF: INACTIVE at once); the teardown that follows removes
    # the release's namespace with its pods, Service and release records.
    async def namespace_gone() -> bool:
        return not namespace_exists(kube_api, function)

    # The namespace controller deletes the namespace once its real pods are gone, re-checking with a
    # back-off: allow it a while.
    await eventually(namespace_gone, timeout=120)
    everywhere = run_helm(kube_cluster, "list", "--all", "--all-namespaces")
    assert release_of(function) not in [r["name"] for r in everywhere]
    pods = read_json(client.CoreV1Api(kube_api).list_pod_for_all_namespaces)["items"]
    assert [p for p in pods if p["metadata"]["namespace"] == namespace_of(function)] == []


async def test_chart_that_fails_to_render_ends_in_error_with_helms_message(
    kube_cluster: TestCluster, helm_stack: Stack, charts: StaticServer, kube_api: client.ApiClient, group: str
) -> None:
    function = await create(helm_stack, helm_function("helm-unrenderable", charts.url + CHART_PATH))
    await deploy(
        helm_stack,
        function,
        gpu_spec(group, configuration=echo_values(kube_cluster, env=["not", "a", "map"])),
    )
    body = await wait_status(helm_stack, function, "ERROR", timeout=30)
    [info] = body["healthInfo"]
    assert "execution error at (echo/templates/deployment.yaml" in info["error"], info
    assert "env must be a map of variable names to values" in info["error"]
    assert (info["gpu"], info["instanceType"]) == ("H100", f"{group.upper()}.GPU.H100_1x")
    # Prepare renders the chart before anything is installed.
    assert not namespace_exists(kube_api, function)


async def test_chart_without_the_named_service_ends_in_error(
    kube_cluster: TestCluster, helm_stack: Stack, charts: StaticServer, kube_api: client.ApiClient, group: str
) -> None:
    function = await create(
        helm_stack,
        helm_function("helm-no-service", charts.url + CHART_PATH, helmChartServiceName="inference"),
    )
    await deploy(helm_stack, function, gpu_spec(group, configuration=echo_values(kube_cluster)))
    body = await wait_status(helm_stack, function, "ERROR", timeout=30)
    [info] = body["healthInfo"]
    assert "renders no Service named 'inference'" in info["error"], info
    assert "its Services: echo" in info["error"]
    assert not namespace_exists(kube_api, function)


async def test_chart_the_api_server_refuses_ends_in_error_with_helms_message(
    kube_cluster: TestCluster, helm_stack: Stack, charts: StaticServer, kube_api: client.ApiClient, group: str
) -> None:
    function = await create(helm_stack, helm_function("helm-refused", charts.url + CHART_PATH))
    await deploy(
        helm_stack, function, gpu_spec(group, configuration=echo_values(kube_cluster, env={"NOT VALID": "x"}))
    )
    body = await wait_status(helm_stack, function, "ERROR", timeout=30)
    [info] = body["healthInfo"]
    assert f"Helm could not install release {release_of(function)}" in info["error"], info
    assert "is invalid" in info["error"] and "NOT VALID" in info["error"]

    # ERROR tears the deployment down: the failed release and its namespace go.
    async def gone() -> bool:
        return not namespace_exists(kube_api, function)

    await eventually(gone, timeout=30)


async def test_worker_killed_mid_install_resumes_with_one_release(
    helm_stack: Stack, charts: StaticServer, kube_api: client.ApiClient, kube_cluster: TestCluster, group: str
) -> None:
    function = await create(helm_stack, helm_function("helm-worker-crash", charts.url + SLOW_CHART_PATH))
    configuration = echo_values(kube_cluster, warmUpCommand=["sleep", "4"])
    await deploy(helm_stack, function, gpu_spec(group, configuration=configuration))
    core = client.CoreV1Api(kube_api)

    async def installing() -> bool:
        if not namespace_exists(kube_api, function):
            return False
        found = read_json(
            core.list_namespaced_secret,
            namespace_of(function),
            label_selector="owner=helm,status=pending-install",
        )
        return bool(found["items"])

    await eventually(installing, timeout=30, interval=0.05)
    kill_worker_and_its_helm(helm_stack)
    [stuck] = releases(kube_cluster, function)
    assert stuck["status"] == "pending-install"

    helm_stack.restart_worker()
    body = await wait_running(helm_stack, function, 1, timeout=90)
    assert body["functionStatus"] == "ACTIVE"
    # The abandoned install was uninstalled and made again: one release, one revision, one Deployment.
    [release] = releases(kube_cluster, function)
    assert (release["name"], release["status"], release["revision"]) == (
        release_of(function),
        "deployed",
        "1",
    )
    history = run_helm(kube_cluster, "history", release_of(function), "--namespace", namespace_of(function))
    assert [h["status"] for h in history] == ["deployed"]
    deployments = read_json(client.AppsV1Api(kube_api).list_namespaced_deployment, namespace_of(function))
    assert [d["metadata"]["name"] for d in deployments["items"]] == [release_of(function)]
    await answers(helm_stack, function, {"after": "restart"})
    body = await deployment(helm_stack, function)
    assert [i["status"] for i in body["instances"]] == ["RUNNING"]
    await undeploy(helm_stack, function)
