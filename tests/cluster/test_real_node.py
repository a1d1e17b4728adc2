"""The real node: containerd and a kubelet run real containers from images built here.

Nothing is simulated: images come from the cluster's local registry (built by ``images/build.sh`` from
Debian's archive), pull failures come from tags that do not exist, crash loops from a process that exits,
readiness from the kubelet's HTTP probe, and the pods answer on their pod IP on the harness's bridge.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from gpufn.kube_inventory import read_json

from .fixtures import REAL_NODE, wait_for
from .harness import TestCluster, ensure_binaries
from .images import ensure_images
from .node import RealNodeConfig, link_exists, pid_alive, reap_stale_nodes, v1_hierarchies

pytestmark = pytest.mark.kubernetes

NODE = REAL_NODE


@pytest.fixture(scope="module")
def cluster(real_cluster: TestCluster) -> TestCluster:
    """The session's cluster whose only node is the real one."""
    return real_cluster


@pytest.fixture
def core(cluster: TestCluster) -> Iterator[client.CoreV1Api]:
    with cluster.api_client() as api_client:
        yield client.CoreV1Api(api_client)


@pytest.fixture
def namespace(cluster: TestCluster, core: client.CoreV1Api) -> Iterator[str]:
    """A fresh namespace; its pods are deleted and gone from the node after the test (GPUs freed)."""
    name = f"t-{os.urandom(4).hex()}"
    cluster.create_namespace(name)
    yield name
    core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
    wait_for(lambda: not read_json(core.list_namespaced_pod, name)["items"], 60, f"the pods of {name} to go")


def echo_pod(name: str, image: str, **container: Any) -> Any:
    """A pod running the echo example, probed for readiness on /health."""
    spec: dict[str, Any] = {
        "name": "echo",
        "image": image,
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1},
    }
    spec.update(container)
    return {
        "metadata": {"name": name},
        "spec": {"containers": [spec], "terminationGracePeriodSeconds": 1},
    }


def pod_status(core: client.CoreV1Api, ns: str, name: str) -> dict[str, Any]:
    return dict(read_json(core.read_namespaced_pod, name, ns).get("status", {}))


def first_container(core: client.CoreV1Api, ns: str, name: str) -> dict[str, Any]:
    statuses = pod_status(core, ns, name).get("containerStatuses") or [{}]
    return dict(statuses[0])


def test_node_is_ready_with_gpus_and_feature_discovery_labels(core: client.CoreV1Api) -> None:
    node = read_json(core.read_node, NODE.name)
    labels = node["metadata"]["labels"]
    assert labels["nvidia.com/gpu.present"] == "true"
    assert labels["nvidia.com/gpu.product"] == NODE.gpu_product
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.20.2"
    assert [c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready"] == ["True"]


def test_gpus_come_from_the_device_plugin_and_reach_the_pod_that_asks(
    cluster: TestCluster, core: client.CoreV1Api, namespace: str
) -> None:
    plugin = cluster.device_plugin
    assert plugin is not None
    # The kubelet has the plugin's devices: the capacity it reports is theirs (no patch of the node status).
    assert len(plugin.device_ids) == NODE.gpus
    node = read_json(core.read_node, NODE.name)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == str(NODE.gpus)
    pod = echo_pod("two-gpus", cluster.image("echo:1"), resources={"limits": {"nvidia.com/gpu": "2"}})
    core.create_namespaced_pod(namespace, pod)
    wait_for(
        lambda: first_container(core, namespace, "two-gpus").get("ready"), 90, "the two-GPU pod to be ready"
    )
    environ = cluster.pod_environ(namespace, "two-gpus")
    [visible] = [e.split("=", 1)[1] for e in environ if e.startswith("NVIDIA_VISIBLE_DEVICES=")]
    # The kubelet asked the plugin to allocate two of its devices, and gave the container the answer.
    devices = visible.split(",")
    assert len(devices) == 2 and set(devices) <= set(plugin.device_ids)
    assert devices in plugin.allocations


def test_echo_image_runs_becomes_ready_by_probe_and_serves_on_its_pod_ip(
    cluster: TestCluster, core: client.CoreV1Api, namespace: str
) -> None:
    image = cluster.image("echo:1")
    core.create_namespaced_pod(
        namespace, echo_pod("echo", image, resources={"limits": {"nvidia.com/gpu": "1"}})
    )
    status = wait_for(
        lambda: (
            (s := pod_status(core, namespace, "echo")).get("containerStatuses", [{}])[0].get("ready") and s
        ),
        90,
        "the echo pod to pass its readiness probe",
    )
    assert status["phase"] == "Running"
    pod_ip = status["podIP"]
    assert cluster.node is not None
    assert ipaddress.ip_address(pod_ip) in cluster.node.subnet and pod_ip != cluster.node.node_ip
    request = urllib.request.Request(
        f"http://{pod_ip}:8000/echo", data=b'{"hello": "pod"}', headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert json.loads(resp.read()) == {"hello": "pod"}
    # The streaming side of the example: server-sent events, one per requested event.
    stream = urllib.request.Request(
        f"http://{pod_ip}:8000/echo",
        data=json.dumps({"stream": 3, "intervalSeconds": 0.01}).encode(),
        headers={"Accept": "text/event-stream"},
    )
    with urllib.request.urlopen(stream, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert [json.loads(e.removeprefix("data: ")) for e in events] == [{"event": n} for n in range(3)]


def test_gpu_requests_are_accounted_by_the_scheduler(
    cluster: TestCluster, core: client.CoreV1Api, namespace: str
) -> None:
    image = cluster.image("echo:1")
    big = echo_pod("all-gpus", image, resources={"limits": {"nvidia.com/gpu": "8"}})
    core.create_namespaced_pod(namespace, big)
    wait_for(
        lambda: pod_status(core, namespace, "all-gpus").get("phase") == "Running", 90, "8-GPU pod running"
    )
    core.create_namespaced_pod(
        namespace, echo_pod("one-more", image, resources={"limits": {"nvidia.com/gpu": "1"}})
    )

    def unschedulable() -> str | None:
        for condition in pod_status(core, namespace, "one-more").get("conditions") or []:
            if condition["type"] == "PodScheduled" and condition["status"] == "False":
                return str(condition.get("message", ""))
        return None

    message = wait_for(unschedulable, 30, "the scheduler to refuse the 9th GPU")
    assert "Insufficient nvidia.com/gpu" in message
    core.delete_namespaced_pod("all-gpus", namespace)
    wait_for(
        lambda: pod_status(core, namespace, "one-more").get("phase") == "Running", 90, "the freed GPUs used"
    )


def test_a_missing_tag_fails_to_pull(cluster: TestCluster, core: client.CoreV1Api, namespace: str) -> None:
    cluster.image("echo:1")  # the repository exists; only the tag does not
    core.create_namespaced_pod(namespace, echo_pod("missing", f"{cluster.registry_host}/echo:no-such-tag"))
    reason = wait_for(
        lambda: (
            first_container(core, namespace, "missing").get("state", {}).get("waiting", {}).get("reason")
            in {"ErrImagePull", "ImagePullBackOff"}
            and first_container(core, namespace, "missing")["state"]["waiting"]
        ),
        60,
        "the pull to fail",
    )
    assert "not found" in reason.get("message", "")


def test_an_exiting_process_crash_loops_and_its_logs_are_readable(
    cluster: TestCluster, core: client.CoreV1Api, namespace: str
) -> None:
    pod = echo_pod("crasher", cluster.image("echo:1"), command=["sh", "-c", "echo starting up; exit 3"])
    core.create_namespaced_pod(namespace, pod)
    status = wait_for(
        lambda: (
            (s := first_container(core, namespace, "crasher")).get("restartCount", 0) >= 1
            and s.get("lastState", {}).get("terminated")
            and s
        ),
        90,
        "a restart after the exit",
    )
    assert status["lastState"]["terminated"]["exitCode"] == 3
    wait_for(
        lambda: (
            first_container(core, namespace, "crasher").get("state", {}).get("waiting", {}).get("reason")
            == "CrashLoopBackOff"
        ),
        60,
        "CrashLoopBackOff",
    )
    # kubectl logs goes API server -> kubelet on the node IP: the real node serves it.
    logs = subprocess.run(
        [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig_path}", "-n", namespace,
         "logs", "crasher", "--previous"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.strip() == "starting up"


# --- cleanup -----------------------------------------------------------------------------------------------


def leftovers(workdir: Path, cgroup: str, bridge: str, pids: list[int]) -> list[str]:
    """What a stopped cluster left behind: processes, cgroups, the bridge, mounts, its directory."""
    found = [f"process {pid}" for pid in pids if pid_alive(pid) and not _is_zombie(pid)]
    found += [
        str(h / cgroup) for h in [*v1_hierarchies(), Path("/sys/fs/cgroup/unified")] if (h / cgroup).exists()
    ]
    if link_exists(bridge):
        found.append(f"bridge {bridge}")
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line}" for line in mounts.splitlines() if str(workdir) in line]
    if workdir.exists():
        found.append(f"directory {workdir}")
    return found


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def node_pids(cgroup: str) -> list[int]:
    """Every process in the node's cgroup subtree (containerd, shims, kubelet, containers)."""
    pids = []
    top = Path("/sys/fs/cgroup/pids") / cgroup
    for root, _dirs, _files in os.walk(top):
        pids += [int(p) for p in (Path(root) / "cgroup.procs").read_text().split()]
    return pids


def run_pod_until_running(cluster: TestCluster) -> None:
    cluster.create_namespace("work")
    with cluster.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        core.create_namespaced_pod("work", echo_pod("echo", cluster.image("echo:1")))
        wait_for(lambda: pod_status(core, "work", "echo").get("phase") == "Running", 90, "the pod to run")


def test_stop_leaves_no_process_cgroup_bridge_or_mount() -> None:
    ensure_binaries()
    ensure_images()
    with TestCluster(real_node=RealNodeConfig(name="cleanup-node")) as cluster:
        run_pod_until_running(cluster)
        assert cluster.node is not None
        workdir, cgroup, bridge = cluster.workdir, cluster.node.cgroup, cluster.node.bridge
        pids = node_pids(cgroup)
        # containerd, its shim(s), the kubelet, the sandbox and the echo server at least.
        assert len(pids) >= 5
    assert leftovers(workdir, cgroup, bridge, pids) == []


# Run in a child process that the test SIGKILLs: no stop(), no atexit.
CHILD = """
import json, sys, time
from tests.cluster.harness import TestCluster
from tests.cluster.node import RealNodeConfig
from tests.cluster.test_real_node import node_pids, run_pod_until_running
cluster = TestCluster(real_node=RealNodeConfig(name="orphan-node")).start()
run_pod_until_running(cluster)
node = cluster.node
print(json.dumps({"workdir": str(cluster.workdir), "cgroup": node.cgroup, "bridge": node.bridge,
                  "pids": node_pids(node.cgroup)}), flush=True)
time.sleep(3600)
"""


def test_a_killed_test_process_is_cleaned_up_by_the_next_run() -> None:
    ensure_binaries()
    ensure_images()
    repo_root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=repo_root,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        state = json.loads(child.stdout.readline())
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    workdir = Path(state["workdir"])
    # The kill left everything running: that is what the next run has to clean.
    assert leftovers(workdir, state["cgroup"], state["bridge"], state["pids"])
    assert state["cgroup"] in reap_stale_nodes()
    assert leftovers(workdir, state["cgroup"], state["bridge"], state["pids"]) == []
