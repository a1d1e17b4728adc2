"""The gateway's metrics and request records after known sequences of invocations.

Real parts: the gateway served by uvicorn over real HTTP, the echo example as real instance processes, the
metrics scraped over HTTP from the same exporter the API process runs (`gpufn.telemetry.serve_metrics`).
Mocked (see tests/gateway/helpers.py): key authentication, and the lifecycle workflow that publishes routes:
the test publishes them itself, which is what lets it impose an exact cold-start time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufn.telemetry import serve_metrics
from tests.gateway.helpers import (
    EchoProcess,
    Served,
    eventually,
    free_port,
    pexec,
    route,
    serve_gateway,
    settings,
    uid,
)


@pytest.fixture(scope="module")
def echo_urls() -> Iterator[list[str]]:
    """One echo instance for the module."""
    echo = EchoProcess("127.0.22.1")
    try:
        echo.wait()
        yield [echo.url]
    finally:
        echo.stop()


@pytest.fixture
async def fresh() -> AsyncIterator[tuple[Served, str]]:
    """A gateway of its own (so its counts start at zero) and the URL of its keyless metrics exporter."""
    async with serve_gateway(settings(maintenance_interval_seconds=0.1)) as served:
        port = free_port()
        stop = serve_metrics(f"127.0.0.1:{port}", served.gateway.observer.metrics.registry)
        try:
            yield served, f"http://127.0.0.1:{port}/metrics"
        finally:
            stop()


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape a Prometheus endpoint over HTTP; return every sample by name and sorted labels."""
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


async def invoke(served: Served, function_id: str, payload: bytes, poll: int = 10) -> httpx.Response:
    return await served.http.post(
        pexec(function_id),
        content=payload,
        headers={"NVCF-POLL-SECONDS": str(poll), "Content-Type": "application/json"},
    )


async def test_metrics_count_direct_202_error_and_queued_requests(
    fresh: tuple[Served, str], echo_urls: list[str]
) -> None:
    served, metrics_url = fresh
    fid, vid = uid(), uid("ver")
    served.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1))
    payloads = [
        body({"n": 1}),
        body({"status": 500, "error": "boom"}),
        body({"delaySeconds": 0.8, "n": 3}),
        body({"n": 4}),
    ]

    direct = await invoke(served, fid, payloads[0])
    assert direct.status_code == 200
    error = await invoke(served, fid, payloads[1])
    assert error.status_code == 500
    slow = await served.http.post(
        pexec(fid),
        content=payloads[2],
        headers={"NVCF-POLL-SECONDS": "0", "Content-Type": "application/json"},
    )
    assert slow.status_code == 202
    await eventually(lambda: served.load(vid)["inFlight"] == 1)
    queued = asyncio.create_task(invoke(served, fid, payloads[3]))
    await eventually(lambda: served.load(vid)["queued"] == 1)
    polled = await served.http.get(
        f"/v2/nvcf/pexec/status/{slow.headers['nvcf-reqid']}", headers={"NVCF-POLL-SECONDS": "10"}
    )
    assert polled.status_code == 200
    behind = await queued
    assert behind.status_code == 200

    samples = await scrape(metrics_url)
    version = {"function_id": fid, "version_id": vid}
    requests = "gpufn_gateway_requests_total"
    assert sample(samples, requests, **version, status_class="2xx", outcome="direct") == 2
    assert sample(samples, requests, **version, status_class="2xx", outcome="polled") == 1
    assert sample(samples, requests, **version, status_class="5xx", outcome="error") == 1
    assert sum(v for (name, _), v in samples.items() if name == requests) == 4
    for histogram in ("queue_wait_seconds", "instance_seconds", "request_duration_seconds"):
        assert sample(samples, f"gpufn_gateway_{histogram}_count", **version) == 4, histogram
    assert sample(samples, "gpufn_gateway_cold_start_wait_seconds_count", **version) == 0
    # Only the fourth request waited, for the 0.8 s the third one ran.
    assert sample(samples, "gpufn_gateway_queue_wait_seconds_bucket", **version, le="0.5") == 3
    assert sample(samples, "gpufn_gateway_queue_wait_seconds_bucket", **version, le="1.0") == 4
    assert sample(samples, "gpufn_gateway_instance_seconds_bucket", **version, le="0.5") == 3
    assert sample(samples, "gpufn_gateway_request_bytes_total", **version) == sum(map(len, payloads))
    answered = [direct, error, polled, behind]
    assert sample(samples, "gpufn_gateway_response_bytes_total", **version) == sum(
        len(r.content) for r in answered
    )
    assert sample(samples, "gpufn_gateway_queue_depth", version_id=vid) == 0
    assert sample(samples, "gpufn_gateway_in_flight", version_id=vid) == 0
    assert sample(samples, "gpufn_gateway_ready_instances", version_id=vid) == 1


async def test_record_shows_cold_start_and_queue_phases(
    fresh: tuple[Served, str], echo_urls: list[str]
) -> None:
    served, metrics_url = fresh
    fid, vid = uid(), uid("ver")
    served.apply(route(vid, [], function_id=fid, concurrency=1))  # scaled to zero: no instance yet
    # Long enough that 20 % is well above the scheduling noise of a busy 2-core machine.
    cold_seconds, first_runs, second_runs = 2.0, 1.5, 1.0

    sent = time.monotonic()
    first = asyncio.create_task(invoke(served, fid, body({"delaySeconds": first_runs})))
    await eventually(lambda: served.load(vid)["queued"] == 1)
    second = asyncio.create_task(invoke(served, fid, body({"delaySeconds": second_runs})))
    await eventually(lambda: served.load(vid)["queued"] == 2)
    await asyncio.sleep(sent + cold_seconds - time.monotonic())
    served.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1, routes_version=2))
    imposed_cold = time.monotonic() - sent
    responses = await asyncio.gather(first, second)
    assert [r.status_code for r in responses] == [200, 200]

    records = [served.gateway.observer.records.get(r.headers["nvcf-reqid"]) for r in responses]
    assert records[0] is not None and records[1] is not None
    one, two = records[0].as_json(), records[1].as_json()

    def near(measured: float | None, imposed: float) -> bool:
        return measured is not None and abs(measured - imposed) <= 0.2 * imposed

    assert one["coldStart"] is True and two["coldStart"] is True
    assert near(one["durations"]["coldStartSeconds"], imposed_cold), one
    assert near(one["durations"]["queueSeconds"], imposed_cold), one
    assert near(one["durations"]["instanceSeconds"], first_runs), one
    # The second waited for the same cold start, then in the queue while the first ran.
    assert near(two["durations"]["coldStartSeconds"], imposed_cold), two
    assert near(two["durations"]["queueSeconds"], imposed_cold + first_runs), two
    assert near(two["durations"]["instanceSeconds"], second_runs), two
    assert one["functionId"] == fid and one["functionVersionId"] == vid
    assert one["instanceId"] == f"{vid}-i0"
    assert one["status"] == 200 and one["outcome"] == "direct"
    phases = one["phases"]
    assert phases["receivedAt"] < phases["instanceAssignedAt"] <= phases["firstByteAt"] <= phases["doneAt"]
    assert one["sizes"]["responseBytes"] == len(responses[0].content)

    samples = await scrape(metrics_url)
    version = {"function_id": fid, "version_id": vid}
    assert sample(samples, "gpufn_gateway_cold_start_wait_seconds_count", **version) == 2
    assert sample(samples, "gpufn_gateway_cold_start_wait_seconds_bucket", **version, le="0.5") == 0


async def test_rate_limit_refusals_are_counted_without_a_record(
    fresh: tuple[Served, str], echo_urls: list[str]
) -> None:
    served, metrics_url = fresh
    fid, vid = uid(), uid("ver")
    memo = route(vid, echo_urls[:1], function_id=fid)
    memo["rateLimit"] = {"rateLimit": "1-M"}
    served.apply(memo)
    answers = [await invoke(served, fid, body({"n": n})) for n in range(2)]
    assert [a.status_code for a in answers] == [200, 429]

    samples = await scrape(metrics_url)
    version = {"function_id": fid, "version_id": vid}
    requests = "gpufn_gateway_requests_total"
    assert sample(samples, requests, **version, status_class="2xx", outcome="direct") == 1
    assert sample(samples, requests, **version, status_class="4xx", outcome="rate_limited") == 1
    assert sample(samples, "gpufn_gateway_request_duration_seconds_count", **version) == 1
    assert sample(samples, "gpufn_gateway_request_bytes_total", **version) == len(body({"n": 0}))
