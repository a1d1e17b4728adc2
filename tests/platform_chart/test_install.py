"""The chart installs gpufn into the local test cluster, and that gpufn serves a function end to end.

The fake kubelet runs each pod's command as a local process, so the test points the chart's commands at
this repository's interpreter and working tree. The function runs on the worker pod's `local` backend (a
process next to the worker): what is under test here is gpufn's own deployment, not the Kubernetes backend,
which tests/kubernetes covers.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from activities.local import stop_recorded_instances
from tests.cluster.fake_kubelet import get_json
from tests.cluster.harness import TestCluster
from tests.conftest import ROOT, cpu_spec, echo_function, eventually, free_port
from tests.platform_chart.conftest import CHART, Helm, write_values

pytestmark = pytest.mark.kubernetes

ADMIN_KEY = "nvapi-chart-test-" + uuid.uuid4().hex
SECRET_KEY = "qvKjAhnYcDdx3kMqg2gVn6kBp3rKs0mUtr9vX5bYl5k="
RELEASE = "gpufn"


@pytest.fixture
def namespace(kube_cluster: TestCluster) -> Iterator[str]:
    name = f"gpufn-chart-{uuid.uuid4().hex[:6]}"
    kube_cluster.create_namespace(name)
    yield name
    with kube_cluster.api_client() as api:
        client.CoreV1Api(api).delete_namespace(name)


def pods_of(kube_cluster: TestCluster, namespace: str) -> list[dict[str, Any]]:
    with kube_cluster.api_client() as api:
        items: list[dict[str, Any]] = get_json(
            client.CoreV1Api(api).list_namespaced_pod,
            namespace,
            label_selector=f"app.kubernetes.io/instance={RELEASE}",
        )["items"]
    return items


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def diagnostics(kube_cluster: TestCluster, namespace: str) -> str:
    """Every pod's phase and output, for a failure message (kubectl logs cannot work here)."""
    parts = []
    for pod in pods_of(kube_cluster, namespace):
        name = pod["metadata"]["name"]
        parts.append(
            f"--- {name} ({pod['status'].get('phase')}):\n{kube_cluster.pod_log(namespace, name)[-3000:]}"
        )
    return "\n".join(parts)


async def test_chart_installs_gpufn_that_serves_a_function(
    kube_cluster: TestCluster, temporal_address: str, namespace: str, tmp_path: Path
) -> None:
    port = free_port()
    state = tmp_path / "state"
    values = {
        # Never pulled: the fake kubelet runs the command below instead of the image.
        "image": {"repository": "gpufn-test", "tag": "local"},
        # Its own task queue: the session's Temporal server is shared with other tests' workers.
        "temporal": {"address": temporal_address, "taskQueue": f"chart-{uuid.uuid4().hex[:8]}"},
        "secrets": {"adminKey": ADMIN_KEY, "secretKey": SECRET_KEY},
        # Pods here are processes on this machine: the state directory must be one of its directories.
        "stateDir": str(state),
        # The in-cluster kubeconfig reads a service-account token file that only real pods have.
        "inCluster": {"enabled": False},
        "config": {"GPUFN_INSTANCE_START_TIMEOUT": "30", "GPUFN_LOCAL_CPU_SLOTS": "4"},
        "api": {
            "replicas": 1,
            # The chart's default host (all addresses), on a port free on this machine: pods share it.
            "port": port,
            "command": [sys.executable, "-m", "api"],
            "workingDir": str(ROOT),
        },
        "worker": {
            "command": [sys.executable, "-m", "worker"],
            "workingDir": str(ROOT),
            # No cluster DNS here: the replica is reached on loopback, where it listens too.
            "gatewayUrls": [f"http://127.0.0.1:{port}"],
        },
    }
    helm = Helm(kube_cluster.helm_path, kube_cluster.helm_env())
    values_file = write_values(tmp_path, values)
    try:
        await asyncio.to_thread(
            helm.run,
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            namespace,
            "-f",
            str(values_file),
            "--wait",
            "--timeout",
            "90s",
        )
        pods = pods_of(kube_cluster, namespace)
        assert sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods) == [
            "api",
            "worker",
        ]
        assert all(ready(p) for p in pods)
        [api_pod] = [p for p in pods if p["metadata"]["name"] == f"{RELEASE}-api-0"]

        base = f"http://{api_pod['status']['podIP']}:{port}"
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:

            async def healthy() -> bool:
                # 200 once the worker pod polls the task queue.
                return (await http.get("/health")).status_code == 200

            await eventually(healthy, timeout=30)

            created = await http.post("/v2/nvcf/functions", json=echo_function("chart-echo"))
            assert created.status_code == 200, created.text
            function = created.json()["function"]
            path = f"/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}"
            deployed = await http.post(path, json=cpu_spec(1, 1))
            assert deployed.status_code == 200, deployed.text

            async def active() -> str | None:
                status: str = (await http.get(path)).json()["deployment"]["functionStatus"]
                assert status != "ERROR", (await http.get(path)).text
                return status if status == "ACTIVE" else None

            await eventually(active, timeout=45)

            answer = await http.post(f"/v2/nvcf/pexec/functions/{function['id']}", json={"hello": "chart"})
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"hello": "chart"}

            undeployed = await http.delete(path)
            assert undeployed.status_code == 200, undeployed.text
    except BaseException as err:
        raise AssertionError(f"{err}\n{diagnostics(kube_cluster, namespace)}") from err
    finally:
        await asyncio.to_thread(
            helm.run,
            "uninstall",
            RELEASE,
            "--namespace",
            namespace,
            "--wait",
            "--timeout",
            "30s",
            check=False,
        )
        # The worker's local instances run in their own sessions, so they outlive its pod.
        stop_recorded_instances(state, grace_seconds=2)
