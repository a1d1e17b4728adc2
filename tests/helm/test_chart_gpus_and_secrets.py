"""Helm-chart functions get the instance type's GPUs on their pods and their secrets in a Secret the chart
mounts; their release namespace is hardened like every namespace gpufn makes. Real API server, real helm."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import pytest
from kubernetes import client

from activities.kube.names import namespace_name
from activities.kube.releases import release_name, release_namespace
from gpufn.kube_inventory import read_json
from tests.cluster.harness import TestCluster
from tests.conftest import Stack
from tests.helm.conftest import ECHO_CHART, echo_values, helm_function, package_chart, run_helm
from tests.kubernetes.conftest import gpu_spec
from tests.lifecycle.helpers import create, deploy, deployment_path, undeploy, wait_running, wait_status
from tests.registry.servers import StaticServer
from workflows.models import VersionRef

pytestmark = pytest.mark.kubernetes

CHART_PATH = "/charts/echo-0.1.0.tgz"
NO_GPU_CHART_PATH = "/no-gpu/echo-0.1.0.tgz"


def chart_without_resources() -> bytes:
    """The echo chart, but one that never gives its container the `resources` value."""
    template = (ECHO_CHART / "templates" / "deployment.yaml").read_text()
    assert "{{- with .Values.resources }}" in template
    ignored = template.replace("{{- with .Values.resources }}", "{{- with .Values.notResources }}")
    return package_chart(ECHO_CHART, {"templates/deployment.yaml": ignored})


@pytest.fixture(scope="module")
async def gpu_charts() -> AsyncIterator[StaticServer]:
    """A chart server on loopback: the echo example chart, and a variant that ignores its GPU values."""
    server = StaticServer(
        {CHART_PATH: package_chart(ECHO_CHART), NO_GPU_CHART_PATH: chart_without_resources()}
    )
    await server.start()
    yield server
    await server.stop()


async def test_chart_pods_get_the_gpus_and_the_secrets(
    helm_stack: Stack,
    gpu_charts: StaticServer,
    kube_api: client.ApiClient,
    kube_cluster: TestCluster,
    group: str,
) -> None:
    secret_value = "chart-s3cret"
    function = await create(
        helm_stack,
        helm_function(
            "helm-gpus-secrets",
            gpu_charts.url + CHART_PATH,
            secrets=[{"name": "MODEL_TOKEN", "value": secret_value}],
        ),
    )
    await deploy(helm_stack, function, gpu_spec(group, gpus=2, configuration=echo_values(kube_cluster)))
    try:
        [instance] = (await wait_running(helm_stack, function, 1, timeout=60))["instances"]
        ref = VersionRef(
            functionId=function["id"], versionId=function["versionId"], accountId=function["ncaId"]
        )
        namespace = release_namespace("gpufn-", ref, 0)
        core = client.CoreV1Api(kube_api)

        # The instance type (H100_2x) reached the chart's pod as its GPU limit and request.
        pod = read_json(core.read_namespaced_pod, instance["instanceId"], namespace)
        [container] = pod["spec"]["containers"]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
        assert container["resources"]["requests"] == {"nvidia.com/gpu": "2"}

        # The secret is in the Secret the values name, mounted by the chart; it is never in Helm's record.
        secret = read_json(core.read_namespaced_secret, "gpufn-secrets", namespace)
        assert base64.b64decode(secret["data"]["MODEL_TOKEN"]).decode() == secret_value
        assert secret["metadata"]["labels"]["gpufn.io/version-id"] == function["versionId"]
        values = run_helm(
            kube_cluster, "get", "values", release_name(function["versionId"], 0), "--namespace", namespace
        )
        assert values["gpufn"] == {"secretName": "gpufn-secrets"}
        computed = run_helm(
            kube_cluster,
            "get",
            "values",
            "--all",
            release_name(function["versionId"], 0),
            "--namespace",
            namespace,
        )
        assert secret_value not in json.dumps(computed)
        assert {"secretRef": {"name": "gpufn-secrets"}} in container["envFrom"]
        environ = kube_cluster.pod_environ(namespace, pod["metadata"]["name"])
        assert f"MODEL_TOKEN={secret_value}" in environ

        # An updated secret reaches the pods started afterwards.
        path = f"/v2/nvcf/secrets/functions/{function['id']}/versions/{function['versionId']}"
        response = await helm_stack.http.put(path, json={"secrets": [{"name": "MODEL_TOKEN", "value": "v2"}]})
        assert response.status_code == 204, response.text
        response = await helm_stack.http.put(
            deployment_path(function), json=gpu_spec(group, 2, 2, 2, configuration=echo_values(kube_cluster))
        )
        assert response.status_code == 200, response.text
        await wait_running(helm_stack, function, 2, timeout=60)
        secret = read_json(core.read_namespaced_secret, "gpufn-secrets", namespace)
        assert base64.b64decode(secret["data"]["MODEL_TOKEN"]).decode() == "v2"

        # The release namespace is hardened like an account namespace: a NetworkPolicy that admits only its
        # own pods (and gateways), and a default account that mounts no token into the chart's pods.
        networking = client.NetworkingV1Api(kube_api)
        policy = read_json(networking.read_namespaced_network_policy, "gpufn-isolation", namespace)["spec"]
        assert policy["ingress"][0]["from"][0] == {"podSelector": {}}
        assert policy["egress"][0] == {"to": [{"podSelector": {}}]}
        account = read_json(core.read_namespaced_service_account, "default", namespace)
        assert account["automountServiceAccountToken"] is False
        assert not [v for v in pod["spec"].get("volumes") or [] if "secret" in v or "projected" in v]
        assert namespace != namespace_name("gpufn-", function["ncaId"])
    finally:
        await undeploy(helm_stack, function)


async def test_chart_that_ignores_its_gpu_values_ends_in_error(
    kube_cluster: TestCluster,
    helm_stack: Stack,
    gpu_charts: StaticServer,
    kube_api: client.ApiClient,
    group: str,
) -> None:
    function = await create(helm_stack, helm_function("helm-no-gpus", gpu_charts.url + NO_GPU_CHART_PATH))
    await deploy(helm_stack, function, gpu_spec(group, configuration=echo_values(kube_cluster)))
    body = await wait_status(helm_stack, function, "ERROR", timeout=30)
    [info] = body["healthInfo"]
    assert "No pod of the chart asks for the instance type's 1 GPU(s)" in info["error"], info
    assert "'resources'" in info["error"]
