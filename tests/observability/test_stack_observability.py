"""Metrics and request records of a whole stack: real Temporal dev server, worker process, API over HTTP.

Nothing is mocked: a user deploys the echo example on the local backend, invokes it, reads the request's
record, and an operator scrapes the API's and the worker's keyless metrics ports and the SDK's.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Stack, cpu_spec, echo_function, eventually, free_port, running_stack
from tests.lifecycle.helpers import deployment_path, pexec

ACCOUNT = "obs-account"
INVOKER_SCOPES = ["register_function", "list_functions", "deploy_function", "invoke_function"]


@pytest.fixture(scope="module")
async def observed(temporal_address: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A stack whose API, worker and Temporal SDK serve metrics on their own loopback ports."""
    ports = {name: free_port() for name in ("api", "worker", "sdk")}
    async with running_stack(
        temporal_address,
        Path(tmp_path_factory.mktemp("gpufn-observed")),
        api_metrics_address=f"127.0.0.1:{ports['api']}",
        worker_metrics_address=f"127.0.0.1:{ports['worker']}",
        worker_sdk_metrics_address=f"127.0.0.1:{ports['sdk']}",
    ) as stack:
        yield stack


def dashboard_names(prefix: str) -> set[str]:
    """Return the metric names with `prefix` that the Grafana dashboard's queries use."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "gpufn.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return {name for expr in exprs for name in re.findall(rf"\b{prefix}\w+", expr)}


def metrics_url(address: str | None) -> str:
    assert address is not None
    return f"http://{address}/metrics"


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200, response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Return the sum of the samples named `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


async def test_records_and_metrics_of_a_deployed_function(observed: Stack) -> None:
    stack = observed
    key = await stack.create_key(ACCOUNT, INVOKER_SCOPES)
    other = await stack.create_key("someone-else", INVOKER_SCOPES)
    user = {"Authorization": f"Bearer {key}"}
    created = await stack.http.post("/v2/nvcf/functions", json=echo_function("observed"), headers=user)
    assert created.status_code == 200, created.text
    function = created.json()["function"]
    deployed = await stack.http.post(deployment_path(function), json=cpu_spec(1, 1), headers=user)
    assert deployed.status_code == 200, deployed.text

    async def active() -> bool:
        response = await stack.http.get(deployment_path(function), headers=user)
        return bool(response.json()["deployment"]["functionStatus"] == "ACTIVE")

    await eventually(active, timeout=30)

    answers = [
        await stack.http.post(pexec(function), json={"n": n}, headers={**user, "NVCF-POLL-SECONDS": "10"})
        for n in range(2)
    ]
    assert [a.status_code for a in answers] == [200, 200]
    request_id = answers[0].headers["nvcf-reqid"]

    record = await stack.http.get(f"/v2/gpufn/requests/{request_id}", headers=user)
    assert record.status_code == 200, record.text
    body = record.json()
    assert body["functionId"] == function["id"]
    assert body["functionVersionId"] == function["versionId"]
    assert body["status"] == 200 and body["outcome"] == "direct" and body["coldStart"] is False
    assert body["instanceId"]
    assert body["sizes"] == {"requestBytes": len(b'{"n":0}'), "responseBytes": len(answers[0].content)}
    assert all(
        body["phases"][phase] for phase in ("receivedAt", "instanceAssignedAt", "firstByteAt", "doneAt")
    )
    hidden = await stack.http.get(
        f"/v2/gpufn/requests/{request_id}", headers={"Authorization": f"Bearer {other}"}
    )
    assert hidden.status_code == 404
    assert hidden.headers["content-type"] == "application/problem+json"
    unknown = await stack.http.get("/v2/gpufn/requests/no-such-request", headers=user)
    assert unknown.status_code == 404

    version = {"function_id": function["id"], "version_id": function["versionId"]}
    api = await scrape(metrics_url(stack.settings.api_metrics_address))
    assert value(api, "gpufn_gateway_requests_total", **version, outcome="direct", status_class="2xx") == 2
    assert value(api, "gpufn_gateway_request_duration_seconds_count", **version) == 2
    assert value(api, "gpufn_gateway_ready_instances", version_id=function["versionId"]) == 1
    # The admin-key path serves the same registry; without the admin key it is refused.
    admin = await stack.http.get("/metrics")
    assert admin.status_code == 200
    assert "gpufn_gateway_requests_total{" in admin.text
    assert (await stack.http.get("/metrics", headers=user)).status_code == 403

    spec = {**version, "gpu": "CPU", "instance_type": "LOCAL.CPU"}
    worker = await scrape(metrics_url(stack.settings.worker_metrics_address))
    assert value(worker, "gpufn_worker_instance_starts_total", **spec) == 1
    assert value(worker, "gpufn_worker_instance_cold_start_seconds_count", **spec) == 1
    assert value(worker, "gpufn_worker_instance_failures_total", **spec) == 0
    assert value(worker, "gpufn_worker_instance_seconds_total", **spec) > 0
    assert value(worker, "gpufn_worker_gpu_seconds_total", **spec) == 0  # a CPU instance
    assert value(worker, "gpufn_worker_activities_total", activity="ensure_instances", result="ok") >= 1

    async def active_counted() -> bool:
        samples = await scrape(metrics_url(stack.settings.worker_metrics_address))
        return value(samples, "gpufn_worker_deployments", state="ACTIVE") == 1

    await eventually(active_counted, timeout=25, interval=1)
    sdk = await scrape(metrics_url(stack.settings.worker_sdk_metrics_address))
    sdk_names = {name for name, _ in sdk}
    # Every SDK metric the Grafana dashboard charts is one the SDK serves.
    assert dashboard_names("temporal_") <= sdk_names, sorted(sdk_names)
