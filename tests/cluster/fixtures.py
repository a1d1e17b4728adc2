"""Pytest fixtures for tests that need the local Kubernetes cluster.

Import them into a test module or a ``conftest.py``::

    from tests.cluster.fixtures import real_cluster, kube_namespace  # noqa: F401

Tests using them should carry ``@pytest.mark.kubernetes``. Set ``GPUFN_KUBE_TESTS=0`` to skip them instead
of building and booting the cluster.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from kubernetes import client

from .harness import TestCluster, ensure_binaries
from .images import ensure_images
from .node import RealNodeConfig

T = TypeVar("T")


def wait_for(fn: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``fn`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")


REAL_NODE = RealNodeConfig(name="gpu-node-1", gpus=8)
"""The real cluster's only node: containerd + kubelet, 8 H100s advertised."""

# One cluster per test process, shared by every place that imports the fixture. Pytest makes a separate
# session fixture of each module or conftest that imports one; without this they would each boot a cluster.
# The last user to tear down stops it.
_shared: list[TestCluster] = []
_users = 0


@pytest.fixture(scope="session")
def real_cluster() -> Iterator[TestCluster]:
    """The cluster whose only node is real (``REAL_NODE``), for the whole session: pods run images from its
    registry (``real_cluster.image("echo:1")``). Builds the binaries and images first if they are missing."""
    global _users
    if os.environ.get("GPUFN_KUBE_TESTS") == "0":
        pytest.skip("GPUFN_KUBE_TESTS=0")
    if not _shared:
        ensure_binaries()
        ensure_images()
        _shared.append(TestCluster(real_node=REAL_NODE).start())
    _users += 1
    try:
        yield _shared[0]
    finally:
        _users -= 1
        if _users == 0:
            _shared.pop().stop()


@pytest.fixture
def kube_namespace(real_cluster: TestCluster) -> Iterator[str]:
    """A fresh namespace, ready for pods; deleted (without waiting) after the test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    real_cluster.create_namespace(name)
    yield name
    with real_cluster.api_client() as api_client:
        client.CoreV1Api(api_client).delete_namespace(name)
