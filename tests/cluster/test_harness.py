"""The harness's control plane answers the tools and the pods: helm reaches it from here, and a pod reaches
the API server at ``pod_api_url()`` (a relay on the node IP; no kube-proxy) and verifies its certificate with
the service account's CA, as gpufn's in-cluster kubeconfig does. The real node itself: test_real_node.py."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from gpufn.kube_inventory import read_json

from .fixtures import wait_for
from .harness import TestCluster

pytestmark = pytest.mark.kubernetes

# What the pod runs (the echo image has Python): GET /version with its service account token, verifying the
# server against the account's ca.crt, and print the answer.
CALL_API = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
request = urllib.request.Request(os.environ["API"] + "/version")
request.add_header("Authorization", "Bearer " + open(sa + "/token").read())
context = ssl.create_default_context(cafile=sa + "/ca.crt")
print(json.dumps(json.load(urllib.request.urlopen(request, context=context, timeout=10))))
"""


@pytest.fixture
def core(real_cluster: TestCluster) -> Iterator[client.CoreV1Api]:
    with real_cluster.api_client() as api_client:
        yield client.CoreV1Api(api_client)


def test_helm_reaches_the_cluster(real_cluster: TestCluster) -> None:
    done = subprocess.run(
        [str(real_cluster.helm_path), "list", "--all-namespaces"],
        env=real_cluster.helm_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("NAME")


def test_a_pod_reaches_and_verifies_the_api_server_at_pod_api_url(
    real_cluster: TestCluster, core: client.CoreV1Api, kube_namespace: str
) -> None:
    url = real_cluster.pod_api_url()
    assert url.startswith(f"https://{real_cluster.node.node_ip if real_cluster.node else '?'}:")
    pod: Any = {
        "metadata": {"name": "caller"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": real_cluster.image("echo:1"),
                    "command": ["python3", "-c", CALL_API],
                    "env": [{"name": "API", "value": url}],
                }
            ],
        },
    }
    core.create_namespaced_pod(kube_namespace, pod)

    def finished() -> str | None:
        phase: str | None = read_json(core.read_namespaced_pod, "caller", kube_namespace)["status"].get(
            "phase"
        )
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_for(finished, 60, "the caller pod to finish")
    output = real_cluster.pod_log(kube_namespace, "caller")
    assert phase == "Succeeded", output
    assert json.loads(output.strip().splitlines()[-1])["gitVersion"].startswith("v1.20.")
