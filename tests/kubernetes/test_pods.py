"""The Kubernetes backend's pure parts: pods as instances, manifests, names, inventory (no cluster needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from activities.kube.config import KubeSettings
from activities.kube.errors import api_error
from activities.kube.manifests import deployment_manifest
from activities.kube.names import (
    CONTAINER,
    ROLE_INSTANCE,
    ROLE_LABEL,
    ROLE_RELEASED,
    SPEC_LABEL,
    VERSION_LABEL,
    deployment_name,
    dns_label,
    label_value,
    namespace_name,
)
from activities.kube.pods import view_pod
from gpufn.kube_inventory import (
    KubeconfigError,
    cluster_group,
    cluster_group_name,
    cluster_group_names,
    gpu_nodes,
    instance_type_name,
    kube_cluster_groups,
    parse_instance_type,
    products_of,
)
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    EnvironmentEntry,
    FunctionVersionSpec,
    Health,
    InstanceStatus,
    PrepareResult,
    VersionRef,
)

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
BOUNDS = KubeSettings(
    image_pull_timeout=60, unschedulable_timeout=600, crash_loop_restarts=3, start_timeout=300
)


def stamp(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(
    *,
    age: float = 10,
    phase: str = "Pending",
    conditions: list[dict[str, Any]] | None = None,
    container: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    deleting: bool = False,
    reason: str | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if phase != "Pending" or container:
        status["podIP"] = "10.0.0.7"
    if container is not None:
        status["containerStatuses"] = [{"name": CONTAINER, "restartCount": 0, **container}]
    if reason:
        status["reason"] = reason
        status["message"] = message
    meta: dict[str, Any] = {
        "name": "fn-v-0-abc-xyz",
        "uid": "uid-1",
        "creationTimestamp": stamp(age),
        "labels": {VERSION_LABEL: "v", SPEC_LABEL: "1", ROLE_LABEL: ROLE_INSTANCE, **(labels or {})},
    }
    if deleting:
        meta["deletionTimestamp"] = stamp(0)
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": CONTAINER, "ports": [{"containerPort": 8000}]}]},
        "status": status,
    }


def ready(value: bool, since: float = 5, reason: str = "ContainersNotReady") -> list[dict[str, Any]]:
    conditions = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp(9)}]
    ready_condition: dict[str, Any] = {
        "type": "Ready",
        "status": "True" if value else "False",
        "lastTransitionTime": stamp(since),
    }
    if not value:
        ready_condition.update(reason=reason, message=f"containers with unready status: [{CONTAINER}]")
    return [*conditions, ready_condition]


def running(started: float = 5) -> dict[str, Any]:
    return {"state": {"running": {"startedAt": stamp(started)}}}


def status_and_error(p: dict[str, Any], bounds: KubeSettings = BOUNDS) -> tuple[InstanceStatus, str | None]:
    view = view_pod(p, NOW, bounds)
    assert view is not None
    return view.record.status, view.record.error


def test_running_and_ready_pod_is_running_with_its_address() -> None:
    view = view_pod(pod(phase="Running", conditions=ready(True), container=running()), NOW, BOUNDS)
    assert view is not None
    assert view.record.status == InstanceStatus.RUNNING
    assert view.record.address == "http://10.0.0.7:8000"
    assert view.record.instanceId == "fn-v-0-abc-xyz"
    assert view.record.specIndex == 1
    assert view.record.error is None


def test_deleted_and_released_pods_are_not_instances() -> None:
    assert view_pod(pod(deleting=True), NOW, BOUNDS) is None
    assert view_pod(pod(labels={ROLE_LABEL: ROLE_RELEASED}), NOW, BOUNDS) is None


def test_unschedulable_pod_explains_itself_then_errors_after_the_bound() -> None:
    unschedulable = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
            "lastTransitionTime": stamp(10),
        }
    ]
    view = view_pod(pod(age=10, conditions=unschedulable), NOW, BOUNDS)
    assert view is not None
    assert view.record.status == InstanceStatus.STARTING
    assert view.record.error == "Unschedulable: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    assert view.deadline == NOW - timedelta(seconds=10) + timedelta(seconds=600)
    state, error = status_and_error(pod(age=601, conditions=unschedulable))
    assert state == InstanceStatus.ERRORED
    assert error is not None and "could not be scheduled for more than 600 s" in error
    assert "Insufficient nvidia.com/gpu" in error


def test_image_pull_failure_is_bounded_from_scheduling() -> None:
    waiting = {"state": {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}}}
    state, error = status_and_error(pod(age=100, conditions=ready(False, since=30)[:1], container=waiting))
    # Scheduled 9 s ago: within the 60 s bound, whatever the pod's age.
    assert state == InstanceStatus.STARTING
    assert error == 'ImagePullBackOff: Back-off pulling image "x"'
    state, error = status_and_error(pod(age=100, container=waiting), KubeSettings(image_pull_timeout=5))
    assert state == InstanceStatus.ERRORED
    assert error is not None and "could not pull its image for more than 5 s" in error


def test_invalid_image_name_errors_at_once() -> None:
    waiting = {"state": {"waiting": {"reason": "InvalidImageName", "message": "bad ref"}}}
    assert status_and_error(pod(age=1, container=waiting))[0] == InstanceStatus.ERRORED


def test_crash_loop_errors_after_the_configured_crashes() -> None:
    crashed = {
        "restartCount": 1,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
        "lastState": {"terminated": {"exitCode": 3, "reason": "Error"}},
    }
    state, error = status_and_error(pod(phase="Running", conditions=ready(False), container=crashed))
    assert state == InstanceStatus.STARTING
    assert error == "CrashLoopBackOff: container exited with code 3 (Error); 2 crashes"
    view = view_pod(
        pod(phase="Running", conditions=ready(False), container={**crashed, "restartCount": 2}), NOW, BOUNDS
    )
    assert view is not None and view.record.status == InstanceStatus.ERRORED and view.crashed
    assert view.record.error is not None and "CrashLoopBackOff" in view.record.error


def test_restarted_container_that_runs_again_is_starting() -> None:
    restarted = {**running(1), "restartCount": 5, "lastState": {"terminated": {"exitCode": 137}}}
    state, error = status_and_error(pod(phase="Running", conditions=ready(False), container=restarted))
    assert state == InstanceStatus.STARTING
    assert error is not None and "exited with code 137" in error


def test_not_ready_past_the_start_timeout_is_errored() -> None:
    state, error = status_and_error(
        pod(phase="Running", conditions=ready(False, since=5), container=running(5))
    )
    assert (state, error) == (InstanceStatus.STARTING, None)
    state, error = status_and_error(
        pod(phase="Running", conditions=ready(False, since=301), container=running(301))
    )
    assert state == InstanceStatus.ERRORED
    assert error is not None and "did not pass its readiness probe within 300 s" in error


def test_pod_that_stopped_being_ready_counts_from_then() -> None:
    # Started an hour ago, unready for 10 s: starting (not serving), not failed.
    p = pod(phase="Running", conditions=ready(False, since=10), container=running(3600))
    assert status_and_error(p) == (InstanceStatus.STARTING, None)


def test_evicted_pod_is_errored() -> None:
    p = pod(phase="Failed", reason="Evicted", message="The node was low on resource: memory.")
    state, error = status_and_error(p)
    assert state == InstanceStatus.ERRORED
    assert error == "Pod fn-v-0-abc-xyz failed: Evicted: The node was low on resource: memory."


def test_names_are_dns_safe_deterministic_and_short() -> None:
    version = "0b4c0c52-1a2b-4c3d-8e9f-001122334455"
    assert deployment_name(version, 0) == f"fn-{version}-0"
    assert deployment_name(version, 0) == deployment_name(version, 0)
    assert len(deployment_name(version, 12)) <= 46
    assert namespace_name("gpufn-", "gpufn-admin") == "gpufn-gpufn-admin"
    odd = namespace_name("gpufn-", "Org_With.Dots/" + "x" * 80)
    assert len(odd) <= 63 and odd == dns_label("gpufn-Org_With.Dots/" + "x" * 80)
    assert odd != namespace_name("gpufn-", "org-with-dots-" + "x" * 80)
    value = label_value("a" * 70)
    assert len(value) <= 63 and value[-1].isalnum()


def test_deployment_manifest_asks_for_gpus_on_the_right_nodes() -> None:
    ref = VersionRef(accountId="acct", functionId="fn-1", versionId="v-1")
    spec = FunctionVersionSpec(
        id="fn-1",
        versionId="v-1",
        ncaId="acct",
        name="echo",
        description="",
        inferenceUrl="/echo",
        inferencePort=9000,
        health=Health(uri="/ready", port=9001, timeout="PT3S"),
        healthUri="/ready",
        containerImage="nvcr.io/x/echo:1",
        containerArgs="python server.py --name 'two words' --cost $(HOME)",
        containerEnvironment=[EnvironmentEntry(key="MODE", value="fast")],
        encryptedSecrets={"TOKEN": "sealed"},
        createdAt=NOW,
    )
    dspec = DeploymentSpecification(
        gpu="H100", instanceType="PROD.GPU.H100_2x", minInstances=1, maxInstances=2, clusterGroup="prod"
    )
    request = EnsureInstancesInput(
        ref=ref,
        spec=spec,
        deploymentSpec=dspec,
        specIndex=0,
        count=3,
        prepared=PrepareResult(resolvedImage="nvcr.io/x/echo@sha256:abc"),
    )
    manifest = deployment_manifest(
        request=request,
        name="fn-v-1-0",
        namespace="gpufn-acct",
        gpus=2,
        products=["NVIDIA-H100-80GB-HBM3"],
        secret_name="fn-v-1-0",
        cluster_group="prod",
        settings=KubeSettings(runtime_class="nvidia"),
    )
    assert manifest["spec"]["replicas"] == 3
    template = manifest["spec"]["template"]
    selector = manifest["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert template["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gpufn"
    assert template["metadata"]["labels"]["gpufn.io/account"] == "acct"
    pod_spec = template["spec"]
    assert pod_spec["runtimeClassName"] == "nvidia"
    assert pod_spec["automountServiceAccountToken"] is False
    [term] = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}
    ]
    [container] = pod_spec["containers"]
    assert container["image"] == "nvcr.io/x/echo@sha256:abc"
    assert container["command"] == ["python", "server.py", "--name", "two words", "--cost", "$$(HOME)"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert container["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    probe = container["readinessProbe"]
    assert probe["httpGet"] == {"path": "/ready", "port": 9001, "scheme": "HTTP"}
    assert probe["timeoutSeconds"] == 3
    env = {e["name"]: e for e in container["env"]}
    assert env["MODE"]["value"] == "fast"
    assert env["TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "fn-v-1-0", "key": "TOKEN"}}
    assert "value" not in env["TOKEN"]
    assert env["PORT"]["value"] == "9000" and env["HOST"]["value"] == "0.0.0.0"
    assert env["NVCF_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["NVCF_INSTANCETYPE"]["value"] == "PROD.GPU.H100_2x"


def test_api_errors_are_classified() -> None:
    invalid = api_error(ApiException(status=422, reason="Unprocessable Entity"), "create a Deployment")
    assert invalid.non_retryable and invalid.type == "KubernetesInvalid"
    forbidden = api_error(ApiException(status=403, reason="Forbidden"), "create a Deployment")
    assert forbidden.non_retryable and forbidden.type == "KubernetesForbidden"
    for status in (500, 503, 429, 409, 401):
        assert not api_error(ApiException(status=status, reason="x"), "do it").non_retryable
    terminating = ApiException(status=403, reason="Forbidden")
    terminating.body = '{"message": "namespace gpufn-a is being terminated"}'
    assert not api_error(terminating, "create a Deployment").non_retryable


def node(
    name: str, product: str | None, gpus: int, ready: bool = True, cordoned: bool = False
) -> dict[str, Any]:
    labels = {"nvidia.com/gpu.product": product} if product else {}
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"unschedulable": cordoned},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)} if gpus else {},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_cluster_group_from_node_labels_and_capacity() -> None:
    nodes = gpu_nodes(
        [
            node("a", "NVIDIA-H100-80GB-HBM3", 8),
            node("b", "NVIDIA-H100-80GB-HBM3", 8, cordoned=True),
            node("c", "NVIDIA-L40S", 4),
            node("d", "NVIDIA-H100-NVL", 2),
            node("cpu", None, 0),
        ]
    )
    assert [n.name for n in nodes] == ["a", "b", "c", "d"]
    assert products_of(nodes, "H100") == ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-NVL"]
    group = cluster_group("prod-east", nodes, "v1.29.1")
    assert group["name"] == "prod-east"
    assert group["clusters"] == [{"id": "prod-east", "name": "prod-east", "k8sVersion": "v1.29.1"}]
    gpus = {g["name"]: g for g in group["gpus"]}
    assert gpus["H100"]["capacity"] == 10  # the cordoned node's 8 do not count
    assert [t["name"] for t in gpus["H100"]["instanceTypes"]] == [
        "PROD-EAST.GPU.H100_1x",
        "PROD-EAST.GPU.H100_2x",
        "PROD-EAST.GPU.H100_4x",
        "PROD-EAST.GPU.H100_8x",
    ]
    assert [t["name"] for t in gpus["L40S"]["instanceTypes"]][-1] == "PROD-EAST.GPU.L40S_4x"


def test_instance_type_names_round_trip() -> None:
    name = instance_type_name("gpufn-test", "H100", 4)
    assert name == "GPUFN-TEST.GPU.H100_4x"
    assert parse_instance_type("gpufn-test", name) == ("H100", 4)
    assert parse_instance_type("other", name) is None
    assert parse_instance_type("gpufn-test", "GPUFN-TEST.GPU.H100_0x") is None


def kubeconfig(path: Path, cluster: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": cluster, "user": "u"}}],
        "current-context": "c",
    }
    path.write_text(json.dumps(config))
    return path


def test_cluster_group_names_come_from_the_current_context(tmp_path: Path) -> None:
    eks = kubeconfig(tmp_path / "a.yaml", "arn:aws:eks:us-west-2:123:cluster/prod")
    assert cluster_group_name(eks) == "arn-aws-eks-us-west-2-123-cluster-prod"
    twin = kubeconfig(tmp_path / "b.yaml", "arn:aws:eks:us-west-2:123:cluster/prod")
    with pytest.raises(KubeconfigError, match="all name cluster"):
        cluster_group_names([eks, twin])
    with pytest.raises(KubeconfigError, match="local group"):
        cluster_group_names([kubeconfig(tmp_path / "c.yaml", "local")])
    with pytest.raises(KubeconfigError, match="Cannot read"):
        cluster_group_name(tmp_path / "missing.yaml")


def test_an_unreachable_cluster_is_a_group_without_gpus(tmp_path: Path) -> None:
    groups = kube_cluster_groups([], [kubeconfig(tmp_path / "a.yaml", "down")], refresh_seconds=3600)
    [group] = groups.as_json()["clusterGroups"]
    assert group["name"] == "down" and group["gpus"] == []
