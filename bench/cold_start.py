"""Benchmark: cold start of a function image on the test cluster's real node (containerd + kubelet).

Everything is real: a Kubernetes 1.20 control plane, containerd and a kubelet running the echo example's
image (built here by tests/cluster/images/build.sh) from the cluster's local registry. For each case the
script creates the workload and times, from the create call:

- ``scheduled``: the pod is bound to the node;
- ``running``: its container started (image pulled and unpacked, sandbox and network set up);
- ``ready``: the kubelet's readiness probe passed;
- ``first answer``: a POST /echo on the pod IP answered 200 (a client polling every 20 ms, as a caller
  waiting for the function would).

Cases: the image not yet on the node (``uncached``: pulled from the local registry), the image already on
the node (``cached``), and a Deployment scaled 0 -> 1 while a client keeps calling (``scale 0->1``).
This measures the node's part of a gpufn deployment; gpufn's own workflow and gateway overheads are measured
by bench/invoke.py and bench/autoscale.py.

Usage (from the repository root): PYTHONPATH=. .venv/bin/python bench/cold_start.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from kubernetes import client

from gpufn.kube_inventory import read_json as get_json
from tests.cluster.harness import TestCluster, ensure_binaries
from tests.cluster.images import ensure_images
from tests.cluster.node import RealNodeConfig

POLL = 0.02


def echo_container(image: str) -> dict[str, Any]:
    return {
        "name": "echo",
        "image": image,
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1},
    }


def answers(ip: str) -> bool:
    request = urllib.request.Request(f"http://{ip}:8000/echo", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def follow(core: client.CoreV1Api, namespace: str, selector: str, t0: float) -> dict[str, float]:
    """Poll the (single) pod matching ``selector`` until it answers; return milestone times since ``t0``."""
    marks: dict[str, float] = {}
    deadline = t0 + 300
    while time.monotonic() < deadline:
        pods = get_json(core.list_namespaced_pod, namespace, label_selector=selector)["items"]
        pod = pods[0] if pods else {}
        status = pod.get("status", {})
        now = time.monotonic() - t0
        if pod.get("spec", {}).get("nodeName"):
            marks.setdefault("scheduled", now)
        containers = status.get("containerStatuses") or [{}]
        if "running" in containers[0].get("state", {}):
            marks.setdefault("running", now)
        if containers[0].get("ready"):
            marks.setdefault("ready", now)
        ip = status.get("podIP")
        if ip and "running" in marks and answers(ip):
            marks["first answer"] = time.monotonic() - t0
            return marks
        time.sleep(POLL)
    raise TimeoutError(f"no answer from {selector} in {namespace}: {marks}")


def run_pod(core: client.CoreV1Api, namespace: str, image: str) -> dict[str, float]:
    name = f"echo-{uuid.uuid4().hex[:6]}"
    body: Any = {
        "metadata": {"name": name, "labels": {"run": name}},
        "spec": {"containers": [echo_container(image)], "terminationGracePeriodSeconds": 1},
    }
    t0 = time.monotonic()
    core.create_namespaced_pod(namespace, body)
    marks = follow(core, namespace, f"run={name}", t0)
    core.delete_namespaced_pod(name, namespace)
    # Gone from the node too, so that an eviction of its image afterwards really frees the layers.
    while get_json(core.list_namespaced_pod, namespace, label_selector=f"run={name}")["items"]:
        time.sleep(0.1)
    return marks


def scale_from_zero(cluster: TestCluster, namespace: str, image: str) -> dict[str, float]:
    name = f"scale-{uuid.uuid4().hex[:6]}"
    labels = {"app": name}
    deployment: Any = {
        "metadata": {"name": name},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [echo_container(image)]}},
        },
    }
    with cluster.api_client() as api_client:
        apps = client.AppsV1Api(api_client)
        core = client.CoreV1Api(api_client)
        apps.create_namespaced_deployment(namespace, deployment)
        t0 = time.monotonic()
        apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": 1}})
        marks = follow(core, namespace, f"app={name}", t0)
        apps.delete_namespaced_deployment(name, namespace)
    return marks


def evict(cluster: TestCluster, reference: str) -> str:
    """Remove every image but the sandbox's from the node's containerd (CRI keeps a tag, a digest and an ID
    reference per image); its content and snapshots are garbage-collected at once (``--sync``)."""
    assert cluster.node is not None
    ctr = ["ctr", f"--address={cluster.node.containerd_socket}", "--namespace=k8s.io", "images"]
    listed = subprocess.run([*ctr, "ls", "-q"], capture_output=True, text=True, check=True, timeout=60).stdout
    sandbox = {
        line.split()[0]
        for line in subprocess.run(
            [*ctr, "ls"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if "pause" in line
    }
    names = [n for n in listed.split() if n not in sandbox and "pause" not in n]
    if names:
        subprocess.run([*ctr, "rm", "--sync", *names], capture_output=True, check=True, timeout=60)
    return reference


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ensure_binaries()
    ensure_images()
    t0 = time.monotonic()
    with TestCluster(real_node=RealNodeConfig(name="bench-node")) as cluster:
        print(f"cluster with a real node up in {time.monotonic() - t0:.1f} s: {cluster.boot_phases}")
        cluster.create_namespace("bench")
        results: dict[str, list[dict[str, float]]] = {"uncached": [], "cached": [], "scale 0->1": []}
        with cluster.api_client() as api_client:
            core = client.CoreV1Api(api_client)
            for _ in range(args.repeat):
                results["uncached"].append(run_pod(core, "bench", evict(cluster, cluster.image("echo:1"))))
                results["cached"].append(run_pod(core, "bench", cluster.image("echo:1")))
            for _ in range(args.repeat):
                results["scale 0->1"].append(scale_from_zero(cluster, "bench", cluster.image("echo:1")))
    milestones = ("scheduled", "running", "ready", "first answer")
    print(f"\nseconds from create (median of {args.repeat}; min-max)")
    print(f"| case | {' | '.join(milestones)} |")
    print(f"|---|{'---|' * len(milestones)}")
    for case, runs in results.items():
        cells = []
        for mark in milestones:
            values = [r[mark] for r in runs if mark in r]
            cells.append(
                f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})" if values else "-"
            )
        print(f"| {case} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
