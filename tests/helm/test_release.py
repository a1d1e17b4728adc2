"""The Helm backend's pure parts: names, values, the Service's pods and port, Helm's errors, and which backend
of a cluster group serves a version. No cluster needed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pyhelm3 import errors as helm_errors
from temporalio.exceptions import ApplicationError

from activities.helm import HelmBackend
from activities.kube.config import HelmSettings, KubeSettings
from activities.kube.releases import (
    RELEASE_NAME_MAX,
    Release,
    ServiceTarget,
    check_rendered_service,
    helm_error,
    instance_view,
    namespace_manifest,
    release_name,
    release_namespace,
    release_values,
    service_target,
)
from activities.kube_group import KubernetesGroupBackend
from activities.registry import RegistryConfig, RegistryResolver
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    FunctionVersionSpec,
    Health,
    InstanceRecord,
    InstanceStatus,
    PrepareInput,
    PrepareResult,
    VersionRef,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
REF = VersionRef(accountId="acct", functionId="f-1", versionId="0c7c4da0-b3ec-4791-9814-e867c187a208")
SELECTOR = {"app.kubernetes.io/name": "echo", "app.kubernetes.io/instance": "r1"}


def service(ports: list[dict[str, Any]], selector: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo"},
        "spec": {"selector": SELECTOR if selector is None else selector, "ports": ports},
    }


def pod(name: str = "r1-abc", ready: bool = True, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "labels": SELECTOR if labels is None else labels,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"containers": [{"name": "echo", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {
            "phase": "Running",
            "podIP": "127.0.3.7",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [
                {"name": "echo", "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}
            ],
        },
    }


def test_release_names_are_deterministic_and_fit_helm() -> None:
    name = release_name(REF.versionId, 0)
    assert name == f"fn-{REF.versionId}-0" and name == release_name(REF.versionId, 0)
    assert len(release_name("v" * 80, 3)) <= RELEASE_NAME_MAX
    assert release_name("v" * 80, 3) != release_name("v" * 80, 4)
    namespace = release_namespace("gpufn-", REF, 0)
    assert namespace == f"gpufn-acct-{REF.versionId}-0"
    long_account = REF.model_copy(update={"accountId": "a" * 60})
    assert len(release_namespace("gpufn-", long_account, 0)) <= 63


def test_the_instance_count_goes_over_the_configuration() -> None:
    configuration: dict[str, Any] = {"replicaCount": 5, "env": {"A": "1"}, "server": {"port": 9000}}

    assert release_values(configuration, 2, "replicaCount") == {
        "replicaCount": 2,
        "env": {"A": "1"},
        "server": {"port": 9000},
    }
    assert release_values(configuration, 3, "server.replicas")["server"] == {"port": 9000, "replicas": 3}
    assert release_values(None, 0, "a.b") == {"a": {"b": 0}}
    # The deployment's configuration is never changed in place.
    assert configuration["replicaCount"] == 5 and "replicas" not in configuration["server"]


def test_a_namespace_records_its_release() -> None:
    release = Release(name="fn-x-0", namespace="gpufn-acct-x-0", spec_index=0, service="echo", port=8000)
    manifest = namespace_manifest(release, REF)
    assert manifest["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gpufn"
    assert manifest["metadata"]["labels"]["gpufn.io/version-id"] == REF.versionId
    assert Release.of(manifest) == release
    assert Release.of({"metadata": {"name": "gpufn-acct", "labels": {}}}) is None
    deleting = {**manifest, "status": {"phase": "Terminating"}}
    assert (found := Release.of(deleting)) is not None and found.terminating


def test_the_service_port_is_the_inference_port_or_its_only_port() -> None:
    named = service([{"port": 9000, "targetPort": "metrics"}, {"port": 8000, "targetPort": "http"}])
    assert service_target(named, 8000) == ServiceTarget(selector=SELECTOR, target="http")
    by_target = service([{"port": 80, "targetPort": 8000}, {"port": 9000}])
    assert service_target(by_target, 8000) == ServiceTarget(selector=SELECTOR, target=8000)
    only = service([{"port": 80}])
    assert service_target(only, 8000) == ServiceTarget(selector=SELECTOR, target=80)
    assert "has no port 8000" in str(service_target(service([{"port": 80}, {"port": 81}]), 8000))
    assert "no pod selector" in str(service_target(service([{"port": 8000}], selector={}), 8000))


def test_a_chart_must_render_the_named_service() -> None:
    check_rendered_service([None, service([{"port": 8000}])], "echo", 8000)
    with pytest.raises(
        ApplicationError, match=r"renders no Service named 'inference'.*its Services: echo"
    ) as caught:
        check_rendered_service([service([{"port": 8000}])], "inference", 8000)
    assert caught.value.non_retryable


def test_pods_the_service_selects_are_instances_at_their_target_port() -> None:
    target = ServiceTarget(selector=SELECTOR, target="http")
    settings = KubeSettings(start_timeout=60)

    view = instance_view(pod(), NOW, settings, 1, target)
    assert view is not None
    assert (view.record.status, view.record.address, view.record.specIndex) == (
        InstanceStatus.RUNNING,
        "http://127.0.3.7:8080",
        1,
    )
    starting = instance_view(pod(ready=False), NOW, settings, 0, target)
    assert starting is not None and starting.record.status == InstanceStatus.STARTING
    # A pod the Service does not select (a hook's, a database's) is no instance; nor is one being deleted.
    assert instance_view(pod(labels={"job-name": "warm-up"}), NOW, settings, 0, target) is None
    deleting = pod()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:01Z"
    assert instance_view(deleting, NOW, settings, 0, target) is None
    unnamed = instance_view(pod(), NOW, settings, 0, ServiceTarget(selector=SELECTOR, target="grpc"))
    assert unnamed is not None and unnamed.record.address is None


def helm_failure(cls: type[helm_errors.Error], stderr: str) -> helm_errors.Error:
    return cls(1, b"", stderr.encode())


def test_helm_errors_keep_helms_words_and_are_classified() -> None:
    render = helm_error(
        helm_failure(
            helm_errors.FailedToRenderChartError, "Error: execution error at (echo/x.yaml:2:4): boom\n"
        ),
        "render the chart",
    )
    assert render.non_retryable and render.type == "HelmChartRenderFailed"
    assert (
        render.message == "Helm could not render the chart: Error: execution error at (echo/x.yaml:2:4): boom"
    )
    refused = helm_error(
        helm_failure(helm_errors.InvalidResourceError, "Error: Deployment is invalid"), "install"
    )
    assert refused.non_retryable
    for transient in (
        helm_failure(helm_errors.ConnectionError, "Error: etcdserver: request timed out"),
        helm_failure(helm_errors.Error, "Error: Kubernetes cluster unreachable: connection refused"),
        helm_failure(helm_errors.Error, "Error: another operation (install/upgrade/rollback) is in progress"),
    ):
        failure = helm_error(transient, "install")
        assert not failure.non_retryable and failure.type == "HelmUnavailable"
    hook = helm_error(
        helm_failure(helm_errors.Error, "Error: pre-install hook failed: job failed"), "install"
    )
    assert hook.non_retryable and hook.type == "HelmFailed"


class FakeBackend:
    """Records which verbs reached it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        self.calls.append("prepare")
        return PrepareResult(resolvedChart=self.name)

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        self.calls.append("ensure")
        return []

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        self.calls.append("observe")
        return [InstanceRecord(instanceId=self.name, specIndex=0, status=InstanceStatus.RUNNING)]

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        self.calls.append("wait")

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        self.calls.append("teardown")


async def test_a_cluster_group_sends_charts_to_helm_and_asks_both_about_a_version() -> None:
    containers, charts = FakeBackend("containers"), FakeBackend("charts")
    group = KubernetesGroupBackend(containers, charts)
    dspec = DeploymentSpecification(gpu="H100", instanceType="X.GPU.H100_1x", minInstances=1, maxInstances=1)
    base = FunctionVersionSpec(
        id="f-1",
        versionId=REF.versionId,
        ncaId="acct",
        name="echo",
        description="echo",
        inferenceUrl="/echo",
        health=Health(),
        healthUri="/health",
        createdAt=NOW,
    )
    chart = base.model_copy(
        update={"helmChart": "http://charts/echo-0.1.0.tgz", "helmChartServiceName": "echo"}
    )
    container = base.model_copy(update={"containerImage": "nvcr.io/x/echo:1"})

    assert (
        await group.prepare(PrepareInput(ref=REF, spec=chart, deploymentSpec=dspec))
    ).resolvedChart == "charts"
    assert (
        await group.prepare(PrepareInput(ref=REF, spec=container, deploymentSpec=dspec))
    ).resolvedChart == "containers"
    await group.ensure_instances(
        EnsureInstancesInput(ref=REF, spec=chart, deploymentSpec=dspec, specIndex=0, count=1)
    )
    assert [i.instanceId for i in await group.observe(REF, [dspec])] == ["containers", "charts"]
    await group.wait_for_change(REF, 0.1)
    await group.teardown(REF, [dspec])
    assert charts.calls == ["prepare", "ensure", "observe", "wait", "teardown"]
    assert containers.calls == ["prepare", "observe", "wait", "teardown"]


UNREACHABLE_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: nowhere, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: gpufn, user: {token: t}}]
contexts: [{name: gpufn, context: {cluster: nowhere, user: gpufn}}]
current-context: gpufn
"""


async def test_a_worker_without_helm_refuses_charts_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(UNREACHABLE_KUBECONFIG)
    settings = HelmSettings(executable=str(tmp_path / "no-helm-here"), home=tmp_path / "helm")
    async with RegistryResolver(RegistryConfig()) as resolver:
        backend = HelmBackend(kubeconfig, resolver, KubeSettings(), settings)
        await backend.start()
        try:
            dspec = DeploymentSpecification(
                gpu="H100", instanceType="X.GPU.H100_1x", minInstances=1, maxInstances=1
            )
            spec = FunctionVersionSpec(
                id="f-1",
                versionId=REF.versionId,
                ncaId="acct",
                name="echo",
                description="echo",
                inferenceUrl="/echo",
                health=Health(),
                healthUri="/health",
                helmChart="http://127.0.0.1:9/echo-0.1.0.tgz",
                helmChartServiceName="echo",
                createdAt=NOW,
            )
            with pytest.raises(
                ApplicationError, match=r"cannot run on cluster group 'nowhere'.*no-helm-here"
            ) as caught:
                await backend.prepare(PrepareInput(ref=REF, spec=spec, deploymentSpec=dspec))
            assert caught.value.non_retryable and caught.value.type == "HelmUnavailable"
        finally:
            await backend.close()
