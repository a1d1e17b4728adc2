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
from gpufn.settings import Settings
from tests.cluster.fixtures import kube_cluster
from tests.cluster.harness import TestCluster
from tests.conftest import Stack, running_stack

__all__ = ["kube_api", "kube_cluster", "kube_stack"]

START_TIMEOUT = 8.0
"""Seconds a pod may stay not ready: short, so the readiness test is quick, but room for a slow start."""

KUBE_SETTINGS = {
    "GPUFN_KUBE_IMAGE_PULL_TIMEOUT": "3",
    "GPUFN_KUBE_UNSCHEDULABLE_TIMEOUT": "3",
    "GPUFN_KUBE_CRASH_LOOP_RESTARTS": "2",
    "GPUFN_KUBE_TERMINATION_GRACE_SECONDS": "5",
}
"""Short bounds for the worker. `Settings` does not declare the Kubernetes knobs yet, and `settings_env`
passes on only the fields it knows, so they are added to the worker's environment here."""

ECHO_SERVER = Path(root.ROOT) / "examples" / "echo" / "server.py"


def echo_command() -> str:
    """The echo server's command line for a pod: the fake kubelet runs it in a per-pod directory."""
    return f"{sys.executable} {ECHO_SERVER}"


@pytest.fixture(scope="module")
async def kube_stack(
    temporal_address: str, kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """A gpufn stack (worker process + API) whose only cluster group besides `local` is the test cluster."""
    original = root.settings_env

    def with_kube_settings(settings: Settings) -> dict[str, str]:
        env = original(settings)
        env.update(KUBE_SETTINGS)
        return env

    root.settings_env = with_kube_settings
    try:
        async with running_stack(
            temporal_address,
            tmp_path_factory.mktemp("gpufn-kube-home"),
            kubeconfigs=[Path(kube_cluster.kubeconfig_path)],
            instance_start_timeout=START_TIMEOUT,
        ) as stack:
            yield stack
    finally:
        root.settings_env = original


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
