"""Fixtures of the Kubernetes backend tests: the test cluster's real node and a gpufn stack pointed at it.

Pods run for real (containerd + kubelet): functions use the echo example's image from the cluster's registry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from gpufn.kube_inventory import cluster_group_name
from tests.cluster.fixtures import real_cluster
from tests.cluster.harness import TestCluster
from tests.conftest import Stack, running_stack

__all__ = ["echo_fields", "kube_api", "kube_cluster", "kube_stack", "real_cluster"]

START_TIMEOUT = 15.0
"""Seconds a pod may stay not ready: short, so the readiness test is quick, but room for a slow start."""

KUBE_SETTINGS: dict[str, Any] = {
    "kube_image_pull_timeout": 3.0,
    "kube_unschedulable_timeout": 3.0,
    "kube_crash_loop_restarts": 2,
    "kube_termination_grace_seconds": 5,
}
"""Short bounds for the worker, so failure tests end in seconds."""

ECHO_IMAGE = "echo:1"
"""The echo example's image (tests/cluster/images/build.sh): its command serves, streams and probes."""


@pytest.fixture(scope="session")
def kube_cluster(real_cluster: TestCluster) -> TestCluster:
    """These tests' cluster: the one with the real node."""
    return real_cluster


def stack_settings(cluster: TestCluster) -> dict[str, Any]:
    """The worker's settings for the test cluster: short bounds, and its loopback registry over HTTP."""
    return {**KUBE_SETTINGS, "insecure_registries": [cluster.registry_host]}


def echo_image(cluster: TestCluster) -> str:
    """The echo image's reference in the cluster's registry; the worker pins it to its digest at deploy."""
    return cluster.image(ECHO_IMAGE)


def echo_container(cluster: TestCluster, **overrides: Any) -> dict[str, Any]:
    """The create-function fields of the echo image: no `containerArgs`, the image's own command runs."""
    return {"containerImage": echo_image(cluster), "containerArgs": None, **overrides}


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
        **stack_settings(kube_cluster),
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


@pytest.fixture(scope="session")
def echo_fields(kube_cluster: TestCluster) -> dict[str, Any]:
    """The create-function fields that run the echo image (see `echo_container`)."""
    return echo_container(kube_cluster)
