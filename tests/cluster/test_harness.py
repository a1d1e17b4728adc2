"""The local cluster really schedules, runs, probes, restarts and kills pods."""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .fake_kubelet import get_json
from .fixtures import wait_for
from .harness import TestCluster

pytestmark = pytest.mark.kubernetes


@pytest.fixture
def core(kube_cluster: TestCluster) -> Iterator[client.CoreV1Api]:
    with kube_cluster.api_client() as api_client:
        yield client.CoreV1Api(api_client)


def pod_body(name: str, command: list[str], image: str = "python:3.11", **extra: Any) -> Any:
    """A pod manifest (typed Any: the client's methods accept dicts as well as models)."""
    container: dict[str, Any] = {"name": "main", "image": image, "command": command}
    container.update(extra.pop("container", {}))
    return {"metadata": {"name": name}, "spec": {"containers": [container], **extra}}


def read_pod(core: client.CoreV1Api, ns: str, name: str) -> dict[str, Any]:
    return get_json(core.read_namespaced_pod, name, ns)


def container_status(core: client.CoreV1Api, ns: str, name: str) -> dict[str, Any]:
    """Status of the pod's first container; {} before the kubelet reported one."""
    statuses = read_pod(core, ns, name).get("status", {}).get("containerStatuses") or [{}]
    return dict(statuses[0])


def waiting_reason(core: client.CoreV1Api, ns: str, name: str) -> str | None:
    return container_status(core, ns, name).get("state", {}).get("waiting", {}).get("reason")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_gpu_nodes_registered(core: client.CoreV1Api) -> None:
    nodes = {n["metadata"]["name"]: n for n in get_json(core.list_node)["items"]}
    assert set(nodes) == {"gpu-node-1", "gpu-node-2"}
    for node in nodes.values():
        labels = node["metadata"]["labels"]
        assert labels["nvidia.com/gpu.present"] == "true"
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert labels["nvidia.com/gpu.count"] == "8"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert not [t for t in node["spec"].get("taints") or [] if t["key"] == "node.kubernetes.io/not-ready"]
        assert [c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready"] == ["True"]


def test_deployment_becomes_ready_and_serves_http(
    kube_cluster: TestCluster, core: client.CoreV1Api, kube_namespace: str
) -> None:
    ns = kube_namespace
    secret: Any = {"metadata": {"name": "greeting"}, "stringData": {"text": "hello-from-secret"}}
    core.create_namespaced_secret(ns, secret)
    config_map: Any = {"metadata": {"name": "extra"}, "data": {"COLOR": "green"}}
    core.create_namespaced_config_map(ns, config_map)
    labels = {"app": "web"}
    # The files served prove that env from a Secret and envFrom a ConfigMap reached the process.
    script = (
        'echo "$GREETING" > greeting.txt; echo "$CFG_COLOR" > color.txt; '
        "exec python3 -m http.server --bind $HOST 8000"
    )
    container = {
        "name": "web",
        "image": "python:3.11",
        "command": ["sh", "-c"],
        "args": [script],
        "env": [{"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": "greeting", "key": "text"}}}],
        "envFrom": [{"prefix": "CFG_", "configMapRef": {"name": "extra"}}],
        "ports": [{"name": "http", "containerPort": 8000}],
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
        "readinessProbe": {"httpGet": {"path": "/greeting.txt", "port": "http"}, "periodSeconds": 1},
    }
    deployment: Any = {
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }
    with kube_cluster.api_client() as api_client:
        apps = client.AppsV1Api(api_client)
        apps.create_namespaced_deployment(ns, deployment)
        wait_for(
            lambda: (
                get_json(apps.read_namespaced_deployment, "web", ns)["status"].get("availableReplicas", 0)
                >= 1
            ),
            30,
            "the deployment to become available",
        )
    (pod,) = get_json(core.list_namespaced_pod, ns, label_selector="app=web")["items"]
    status = pod["status"]
    assert status["phase"] == "Running"
    assert pod["spec"]["nodeName"] in {"gpu-node-1", "gpu-node-2"}
    ip = status["podIP"]
    assert re.fullmatch(r"127\.\d+\.\d+\.\d+", ip)
    assert status["containerStatuses"][0]["ready"] is True
    (ready,) = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert ready["status"] == "True"
    assert "reason" not in ready  # the ContainersNotReady of before the probe passed is gone
    with urllib.request.urlopen(f"http://{ip}:8000/greeting.txt", timeout=5) as resp:
        assert resp.read().decode().strip() == "hello-from-secret"
    with urllib.request.urlopen(f"http://{ip}:8000/color.txt", timeout=5) as resp:
        assert resp.read().decode().strip() == "green"
    assert "GET /greeting.txt" in kube_cluster.pod_log(ns, pod["metadata"]["name"])


def test_failing_readiness_probe_makes_the_pod_unready(core: client.CoreV1Api, kube_namespace: str) -> None:
    ns = kube_namespace
    # /ready answers 200 for about 2 s, then 404: the pod must turn Ready, then not Ready.
    script = "touch ready; (sleep 2; rm ready) & exec python3 -m http.server --bind $HOST 8000"
    probe = {"httpGet": {"path": "/ready", "port": 8000}, "periodSeconds": 1, "failureThreshold": 2}
    core.create_namespaced_pod(
        ns, pod_body("flaky", ["sh", "-c", script], container={"readinessProbe": probe})
    )

    def ready() -> bool:
        conditions = read_pod(core, ns, "flaky")["status"].get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    wait_for(ready, 20, "the pod to become Ready")
    wait_for(lambda: not ready(), 10, "the pod to become unready")
    status = container_status(core, ns, "flaky")
    assert status["ready"] is False
    assert "running" in status["state"]  # unready, not restarted
    assert status["restartCount"] == 0


def test_too_many_gpus_stays_pending(core: client.CoreV1Api, kube_namespace: str) -> None:
    ns = kube_namespace
    body = pod_body("greedy", ["sleep", "60"], container={"resources": {"limits": {"nvidia.com/gpu": "16"}}})
    core.create_namespaced_pod(ns, body)

    def unschedulable() -> str | None:
        for cond in read_pod(core, ns, "greedy")["status"].get("conditions") or []:
            if cond["type"] == "PodScheduled" and cond["status"] == "False":
                return str(cond["message"])
        return None

    message = wait_for(unschedulable, 20, "the scheduler to refuse the pod")
    assert "Insufficient nvidia.com/gpu" in message
    assert read_pod(core, ns, "greedy")["status"]["phase"] == "Pending"


def test_bad_image_reports_pull_errors(core: client.CoreV1Api, kube_namespace: str) -> None:
    ns = kube_namespace
    core.create_namespaced_pod(
        ns, pod_body("badimg", ["sleep", "60"], image="registry.invalid/does-not-exist:1")
    )
    first = wait_for(lambda: waiting_reason(core, ns, "badimg"), 20, "an image pull error")
    assert first in {"ErrImagePull", "ImagePullBackOff"}
    wait_for(lambda: waiting_reason(core, ns, "badimg") == "ImagePullBackOff", 10, "ImagePullBackOff")
    assert "does-not-exist" in container_status(core, ns, "badimg")["state"]["waiting"]["message"]
    assert read_pod(core, ns, "badimg")["status"]["phase"] == "Pending"


def test_missing_command_is_reported(core: client.CoreV1Api, kube_namespace: str) -> None:
    ns = kube_namespace
    body: Any = {"metadata": {"name": "nocmd"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    core.create_namespaced_pod(ns, body)
    wait_for(lambda: waiting_reason(core, ns, "nocmd") == "CreateContainerError", 20, "CreateContainerError")
    assert "command" in container_status(core, ns, "nocmd")["state"]["waiting"]["message"]


def test_crashing_container_restarts_with_backoff(
    kube_cluster: TestCluster, core: client.CoreV1Api, kube_namespace: str
) -> None:
    ns = kube_namespace
    core.create_namespaced_pod(ns, pod_body("crasher", ["sh", "-c", "echo boom; exit 3"]))
    seen: set[str] = set()

    def restarted_twice() -> bool:
        status = container_status(core, ns, "crasher")
        if "waiting" in status.get("state", {}):
            seen.add(status["state"]["waiting"]["reason"])
        return int(status.get("restartCount", 0)) >= 2

    wait_for(restarted_twice, 30, "two restarts")
    last = container_status(core, ns, "crasher")["lastState"]["terminated"]
    assert last["exitCode"] == 3
    assert last["reason"] == "Error"
    assert "CrashLoopBackOff" in seen
    assert kube_cluster.pod_log(ns, "crasher").count("boom") >= 3
    assert read_pod(core, ns, "crasher")["status"]["phase"] == "Running"


def test_deleting_a_pod_kills_its_process(
    kube_cluster: TestCluster, core: client.CoreV1Api, kube_namespace: str
) -> None:
    ns = kube_namespace
    # The second pod ignores SIGTERM: it must be SIGKILLed once its (1 s) grace period is over.
    # "$$$$" because Kubernetes expands $(VAR) in commands and turns "$$" into "$": the shell sees "$$".
    core.create_namespaced_pod(ns, pod_body("sleeper", ["sh", "-c", "echo pid=$$$$; exec sleep 600"]))
    stubborn = "trap '' TERM; echo pid=$$$$; while true; do sleep 0.2; done"
    core.create_namespaced_pod(
        ns, pod_body("stubborn", ["sh", "-c", stubborn], terminationGracePeriodSeconds=1)
    )

    def pid_of(name: str) -> int | None:
        m = re.search(r"pid=(\d+)", kube_cluster.pod_log(ns, name))
        return int(m.group(1)) if m else None

    pids = {name: wait_for(partial(pid_of, name), 20, f"{name} to start") for name in ("sleeper", "stubborn")}
    assert all(pid_alive(p) for p in pids.values())
    started = time.monotonic()
    for name in pids:
        core.delete_namespaced_pod(name, ns)

    def gone(name: str) -> bool:
        try:
            core.read_namespaced_pod(name, ns)
        except ApiException as exc:
            return exc.status == 404
        return False

    for name, pid in pids.items():
        wait_for(partial(gone, name), 15, f"{name} to be deleted")
        assert not pid_alive(pid), f"{name}'s process {pid} survived its pod"
    # Within the capped grace period, not the 30 s default.
    assert time.monotonic() - started < 10


def test_helm_reaches_the_cluster(kube_cluster: TestCluster) -> None:
    done = subprocess.run(
        [str(kube_cluster.helm_path), "list", "--all-namespaces"],
        env=kube_cluster.helm_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("NAME")
