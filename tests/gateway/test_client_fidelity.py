"""What NVCF clients rely on at the gateway: streams never get a 202, problems name their request, function
error messages survive, and bad header values are refused, never a 500.

The route table is fed by hand here (real gateway over real HTTP, real echo processes); the lifecycle
tests drive the same behaviours through a whole stack.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from tests.gateway.helpers import (
    PROBLEM,
    Served,
    auth,
    eventually,
    free_port,
    pexec,
    route,
    serve_gateway,
    settings,
    submit,
    uid,
)
from workflows.models import FunctionStatus


def sse_events(raw: bytes) -> list[Any]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]


async def test_a_stream_whose_first_byte_comes_after_the_poll_window_is_not_answered_202(
    gw: Served, echo_urls: list[str]
) -> None:
    """LangChain's NVIDIA clients send Accept: text/event-stream and fail on a 202 (slow first token)."""
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))

    started = time.monotonic()
    async with gw.http.stream(
        "POST",
        pexec(fid),
        json={"delaySeconds": 2.5, "stream": 3, "intervalSeconds": 0.05},
        headers={"Accept": "text/event-stream", "NVCF-POLL-SECONDS": "1"},
    ) as response:
        raw = await response.aread()

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert sse_events(raw) == [{"event": n} for n in range(3)]
    assert time.monotonic() - started >= 2.5


async def test_a_stream_queued_behind_a_busy_instance_waits_for_its_turn(
    gw: Served, echo_urls: list[str]
) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1))
    busy = asyncio.create_task(gw.http.post(pexec(fid), json={"delaySeconds": 1.5}))
    await eventually(lambda: gw.load(vid).get("inFlight") == 1)

    async with gw.http.stream(
        "POST",
        pexec(fid),
        json={"stream": 2, "intervalSeconds": 0.05},
        headers={"Accept": "text/event-stream", "NVCF-POLL-SECONDS": "0"},
    ) as response:
        raw = await response.aread()

    assert response.status_code == 200
    assert sse_events(raw) == [{"event": 0}, {"event": 1}]
    assert (await busy).status_code == 200


async def test_a_waiting_stream_gets_keep_alive_comments_then_its_events(echo_urls: list[str]) -> None:
    async with serve_gateway(settings(stream_keepalive_seconds=0.3)) as gw:
        fid, vid = uid(), uid("ver")
        gw.apply(route(vid, echo_urls[:1], function_id=fid))
        async with gw.http.stream(
            "POST",
            pexec(fid),
            json={"delaySeconds": 1.0, "stream": 2, "intervalSeconds": 0.05},
            headers={"Accept": "text/event-stream"},
        ) as response:
            raw = await response.aread()
        assert response.status_code == 200
        assert response.headers["nvcf-reqid"]
        assert raw.startswith(b": keep-alive\n\n")
        assert sse_events(raw) == [{"event": 0}, {"event": 1}]

        # A function error after the stream started ends it with one `event: error` carrying the problem.
        async with gw.http.stream(
            "POST",
            pexec(fid),
            json={"delaySeconds": 0.8, "status": 500, "error": "CUDA out of memory"},
            headers={"Accept": "text/event-stream"},
        ) as response:
            raw = await response.aread()
        assert response.status_code == 200
        assert b"event: error\n" in raw
        (problem,) = sse_events(raw)
        assert problem["status"] == 500
        assert problem["detail"] == "CUDA out of memory"
        assert problem["requestId"] == response.headers["nvcf-reqid"]


async def test_function_error_objects_and_lists_keep_their_message(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))
    bodies: list[tuple[dict[str, Any], str]] = [
        ({"error": {"message": "prompt too long", "code": "context_length"}}, "prompt too long"),
        ({"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]}, "field required"),
        ({"detail": "temperature must be below 2"}, "temperature must be below 2"),
    ]
    for error_body, message in bodies:
        response = await gw.http.post(pexec(fid), json={"status": 422, "errorBody": error_body})
        assert response.status_code == 422
        assert response.headers["content-type"] == PROBLEM
        problem = response.json()
        assert message in problem["detail"]
        assert problem["requestId"] == response.headers["nvcf-reqid"]


async def test_problems_about_a_request_carry_its_id(gw: Served, echo_urls: list[str]) -> None:
    unknown = str(uuid.uuid4())
    response = await gw.http.get(f"/v2/nvcf/pexec/status/{unknown}")
    assert response.status_code == 404
    assert response.json()["requestId"] == unknown

    response = await gw.http.get(f"/v2/nvcf/queues/{unknown}/position")
    assert response.status_code == 404
    assert response.json()["requestId"] == unknown


async def test_requests_past_their_deadline_name_their_request_id(echo_urls: list[str]) -> None:
    async with serve_gateway(settings(request_timeout_seconds=0.5)) as gw:
        fid, vid = uid(), uid("ver")
        gw.apply(route(vid, echo_urls[:1], function_id=fid))
        response = await gw.http.post(pexec(fid), json={"delaySeconds": 2})
        assert response.status_code == 504
        assert response.json()["requestId"] == response.headers["nvcf-reqid"]


async def test_oversized_numbers_in_headers_are_refused_with_4xx(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))
    huge = "9" * 5000
    response = await gw.http.post(pexec(fid), json={}, headers={"NVCF-POLL-SECONDS": huge})
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM

    reqid = await submit(gw, fid, {"delaySeconds": 0.2})
    response = await gw.http.get(f"/v2/nvcf/pexec/status/{reqid}", headers={"NVCF-POLL-SECONDS": huge})
    assert response.status_code == 400

    # No HTTP client sends such a Content-Length: write the request by hand.
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {pexec(fid)} HTTP/1.1\r\nhost: {host}\r\nauthorization: {auth()['Authorization']}\r\n"
        f"content-length: {huge}\r\n\r\n{{}}".encode()
    )
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] in (b"400", b"413")


class CountingSource:
    """A route source whose answers a test controls (stands in for the version workflows)."""

    def __init__(self) -> None:
        self.routes: dict[str, Mapping[str, Any]] = {}
        self.calls = 0
        self.delay = 0.05

    async def version_route(self, function_id: str, version_id: str) -> Mapping[str, Any] | None:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return self.routes.get(version_id)

    async def function_version_ids(self, function_id: str) -> list[str]:
        return [v for v, r in self.routes.items() if r["functionId"] == function_id]


async def test_a_route_table_miss_asks_the_source_once_for_concurrent_callers(echo_urls: list[str]) -> None:
    source = CountingSource()
    async with serve_gateway(settings(), route_source=source) as gw:
        fid, vid = str(uuid.uuid4()), str(uuid.uuid4())
        source.routes[vid] = route(vid, echo_urls[:1], function_id=fid, concurrency=8)

        answers = await asyncio.gather(
            *(gw.http.post(pexec(fid, vid), json={"n": n}) for n in range(8)),
            gw.http.post(pexec(fid), json={"n": 8}),
        )

        assert [a.status_code for a in answers] == [200] * 9
        assert source.calls <= 3  # one lookup shared, at most one more for callers that came after it
        calls = source.calls
        assert (await gw.http.post(pexec(fid, vid), json={})).status_code == 200
        assert source.calls == calls  # a hit asks nobody


async def test_a_version_not_yet_invocable_in_the_table_is_looked_up_again(echo_urls: list[str]) -> None:
    source = CountingSource()
    async with serve_gateway(settings(), route_source=source) as gw:
        fid, vid = str(uuid.uuid4()), str(uuid.uuid4())
        gw.apply(route(vid, [], function_id=fid, status=FunctionStatus.DEPLOYING, routes_version=1))
        source.routes[vid] = route(vid, echo_urls[:1], function_id=fid, routes_version=2)

        assert (await gw.http.post(pexec(fid, vid), json={})).status_code == 200


async def test_unknown_ids_are_answered_404_and_remembered(echo_urls: list[str]) -> None:
    source = CountingSource()
    async with serve_gateway(settings(), route_source=source) as gw:
        fid, vid = str(uuid.uuid4()), str(uuid.uuid4())
        for _ in range(3):
            assert (await gw.http.post(pexec(fid, vid), json={})).status_code == 404
        assert source.calls == 1
        # Ids that are not UUIDs never reach the source (nor a query built from them).
        assert (await gw.http.post(pexec("fn%00x", "v"), json={})).status_code == 404
        assert source.calls == 1


async def test_route_changes_reach_peer_replicas_before_the_call_returns(echo_urls: list[str]) -> None:
    port_a, port_b = free_port(), free_port()
    peers = {"replica-a": f"http://127.0.0.1:{port_a}", "replica-b": f"http://127.0.0.1:{port_b}"}
    async with (
        serve_gateway(settings(replica_id="replica-a", peers=peers, peer_key="key-admin"), port_a) as a,
        serve_gateway(settings(replica_id="replica-b", peers=peers, peer_key="key-admin"), port_b) as b,
    ):
        fid, vid = uid(), uid("ver")
        await a.gateway.publish_route(route(vid, echo_urls[:1], function_id=fid, routes_version=1))
        assert (await b.http.post(pexec(fid), json={})).status_code == 200

        await a.gateway.publish_route(route(vid, [], function_id=fid, deployed=False, routes_version=2))
        assert (await b.http.post(pexec(fid), json={})).status_code == 404

        await a.gateway.withdraw_route(vid)
        assert b.gateway.routes.get(vid) is None

        # Only admin keys may change another replica's routes.
        refused = await b.http.post("/internal/v1/routes", json={"remove": vid})
        assert refused.status_code == 403
