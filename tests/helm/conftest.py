"""Fixtures of the Helm-chart function tests: the test cluster's real node, a loopback chart repository
serving the echo example chart (examples/echo-chart), and a gpufn stack whose worker finds the cluster's
helm on its PATH. The charts' pods run the echo image from the cluster's registry."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

import tests.conftest as root
from tests.cluster.harness import TestCluster
from tests.conftest import Stack, running_stack
from tests.kubernetes.conftest import (
    ECHO_IMAGE,
    START_TIMEOUT,
    group,
    kube_api,
    kube_cluster,
    real_cluster,
    stack_settings,
)
from tests.registry.servers import StaticServer

__all__ = ["group", "kube_api", "kube_cluster", "real_cluster"]

ECHO_CHART = Path(root.ROOT) / "examples" / "echo-chart"
CHART_PATH = "/charts/echo-0.1.0.tgz"
SLOW_CHART_PATH = "/slow/echo-0.1.0.tgz"
SIDECAR_CHART_PATH = "/sidecar/echo-0.1.0.tgz"
SLOW_INSTALL_HOOK = """\
# A pre-install hook that takes a while: helm keeps the release pending-install until it is done.
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ .Release.Name }}-warm-up
  annotations:
    helm.sh/hook: pre-install
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: warm-up
          image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
          command: {{ toJson .Values.warmUpCommand }}
"""


def package_chart(directory: Path, extra: Mapping[str, str] | None = None) -> bytes:
    """Return a chart directory as a chart archive (`<name>/...` in a gzipped tar), plus `extra` files."""
    name = yaml.safe_load((directory / "Chart.yaml").read_text())["name"]
    files = {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }
    files.update({path: text.encode() for path, text in (extra or {}).items()})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{name}/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0)


def chart_with_init_and_sidecar() -> bytes:
    """The echo chart whose pod also has an init container that writes a file into a shared volume, and a
    second container that prints that file and stays up (both run the chart's image)."""
    template = (ECHO_CHART / "templates" / "deployment.yaml").read_text()
    containers = "      containers:\n        - name: echo\n"
    assert containers in template
    image = '"{{ .Values.image.repository }}:{{ .Values.image.tag }}"'
    extra = f"""      volumes:
        - name: models
          emptyDir: {{}}
      initContainers:
        - name: fetch-model
          image: {image}
          command: ["sh", "-c", "echo weights-ready > /models/model.txt"]
          volumeMounts:
            - name: models
              mountPath: /models
      containers:
        - name: sidecar
          image: {image}
          command: ["sh", "-c", "cat /models/model.txt; exec sleep infinity"]
          volumeMounts:
            - name: models
              mountPath: /models
        - name: echo
"""
    return package_chart(ECHO_CHART, {"templates/deployment.yaml": template.replace(containers, extra)})


def echo_values(cluster: TestCluster, **extra: Any) -> dict[str, Any]:
    """A deployment `configuration` running the echo image from the cluster's registry (its own command),
    whose pods are given little time to stop (as gpufn's own pods are in these tests)."""
    repository, tag = cluster.image(ECHO_IMAGE).rsplit(":", 1)
    image = {"repository": repository, "tag": tag}
    return {"image": image, "command": [], "terminationGracePeriodSeconds": 5, **extra}


def helm_function(name: str, chart_url: str, **overrides: Any) -> dict[str, Any]:
    """A create-function body for the echo chart (its Service is `echo`, port 8000)."""
    body: dict[str, Any] = {
        "name": name,
        "inferenceUrl": "/echo",
        "inferencePort": 8000,
        "helmChart": chart_url,
        "helmChartServiceName": "echo",
        "health": {
            "protocol": "HTTP",
            "uri": "/health",
            "port": 8000,
            "timeout": "PT5S",
            "expectedStatusCode": 200,
        },
    }
    body.update(overrides)
    return body


def run_helm(cluster: TestCluster, *args: str) -> Any:
    """Run the cluster's helm with JSON output and return it parsed."""
    done = subprocess.run(
        [str(cluster.helm_path), *args, "--output", "json"],
        capture_output=True,
        text=True,
        env=cluster.helm_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout or "null")


@pytest.fixture(scope="module")
async def charts() -> AsyncIterator[StaticServer]:
    """A chart server on loopback: the echo example chart, and a variant whose install is slow."""
    server = StaticServer(
        {
            CHART_PATH: package_chart(ECHO_CHART),
            SLOW_CHART_PATH: package_chart(ECHO_CHART, {"templates/warm-up.yaml": SLOW_INSTALL_HOOK}),
            SIDECAR_CHART_PATH: chart_with_init_and_sidecar(),
        }
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def helm_stack(
    temporal_address: str, kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """A gpufn stack whose only cluster group besides `local` is the test cluster, with its helm."""
    async with running_stack(
        temporal_address,
        tmp_path_factory.mktemp("gpufn-helm-home"),
        kubeconfigs=[Path(kube_cluster.kubeconfig_path)],
        instance_start_timeout=START_TIMEOUT,
        helm_executable=str(kube_cluster.helm_path),
        **stack_settings(kube_cluster),
    ) as stack:
        yield stack
