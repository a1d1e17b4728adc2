"""Pytest fixtures for tests that need the local Kubernetes cluster.

Import them into a test module or a ``conftest.py``::

    from tests.cluster.fixtures import kube_cluster, kube_namespace  # noqa: F401

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


# One cluster per test process, shared by every place that imports the fixture. Pytest makes a separate
# session fixture of each module or conftest that imports ``kube_cluster``; without this they would each
# boot a cluster. The last one to tear down stops it.
_shared: TestCluster | None = None
_users = 0


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[TestCluster]:
    """The started cluster, for the whole session (builds the binaries first if they are missing)."""
    global _shared, _users
    if os.environ.get("GPUFN_KUBE_TESTS") == "0":
        pytest.skip("GPUFN_KUBE_TESTS=0")
    if _shared is None:
        ensure_binaries()
        _shared = TestCluster().start()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            _shared.stop()
            _shared = None


@pytest.fixture
def kube_namespace(kube_cluster: TestCluster) -> Iterator[str]:
    """A fresh namespace, ready for pods; deleted (without waiting) after the test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube_cluster.create_namespace(name)
    yield name
    with kube_cluster.api_client() as api_client:
        client.CoreV1Api(api_client).delete_namespace(name)
