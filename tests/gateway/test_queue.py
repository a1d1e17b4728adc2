"""Queues: order, depth, position, back-pressure, disconnects, route changes, scale from zero, load report."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx

from tests.gateway.helpers import Served, auth, eventually, pexec, route, serve_gateway, settings, submit, uid
from workflows.models import FunctionStatus


async def result(served: Served, request_id: str, poll: int = 10) -> httpx.Response:
    return await served.http.get(
        f"/v2/nvcf/pexec/status/{request_id}", headers={"NVCF-POLL-SECONDS": str(poll)}
    )


async def position(served: Served, request_id: str) -> httpx.Response:
    return await served.http.get(f"/v2/nvcf/queues/{request_id}/position")


async def test_queue_order_depth_and_position(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1, name="queued"))

    running = await submit(gw, fid, {"delaySeconds": 0.6, "n": 0})
    await eventually(lambda: gw.load(vid)["inFlight"] == 1)
    queued = [await submit(gw, fid, {"delaySeconds": 0.05, "n": n}) for n in (1, 2, 3)]

    depth = await gw.http.get(f"/v2/nvcf/queues/functions/{fid}")
    assert depth.status_code == 200
    assert depth.json() == {
        "functionId": fid,
        "queues": [
            {"functionVersionId": vid, "functionName": "queued", "functionStatus": "ACTIVE", "queueDepth": 3}
        ],
    }
    pinned = await gw.http.get(f"/v2/nvcf/queues/functions/{fid}/versions/{vid}")
    assert pinned.json()["queues"][0]["queueDepth"] == 3
    positions = [(await position(gw, reqid)).json() for reqid in [running, *queued]]
    assert [p["positionInQueue"] for p in positions] == [0, 1, 2, 3]
    assert positions[0] == {"functionId": fid, "functionVersionId": vid, "positionInQueue": 0}
    assert gw.load(vid)["queued"] == 3

    finished: list[int] = []

    async def wait_for(reqid: str) -> None:
        response = await result(gw, reqid)
        assert response.status_code == 200
        finished.append(response.json()["n"])

    await asyncio.gather(*(wait_for(r) for r in reversed([running, *queued])))
    assert finished == [0, 1, 2, 3]  # arrival order, one at a time
    assert (await gw.http.get(f"/v2/nvcf/queues/functions/{fid}")).json()["queues"][0]["queueDepth"] == 0
    assert (await position(gw, running)).status_code == 404  # no longer pending


async def test_queue_endpoints_refusals(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, [], function_id=fid, status=FunctionStatus.INACTIVE, deployed=False))
    for path in (f"/v2/nvcf/queues/functions/{fid}", f"/v2/nvcf/queues/functions/{uid()}"):
        response = await gw.http.get(path)
        assert response.status_code == 404
        assert response.json()["detail"] == "Queue not found - Function is likely not deployed"
    deployed_fid, deployed = uid(), uid("ver")
    gw.apply(route(deployed, echo_urls[:1], function_id=deployed_fid))
    assert (
        await gw.http.get(f"/v2/nvcf/queues/functions/{deployed_fid}", headers=auth("key-b"))
    ).status_code == 404
    assert (
        await gw.http.get(f"/v2/nvcf/queues/functions/{deployed_fid}/versions/{uid()}")
    ).status_code == 404
    assert (await position(gw, str(uuid.uuid4()))).status_code == 404


async def test_full_queue_answers_429(echo_urls: list[str]) -> None:
    async with serve_gateway(settings(max_queue_depth=2)) as small:
        fid, vid = uid(), uid("ver")
        small.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1))
        ids = [
            await submit(small, fid, {"delaySeconds": 0.3, "n": n}) for n in range(3)
        ]  # 1 running, 2 queued

        refused = await small.http.post(pexec(fid), json={}, headers={"NVCF-POLL-SECONDS": "0"})
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert "nvcf-reqid" not in refused.headers

        # Nothing accepted was dropped.
        for n, reqid in enumerate(ids):
            response = await result(small, reqid)
            assert response.status_code == 200
            assert response.json()["n"] == n


async def test_client_disconnect_removes_its_queued_request(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1))
    running = await submit(gw, fid, {"delaySeconds": 0.8})

    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"n": "leaves"}).encode()
    writer.write(
        (
            f"POST {pexec(fid)} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer key-a\r\n"
            f"NVCF-POLL-SECONDS: 30\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    await writer.drain()
    await eventually(lambda: gw.load(vid)["queued"] == 1)

    writer.close()
    await writer.wait_closed()
    await eventually(lambda: gw.load(vid)["queued"] == 0)
    assert gw.load(vid)["inFlight"] == 1  # only the running request remains
    assert (await result(gw, running)).status_code == 200
    assert gw.load(vid) == {
        "queued": 0,
        "inFlight": 0,
        "ready": 1,
        "routesVersion": 1,
        "instances": {f"{vid}-i0": 0},
    }
    del reader


async def test_status_poll_that_disconnects_does_not_take_the_result(
    gw: Served, echo_urls: list[str]
) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))
    reqid = await submit(gw, fid, {"delaySeconds": 0.4})

    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /v2/nvcf/pexec/status/{reqid} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer key-a\r\n"
        "NVCF-POLL-SECONDS: 30\r\n\r\n".encode()
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await writer.wait_closed()
    del reader

    response = await result(gw, reqid)
    assert response.status_code == 200
    assert response.json() == {"delaySeconds": 0.4}


async def test_forced_removal_fails_queued_requests(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1))
    running = await submit(gw, fid, {"delaySeconds": 0.5, "n": 0})
    queued = await submit(gw, fid, {"n": 1})

    gw.gateway.routes.remove(vid)

    failed = await result(gw, queued)
    assert failed.status_code == 503
    assert failed.headers["nvcf-status"] == "errored"
    assert failed.headers["nvcf-reqid"] == queued
    assert "undeployed" in failed.json()["detail"]
    # The request already on the instance finishes; new ones are refused.
    assert (await result(gw, running)).json() == {"delaySeconds": 0.5, "n": 0}
    assert (await gw.http.post(pexec(fid), json={})).status_code == 404
    assert vid not in gw.gateway.load_snapshot()["versions"]


async def test_scale_from_zero_queues_until_an_instance_appears(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, [], function_id=fid, concurrency=1))

    started = time.monotonic()
    call = asyncio.create_task(
        gw.http.post(pexec(fid), json={"cold": True}, headers={"NVCF-POLL-SECONDS": "10"})
    )
    await eventually(lambda: gw.load(vid)["queued"] == 1)
    assert gw.load(vid)["ready"] == 0

    gw.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1, routes_version=2))

    response = await call
    assert response.status_code == 200
    assert response.json() == {"cold": True}
    assert time.monotonic() - started < 5
    assert gw.load(vid)["routesVersion"] == 2


async def test_scale_from_zero_with_202_and_polling(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, [], function_id=fid))
    reqid = await submit(gw, fid, {"cold": 2})
    assert (await position(gw, reqid)).json()["positionInQueue"] == 1

    gw.apply(route(vid, echo_urls[:1], function_id=fid, routes_version=2))
    response = await result(gw, reqid)
    assert response.status_code == 200
    assert response.json() == {"cold": 2}


async def test_graceful_undeploy_refuses_new_but_serves_queued(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1))
    running = await submit(gw, fid, {"delaySeconds": 0.4, "n": 0})
    queued = await submit(gw, fid, {"n": 1})

    # The drain: INACTIVE, the deployment draining, the instances still routed.
    gw.apply(
        route(
            vid,
            echo_urls[:1],
            function_id=fid,
            concurrency=1,
            status=FunctionStatus.INACTIVE,
            deployed=False,
            draining=True,
            routes_version=2,
        )
    )
    refused = await gw.http.post(pexec(fid), json={})
    assert refused.status_code == 404

    assert (await result(gw, running)).json()["n"] == 0
    assert (await result(gw, queued)).json()["n"] == 1
    assert gw.load(vid)["queued"] == 0


async def test_load_snapshot_reports_every_version(gw: Served, echo_urls: list[str]) -> None:
    fid, busy, idle = uid(), uid("busy"), uid("idle")
    gw.apply(route(busy, echo_urls[:1], function_id=fid, concurrency=1, routes_version=4))
    gw.apply(route(idle, echo_urls[1:], function_id=uid(), concurrency=2, routes_version=7))
    running = await submit(gw, fid, {"delaySeconds": 0.5})
    queued = await submit(gw, fid, {})

    snapshot = gw.gateway.load_snapshot()["versions"]
    assert snapshot[busy] == {
        "queued": 1,
        "inFlight": 1,
        "ready": 1,
        "routesVersion": 4,
        "instances": {f"{busy}-i0": 1},
    }
    assert snapshot[idle] == {
        "queued": 0,
        "inFlight": 0,
        "ready": 1,
        "routesVersion": 7,
        "instances": {f"{idle}-i0": 0},
    }

    # An instance that leaves the routes while busy still reports its in-flight request (drains wait on it).
    gw.apply(route(busy, [], function_id=fid, concurrency=1, routes_version=5))
    assert gw.load(busy)["instances"] == {f"{busy}-i0": 1}
    assert gw.load(busy)["ready"] == 0
    assert (await result(gw, running)).status_code == 200
    assert gw.load(busy)["instances"] == {}
    gw.apply(route(busy, echo_urls[:1], function_id=fid, concurrency=1, routes_version=6))
    assert (await result(gw, queued)).status_code == 200
    assert gw.load(busy)["inFlight"] == 0


async def test_load_endpoint_is_admin_only(gw: Served, echo_urls: list[str]) -> None:
    vid = uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=uid()))
    admin = await gw.http.get("/internal/v1/load", headers=auth("key-admin"))
    assert admin.status_code == 200
    assert admin.json()["versions"][vid]["ready"] == 1
    assert (await gw.http.get("/internal/v1/load")).status_code == 403
