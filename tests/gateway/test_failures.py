"""Failures and retention: instance failures, result expiry and memory bound, forwarding between replicas."""

from __future__ import annotations

import asyncio

import httpx

from tests.gateway.helpers import (
    EchoProcess,
    Served,
    eventually,
    free_port,
    pexec,
    route,
    serve_gateway,
    settings,
    submit,
    uid,
)


async def status(served: Served, request_id: str, poll: int = 10) -> httpx.Response:
    return await served.http.get(
        f"/v2/nvcf/pexec/status/{request_id}", headers={"NVCF-POLL-SECONDS": str(poll)}
    )


async def test_unreachable_instance_is_dropped_and_the_request_retried_elsewhere(
    gw: Served, echo_urls: list[str], dead_url: str
) -> None:
    fid, vid = uid(), uid("ver")
    memo = route(vid, [dead_url, echo_urls[0]], function_id=fid, concurrency=4)
    gw.apply(memo)

    # Picks rotate over idle instances, so two calls in a row try both; none may fail.
    for n in range(4):
        response = await gw.http.post(pexec(fid), json={"n": n})
        assert response.status_code == 200
        assert response.json() == {"n": n}
    assert gw.load(vid)["ready"] == 1  # the dead one is out of the rotation...

    gw.apply(memo)
    assert gw.load(vid)["ready"] == 2  # ...until a route lists it again


async def test_request_that_reached_no_instance_fails_after_one_retry(gw: Served, dead_url: str) -> None:
    fid, vid = uid(), uid("ver")
    other_dead = dead_url.rsplit(":", 1)[0] + f":{free_port('127.0.21.9')}"
    gw.apply(route(vid, [dead_url, other_dead], function_id=fid))

    response = await gw.http.post(pexec(fid), json={})

    assert response.status_code == 502
    assert response.headers["nvcf-status"] == "errored"
    assert response.headers["nvcf-reqid"]
    assert "not sent, tried twice" in response.json()["detail"]
    assert gw.load(vid)["ready"] == 0


async def test_instance_dying_after_the_request_was_sent_is_not_retried(
    gw: Served, echo_urls: list[str]
) -> None:
    dying = EchoProcess("127.0.21.4").wait()
    try:
        fid, vid = uid(), uid("ver")
        # The first pick of a fresh route is its second instance: the one about to die.
        gw.apply(route(vid, [echo_urls[0], dying.url], function_id=fid, concurrency=2))
        call = asyncio.create_task(
            gw.http.post(pexec(fid), json={"delaySeconds": 3}, headers={"NVCF-POLL-SECONDS": "10"})
        )
        await eventually(lambda: gw.load(vid)["instances"].get(f"{vid}-i1") == 1)
        dying.proc.kill()

        response = await call
        assert response.status_code == 502  # not run again on the healthy instance
        assert response.headers["nvcf-status"] == "errored"
        assert "not retried" in response.json()["detail"]
        assert gw.load(vid)["ready"] == 1
    finally:
        dying.stop()


async def test_results_expire_after_their_ttl(echo_urls: list[str]) -> None:
    async with serve_gateway(settings(result_ttl_seconds=0.4)) as short:
        fid, vid = uid(), uid("ver")
        short.apply(route(vid, echo_urls[:1], function_id=fid))
        kept = await submit(short, fid, {"n": "kept"})
        expired = await submit(short, fid, {"n": "expired"})
        await eventually(lambda: short.load(vid)["inFlight"] == 0)

        assert (await status(short, kept)).status_code == 200
        await asyncio.sleep(0.6)
        assert (await status(short, expired, poll=0)).status_code == 404
        assert len(short.gateway.dispatcher.results) == 0


async def test_result_memory_bound_evicts_the_oldest(echo_urls: list[str]) -> None:
    body_bytes = 1500
    # Room for two answers of ~1.5 kB (plus bookkeeping), not three.
    async with serve_gateway(settings(result_memory_bytes=2 * (body_bytes + 600))) as small:
        fid, vid = uid(), uid("ver")
        small.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1))
        ids = [await submit(small, fid, {"n": n, "pad": "x" * (body_bytes - 30)}) for n in range(3)]
        await eventually(lambda: small.load(vid)["inFlight"] == 0 and small.load(vid)["queued"] == 0)

        assert (await status(small, ids[0], poll=0)).status_code == 404  # the oldest went first
        assert (await status(small, ids[1], poll=0)).json()["n"] == 1
        assert (await status(small, ids[2], poll=0)).json()["n"] == 2
        assert small.gateway.dispatcher.results.evicted == 1


async def test_status_polls_are_forwarded_to_the_replica_holding_the_request(echo_urls: list[str]) -> None:
    port_a, port_b = free_port(), free_port()
    peers = {"replica-a": f"http://127.0.0.1:{port_a}", "replica-b": f"http://127.0.0.1:{port_b}"}
    async with (
        serve_gateway(settings(replica_id="replica-a", peers=peers), port_a) as a,
        serve_gateway(settings(replica_id="replica-b", peers=peers), port_b) as b,
    ):
        fid, vid = uid(), uid("ver")
        a.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1))
        running = await submit(a, fid, {"delaySeconds": 0.4, "n": 0})
        queued = await submit(a, fid, {"n": 1})

        where = await b.http.get(f"/v2/nvcf/queues/{queued}/position")
        assert where.status_code == 200
        assert where.json()["positionInQueue"] == 1

        first = await status(b, running)
        assert first.status_code == 200
        assert first.json() == {"delaySeconds": 0.4, "n": 0}
        assert first.headers["nvcf-reqid"] == running
        assert first.headers["nvcf-status"] == "fulfilled"
        assert (await status(b, queued)).json() == {"n": 1}
        assert (await status(b, running, poll=0)).status_code == 404  # returned once, through either replica
        assert (await status(a, queued, poll=0)).status_code == 404


async def test_requests_past_their_timeout_fail_with_504(echo_urls: list[str]) -> None:
    async with serve_gateway(settings(request_timeout_seconds=0.5)) as short:
        fid, vid = uid(), uid("ver")
        short.apply(route(vid, echo_urls[:1], function_id=fid, concurrency=1))
        timed_out = await short.http.post(
            pexec(fid), json={"delaySeconds": 3}, headers={"NVCF-POLL-SECONDS": "5"}
        )
        assert timed_out.status_code == 504
        assert timed_out.headers["nvcf-status"] == "errored"

        # A version scaled to zero: its request waits in the queue for an instance that never comes.
        # (Queued behind a busy instance instead, it would race the running request's own timeout,
        # which frees the instance just before the queued request's budget runs out.)
        cold_fid, cold_vid = uid(), uid("ver")
        short.apply(route(cold_vid, [], function_id=cold_fid))
        queued = await submit(short, cold_fid, {"n": 1})
        waited = await status(short, queued)
        assert waited.status_code == 504  # never started: its budget ran out in the queue
        assert waited.headers["nvcf-reqid"] == queued
