"""Fixtures of the Kubernetes backend tests: the local test cluster and a gpufn stack pointed at it."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

import tests.conftest as root
from gpufn.kube_inventory import cluster_group_name
from tests.cluster.fixtures import kube_cluster
from tests.cluster.harness import TestCluster
from tests.conftest import Stack, running_stack

__all__ = ["kube_api", "kube_cluster", "kube_stack"]

START_TIMEOUT = 8.0
"""Seconds a pod may stay not ready: short, so the readiness test is quick, but room for a slow start."""

KUBE_SETTINGS: dict[str, Any] = {
    "kube_image_pull_timeout": 3.0,
    "kube_unschedulable_timeout": 3.0,
    "kube_crash_loop_restarts": 2,
    "kube_termination_grace_seconds": 5,
    # These tests exercise pods; their image names are placeholders no registry serves. Resolution and
    # pinning against a real registry are tested in tests/registry.
    "resolve_artifacts": False,
}
"""Short bounds for the worker, so failure tests end in seconds."""

ECHO_SERVER = Path(root.ROOT) / "examples" / "echo" / "server.py"


def echo_command() -> str:
    """The echo server's command line for a pod: the fake kubelet runs it in a per-pod directory."""
    return f"{sys.executable} {ECHO_SERVER}"


@pytest.fixture(scope="module")
async def kube_stack(
    temporal_address: str, kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """A gpufn stack (worker process + API) whose only cluster group besides `local` is the test cluster."""
    async with running_stack(
        temporal_address,
        tmp_path_factory.mktemp("gpufn-kube-home"),
        kubeconfigs=[Path(kube_cluster.kubeconfig_path)],
        instance_start_timeout=START_TIMEOUT,
        **KUBE_SETTINGS,
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def kube_api(kube_cluster: TestCluster) -> Iterator[client.ApiClient]:
    """An admin API client of the test cluster."""
    with kube_cluster.api_client() as api:
        yield api


@pytest.fixture(scope="module")
def group(kube_cluster: TestCluster) -> str:
    """The test cluster's cluster group name."""
    return cluster_group_name(Path(kube_cluster.kubeconfig_path))


def gpu_spec(
    group: str, gpus: int = 1, min_instances: int = 1, max_instances: int = 1, **extra: Any
) -> dict[str, Any]:
    """A deployment request for H100s of the test cluster."""
    spec = {
        "gpu": "H100",
        "instanceType": f"{group.upper()}.GPU.H100_{gpus}x",
        "minInstances": min_instances,
        "maxInstances": max_instances,
    }
    spec.update(extra)
    return {"deploymentSpecifications": [spec]}
