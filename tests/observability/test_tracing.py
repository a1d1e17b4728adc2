"""Gateway spans, linked from the client's trace through the gateway to the instance's `traceparent`.

Real parts: the gateway served by uvicorn over real HTTP, an aiohttp instance that records the headers it
receives. The exporter is OpenTelemetry's in-memory one (no collector runs here); key authentication and
route publishing are stand-ins as in tests/gateway/helpers.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.gateway.helpers import Served, eventually, free_port, pexec, route, serve_gateway, settings, uid

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@pytest.fixture(scope="module")
async def instance() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An instance that answers {} after 0.2 s and records every request's headers."""
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        await request.read()
        seen.append({k.lower(): v for k, v in request.headers.items()})
        await asyncio.sleep(0.2)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/echo", record)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port("127.0.22.5")
    await web.TCPSite(runner, "127.0.22.5", port).start()
    try:
        yield f"http://127.0.22.5:{port}", seen
    finally:
        await runner.cleanup()


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


@pytest.fixture
async def traced(exporter: InMemorySpanExporter) -> AsyncIterator[Served]:
    """A gateway whose observer traces into `exporter`."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with serve_gateway(settings()) as served:
        served.gateway.observer.tracer = provider.get_tracer("test")
        yield served


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


async def test_spans_continue_the_client_trace_and_reach_the_instance(
    traced: Served, exporter: InMemorySpanExporter, instance: tuple[str, list[dict[str, str]]]
) -> None:
    url, seen = instance
    fid, vid = uid(), uid("ver")
    traced.apply(route(vid, [], function_id=fid))  # no instance yet: the request waits for a cold start
    client_parent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    call = asyncio.create_task(
        traced.http.post(
            pexec(fid), json={}, headers={"traceparent": client_parent, "NVCF-POLL-SECONDS": "10"}
        )
    )
    await eventually(lambda: traced.load(vid)["queued"] == 1)
    await asyncio.sleep(0.3)
    traced.apply(route(vid, [url], function_id=fid, routes_version=2))
    response = await call
    assert response.status_code == 200

    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"gpufn.invoke", "gpufn.queue", "gpufn.cold_start", "gpufn.instance_call"}
    root = spans["gpufn.invoke"]
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == CLIENT_TRACE
    assert f"{root.parent.span_id:016x}" == CLIENT_SPAN
    assert root.attributes is not None
    assert root.attributes["gpufn.request_id"] == response.headers["nvcf-reqid"]
    assert root.attributes["http.response.status_code"] == 200
    for child in ("gpufn.queue", "gpufn.cold_start", "gpufn.instance_call"):
        parent = spans[child].parent
        assert parent is not None and parent.span_id == root.context.span_id, child
    cold = spans["gpufn.cold_start"]
    assert cold.start_time is not None and cold.end_time is not None
    assert 0.3 <= (cold.end_time - cold.start_time) / 1e9 < 1.0
    call_span = spans["gpufn.instance_call"]
    assert call_span.context is not None
    assert call_span.start_time is not None and call_span.end_time is not None
    assert (call_span.end_time - call_span.start_time) / 1e9 >= 0.2

    # The instance got one traceparent: the instance call's span, in the client's trace.
    headers = seen[-1]
    assert headers["traceparent"] == f"00-{CLIENT_TRACE}-{call_span.context.span_id:016x}-01"


async def test_no_spans_and_client_traceparent_passes_through_when_tracing_is_off(
    exporter: InMemorySpanExporter, instance: tuple[str, list[dict[str, str]]]
) -> None:
    url, seen = instance
    async with serve_gateway(settings()) as served:
        assert served.gateway.observer.tracer is None
        fid, vid = uid(), uid("ver")
        served.apply(route(vid, [url], function_id=fid))
        client_parent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
        response = await served.http.post(pexec(fid), json={}, headers={"traceparent": client_parent})
        assert response.status_code == 200
        record = served.gateway.observer.records.get(response.headers["nvcf-reqid"])
        assert record is not None and record.trace is None
    assert seen[-1]["traceparent"] == client_parent
    assert exporter.get_finished_spans() == ()
