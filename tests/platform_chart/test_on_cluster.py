"""gpufn on Kubernetes, end to end: its image (built from deploy/Dockerfile) installed with its chart on the
test cluster's real node, serving, scaling and removing a function the in-cluster gpufn deploys into the same
cluster, with the ServiceAccount and RBAC the chart creates; Temporal is the session's dev server and the
invocation plane the session's NATS server (``nats.url``), both outside the chart as in production.

What differs from a user's cluster, and why (docs/kubernetes.md describes the user's steps):
- no cluster DNS or kube-proxy here: the pods reach the API server, Temporal, NATS and the API replica
  through relays on the node IP (``TestCluster.relay``), and the test reaches the API pod by its IP;
- the registry listens on the host's loopback, which the node's containerd reaches but a pod does not: the
  worker cannot resolve image digests there, so artifact resolution is off (tests/registry covers it).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from kubernetes import client

from api.gateway.plane import queue_stream
from gpufn.kube_inventory import read_json
from tests.cluster.harness import TestCluster
from tests.cluster.images import ensure_gpufn_image, push
from tests.conftest import echo_function, eventually
from tests.kubernetes.conftest import echo_container, gpu_spec
from tests.platform_chart.conftest import CHART, Helm, write_values

pytestmark = pytest.mark.kubernetes

ADMIN_KEY = "nvapi-chart-test-" + uuid.uuid4().hex
SECRET_KEY = "qvKjAhnYcDdx3kMqg2gVn6kBp3rKs0mUtr9vX5bYl5k="
RELEASE = "gpufn"
CLUSTER_GROUP = "in-cluster"
API_PORT = 8080


@pytest.fixture(scope="module")
def gpufn_image(real_cluster: TestCluster) -> str:
    """gpufn's image in the cluster's registry (built once per code change, see images/build-gpufn.sh)."""
    layout, tag = ensure_gpufn_image()
    reference = f"{real_cluster.registry_host}/gpufn:{tag}"
    push(layout, tag, reference)
    return reference


@pytest.fixture
def namespace(real_cluster: TestCluster) -> Iterator[str]:
    name = f"gpufn-chart-{uuid.uuid4().hex[:6]}"
    real_cluster.create_namespace(name)
    yield name
    with real_cluster.api_client() as api:
        client.CoreV1Api(api).delete_namespace(name)


def pods(cluster: TestCluster, namespace: str | None, selector: str) -> list[dict[str, Any]]:
    """Pods matching a label selector, in one namespace or all."""
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        if namespace is None:
            found = read_json(core.list_pod_for_all_namespaces, label_selector=selector)
        else:
            found = read_json(core.list_namespaced_pod, namespace, label_selector=selector)
    items: list[dict[str, Any]] = found["items"]
    return items


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def diagnostics(cluster: TestCluster, namespace: str) -> str:
    """Every gpufn pod's phase and log tail, for a failure message."""
    parts = []
    for pod in pods(cluster, namespace, f"app.kubernetes.io/instance={RELEASE}"):
        name = pod["metadata"]["name"]
        try:
            log = cluster.kubectl("logs", "--namespace", namespace, name, "--tail", "60")
        except Exception as exc:  # a pod that never started has no log: say why instead
            log = f"(no log: {exc})"
        parts.append(f"--- {name} ({pod['status'].get('phase')}):\n{log}")
    return "\n".join(parts)


def chart_values(
    cluster: TestCluster, namespace: str, image: str, temporal_address: str, nats_url: str
) -> dict[str, Any]:
    """The chart's values for the test cluster: the user's minimum plus this cluster's addresses."""
    repository, tag = image.rsplit(":", 1)
    temporal_port = int(temporal_address.rsplit(":", 1)[1])
    nats_port = int(nats_url.rsplit(":", 1)[1])

    def api_pod() -> tuple[str, int]:
        # Resolved per connection: the API pod's IP is known only once it runs (and changes if it restarts).
        [pod] = pods(
            cluster, namespace, f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=api"
        )
        return pod["status"]["podIP"], API_PORT

    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        # Its own task queue: the session's Temporal server is shared with other tests' workers.
        "temporal": {
            "address": cluster.relay(lambda: ("127.0.0.1", temporal_port)),
            "taskQueue": f"chart-{uuid.uuid4().hex[:8]}",
        },
        # The invocation plane: the session's NATS server (JetStream), as the chart's nats.url.
        "nats": {"url": f"nats://{cluster.relay(lambda: ('127.0.0.1', nats_port))}"},
        "secrets": {"adminKey": ADMIN_KEY, "secretKey": SECRET_KEY},
        "inCluster": {"enabled": True, "clusterName": CLUSTER_GROUP, "server": cluster.pod_api_url()},
        "config": {
            "GPUFN_INSTANCE_START_TIMEOUT": "60",
            # The registry is on the host's loopback, not the pods' (see the module docstring).
            "GPUFN_RESOLVE_ARTIFACTS": "false",
        },
        "api": {
            "replicas": 1,
            "port": API_PORT,
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
        },
        "worker": {
            # No cluster DNS for the replicas' names: the worker polls the API pod through a relay.
            "gatewayUrls": [f"http://{cluster.relay(api_pod)}"],
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
            "terminationGracePeriodSeconds": 10,
        },
    }


async def test_chart_installs_gpufn_that_deploys_scales_and_removes_a_function(
    real_cluster: TestCluster,
    gpufn_image: str,
    temporal_address: str,
    nats_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    helm = Helm(real_cluster.helm_path, real_cluster.helm_env())
    values = chart_values(real_cluster, namespace, gpufn_image, temporal_address, nats_url)
    values_file = write_values(tmp_path, values)
    release_selector = f"app.kubernetes.io/instance={RELEASE}"
    version_selector = ""
    try:
        await asyncio.to_thread(
            helm.run,
            "install", RELEASE, str(CHART), "--namespace", namespace, "-f", str(values_file),
            "--wait", "--timeout", "180s",
            timeout=240,
        )  # fmt: skip
        installed = pods(real_cluster, namespace, release_selector)
        assert sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in installed) == [
            "api",
            "worker",
        ]
        assert all(ready(p) for p in installed)
        assert all(p["spec"]["containers"][0]["image"] == gpufn_image for p in installed)
        [api_pod] = [p for p in installed if p["metadata"]["labels"]["app.kubernetes.io/component"] == "api"]

        base = f"http://{api_pod['status']['podIP']}:{API_PORT}"
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:

            async def healthy() -> bool:
                # 200 once the worker pod polls the task queue.
                return (await http.get("/health")).status_code == 200

            await eventually(healthy, timeout=60)

            created = await http.post(
                "/v2/nvcf/functions", json=echo_function("chart-echo", **echo_container(real_cluster))
            )
            assert created.status_code == 200, created.text
            function = created.json()["function"]
            version_selector = f"gpufn.io/version-id={function['versionId']}"
            path = f"/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}"
            deployed = await http.post(path, json=gpu_spec(CLUSTER_GROUP, 1, 1, 2))
            assert deployed.status_code == 200, deployed.text

            async def status_is(wanted: str) -> dict[str, Any] | None:
                body: dict[str, Any] = (await http.get(path)).json()["deployment"]
                assert body["functionStatus"] != "ERROR", body
                return body if body["functionStatus"] == wanted else None

            await eventually(lambda: status_is("ACTIVE"), timeout=90)
            # The in-cluster gpufn made the function's pod in this cluster, through the chart's RBAC.
            [function_pod] = pods(real_cluster, None, version_selector)
            assert function_pod["metadata"]["namespace"] != namespace
            assert ready(function_pod)

            answer = await http.post(f"/v2/nvcf/pexec/functions/{function['id']}", json={"hello": "chart"})
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"hello": "chart"}

            # The durable path: accepted at once (202), queued on NATS JetStream, its result polled.
            accepted = await http.post(
                f"/v2/nvcf/pexec/functions/{function['id']}",
                json={"later": 1},
                headers={"NVCF-POLL-SECONDS": "0"},
            )
            assert accepted.status_code == 202, accepted.text
            status = f"/v2/nvcf/pexec/status/{accepted.headers['nvcf-reqid']}"

            async def result() -> dict[str, Any] | None:
                polled = await http.get(status, headers={"NVCF-POLL-SECONDS": "2"})
                assert polled.status_code in (200, 202), polled.text
                return polled.json() if polled.status_code == 200 else None

            assert await eventually(result, timeout=30) == {"later": 1}
            assert queue_stream(function["versionId"]) in await jetstream_streams(nats_url)

            # Scale: a higher minimum is a second real pod, both serving.
            scaled = await http.put(path, json=gpu_spec(CLUSTER_GROUP, 1, 2, 2))
            assert scaled.status_code == 200, scaled.text

            async def two_ready() -> list[dict[str, Any]] | None:
                found = [p for p in pods(real_cluster, None, version_selector) if ready(p)]
                body = (await http.get(path)).json()["deployment"]
                return found if len(found) == 2 and len(body.get("instances") or []) == 2 else None

            await eventually(two_ready, timeout=90)
            for n in range(4):
                answer = await http.post(f"/v2/nvcf/pexec/functions/{function['id']}", json={"n": n})
                assert answer.status_code == 200, answer.text

            undeployed = await http.delete(path)
            assert undeployed.status_code == 200, undeployed.text

            async def no_function_pods() -> bool:
                return not pods(real_cluster, None, version_selector)

            await eventually(no_function_pods, timeout=60)
    except BaseException as err:
        raise AssertionError(f"{err}\n{diagnostics(real_cluster, namespace)}") from err
    finally:
        uninstalled = await asyncio.to_thread(
            helm.run,
            "uninstall", RELEASE, "--namespace", namespace, "--wait", "--timeout", "60s",
            check=False, timeout=90,
        )  # fmt: skip

    assert uninstalled.returncode == 0, uninstalled.stderr
    # Clean-up: gpufn's pods, its cluster-wide RBAC and the function's objects are gone.
    await eventually(lambda: _empty(pods(real_cluster, namespace, release_selector)), timeout=60)
    with real_cluster.api_client() as api:
        rbac = client.RbacAuthorizationV1Api(api)
        roles = read_json(rbac.list_cluster_role, label_selector=release_selector)["items"]
        bindings = read_json(rbac.list_cluster_role_binding, label_selector=release_selector)["items"]
        deployments = read_json(
            client.AppsV1Api(api).list_deployment_for_all_namespaces, label_selector=version_selector
        )["items"]
    assert [r["metadata"]["name"] for r in roles + bindings if namespace in r["metadata"]["name"]] == []
    assert deployments == []


async def _empty(items: list[dict[str, Any]]) -> bool:
    return not items


async def jetstream_streams(url: str) -> set[str]:
    """The names of the JetStream streams on the NATS server at ``url``."""
    connection = await nats.connect(url)
    try:
        return {info.config.name or "" for info in await connection.jetstream().streams_info()}
    finally:
        await connection.close()
