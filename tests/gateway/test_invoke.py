"""Invocation over real HTTP: sync answers, polling, errors, streaming, version choice, refusals, limits."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import httpx

from api.gateway import replica_tag
from tests.gateway.helpers import (
    ACCOUNT,
    OTHER_ACCOUNT,
    PROBLEM,
    Recorder,
    Served,
    auth,
    pexec,
    route,
    serve_gateway,
    settings,
    uid,
)
from workflows.models import FunctionStatus


async def test_sync_invocation_returns_the_instance_answer(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))

    response = await gw.http.post(pexec(fid), json={"hello": "world"})

    assert response.status_code == 200
    assert response.json() == {"hello": "world"}
    assert response.headers["nvcf-status"] == "fulfilled"
    reqid = response.headers["nvcf-reqid"]
    assert uuid.UUID(reqid).version == 4
    assert reqid.endswith(replica_tag("test"))
    # The echo instance saw the same request id in NVCF-REQID.
    assert response.headers["x-echo-reqid"] == reqid


async def test_instance_receives_nvcf_headers_and_client_headers(gw: Served, recorder: Recorder) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, [recorder.url], function_id=fid, inference_url="/record", name="recorder"))

    response = await gw.http.post(
        pexec(fid, vid),
        content=b"raw body",
        headers={
            "X-Custom": "kept",
            "NVCF-FUNCTION-ID": "spoofed",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped",
            "NVCF-POLL-SECONDS": "7",
        },
    )

    assert response.status_code == 200
    seen = response.json()["headers"]
    assert response.json()["body"] == "raw body"
    assert "authorization" not in seen
    assert "x-hop" not in seen
    assert seen["x-custom"] == "kept"
    assert seen["nvcf-function-id"] == fid
    assert seen["nvcf-function-version-id"] == vid
    assert seen["nvcf-function-name"] == "recorder"
    assert seen["nvcf-ncaid"] == ACCOUNT
    assert seen["nvcf-sub"] == "key-a"
    assert seen["nvcf-reqid"] == response.headers["nvcf-reqid"]
    assert seen["nvcf-max-response-size-bytes"] == str(5 * 1024 * 1024)
    assert seen["nvcf-backend"] == "local"
    assert seen["nvcf-instancetype"] == "LOCAL.CPU"
    assert int(seen["nvcf-poll-seconds"]) > 0
    # No Content-Type from the client: NVCF's default.
    assert seen["content-type"] == "application/json"


async def test_slow_function_answers_202_then_the_poll_200_then_404(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))

    started = time.monotonic()
    response = await gw.http.post(pexec(fid), json={"delaySeconds": 1.5}, headers={"NVCF-POLL-SECONDS": "1"})
    assert 0.9 <= time.monotonic() - started < 2.5
    assert response.status_code == 202
    assert response.headers["nvcf-status"] == "in-progress"
    reqid = response.headers["nvcf-reqid"]

    result = await gw.http.get(f"/v2/nvcf/pexec/status/{reqid}", headers={"NVCF-POLL-SECONDS": "5"})
    assert result.status_code == 200
    assert result.json() == {"delaySeconds": 1.5}
    assert result.headers["nvcf-reqid"] == reqid
    assert result.headers["nvcf-status"] == "fulfilled"

    again = await gw.http.get(f"/v2/nvcf/pexec/status/{reqid}")
    assert again.status_code == 404
    assert again.headers["content-type"] == PROBLEM


async def test_status_long_poll_returns_when_the_result_is_ready(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))
    response = await gw.http.post(pexec(fid), json={"delaySeconds": 0.8}, headers={"NVCF-POLL-SECONDS": "0"})
    assert response.status_code == 202
    reqid = response.headers["nvcf-reqid"]

    # A short window ends in another 202, which still names the request.
    short = await gw.http.get(f"/v2/nvcf/pexec/status/{reqid}", headers={"NVCF-POLL-SECONDS": "0"})
    assert short.status_code == 202
    assert short.headers["nvcf-reqid"] == reqid
    assert short.headers["nvcf-status"] == "in-progress"

    started = time.monotonic()
    result = await gw.http.get(f"/v2/nvcf/pexec/status/{reqid}", headers={"NVCF-POLL-SECONDS": "30"})
    elapsed = time.monotonic() - started
    assert result.status_code == 200
    assert 0.4 < elapsed < 3.0  # it answered when the instance did, not at the end of the window


async def test_status_of_another_account_is_not_found(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))
    response = await gw.http.post(pexec(fid), json={"delaySeconds": 0.2}, headers={"NVCF-POLL-SECONDS": "0"})
    reqid = response.headers["nvcf-reqid"]

    other = await gw.http.get(f"/v2/nvcf/pexec/status/{reqid}", headers=auth("key-b"))
    assert other.status_code == 404
    mine = await gw.http.get(f"/v2/nvcf/pexec/status/{reqid}", headers={"NVCF-POLL-SECONDS": "5"})
    assert mine.status_code == 200


async def test_instance_errors_come_back_as_nvcf_problem_details(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))

    response = await gw.http.post(pexec(fid), json={"status": 503, "error": "model overloaded"})

    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["nvcf-status"] == "errored"
    assert response.headers["nvcf-reqid"]
    assert response.json() == {
        "type": "urn:inference-service:problem-details:service-unavailable",
        "title": "Service Unavailable",
        "status": 503,
        "detail": "model overloaded",
        "requestId": response.headers["nvcf-reqid"],
    }


async def test_instance_error_without_json_error_field_is_inference_error(
    gw: Served, recorder: Recorder
) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, [recorder.url], function_id=fid, inference_url="/record?fail=text"))

    response = await gw.http.post(pexec(fid), json={})

    assert response.status_code == 500
    assert response.headers["nvcf-status"] == "errored"
    body = response.json()
    assert body["type"] == "urn:inference-service:problem-details:internal-server-error"
    assert body["detail"] == "Inference error"


async def test_event_streams_are_relayed_as_they_arrive(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))

    arrivals: list[float] = []
    chunks: list[bytes] = []
    started = time.monotonic()
    async with gw.http.stream(
        "POST",
        pexec(fid),
        json={"stream": 5, "intervalSeconds": 0.3},
        headers={"Accept": "text/event-stream", "NVCF-POLL-SECONDS": "1"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["nvcf-status"] == "fulfilled"
        assert response.headers["nvcf-reqid"]
        async for chunk in response.aiter_raw():
            arrivals.append(time.monotonic() - started)
            chunks.append(chunk)

    events = [
        json.loads(line[6:]) for line in b"".join(chunks).decode().splitlines() if line.startswith("data: ")
    ]
    assert events == [{"event": n} for n in range(5)]
    # The first event came long before the stream ended, and the stream outlived the 1 s poll window.
    assert arrivals[0] < 0.8
    assert arrivals[-1] > 1.1  # the fifth event is written at 1.2 s
    assert len(arrivals) >= 4


async def test_stream_without_accept_header_is_a_plain_answer(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))
    response = await gw.http.post(pexec(fid), json={"stream": 2})
    assert response.status_code == 200
    assert response.json() == {"stream": 2}


async def test_pinned_version_and_function_level_choice(gw: Served, recorder: Recorder) -> None:
    fid = uid()
    v1, v2, degraded, inactive = uid("v1"), uid("v2"), uid("v3"), uid("v4")
    for vid in (v1, v2):
        gw.apply(route(vid, [recorder.url], function_id=fid, inference_url="/record"))
    gw.apply(route(degraded, [], function_id=fid, status=FunctionStatus.DEGRADED, inference_url="/record"))
    gw.apply(route(inactive, [recorder.url], function_id=fid, status=FunctionStatus.INACTIVE, deployed=False))

    for vid in (v1, v2):
        pinned = await gw.http.post(pexec(fid, vid), json={})
        assert pinned.json()["headers"]["nvcf-function-version-id"] == vid

    served = [
        (await gw.http.post(pexec(fid), json={})).json()["headers"]["nvcf-function-version-id"]
        for _ in range(30)
    ]
    assert set(served) == {v1, v2}  # uniformly random: both in 30 tries (chance of failing 2 x 2^-30)


async def test_invoking_inactive_degraded_or_unknown_functions_is_refused(
    gw: Served, echo_urls: list[str]
) -> None:
    fid_inactive, fid_degraded, fid_other = uid(), uid(), uid()
    inactive, degraded, other = uid("ver"), uid("ver"), uid("ver")
    gw.apply(route(inactive, [], function_id=fid_inactive, status=FunctionStatus.INACTIVE, deployed=False))
    gw.apply(route(degraded, [], function_id=fid_degraded, status=FunctionStatus.DEGRADED))
    gw.apply(route(other, echo_urls[:1], function_id=fid_other, account=OTHER_ACCOUNT))

    cases = {
        pexec(fid_inactive): 404,
        pexec(fid_inactive, inactive): 404,
        pexec(fid_degraded): 400,
        pexec(fid_degraded, degraded): 400,
        pexec(uid()): 404,
        pexec(fid_other): 404,  # another account's function
        pexec(fid_other, other): 404,
        pexec(fid_inactive, other): 404,  # a version of another function
    }
    for path, status in cases.items():
        response = await gw.http.post(path, json={})
        assert response.status_code == status, (path, response.text)
        assert response.headers["content-type"] == PROBLEM
        assert "nvcf-reqid" not in response.headers  # refused before it was queued
    degraded_body = (await gw.http.post(pexec(fid_degraded), json={})).json()
    assert "DEGRADED function cannot be invoked" in degraded_body["detail"]
    # The owner may invoke it.
    assert (await gw.http.post(pexec(fid_other), json={}, headers=auth("key-b"))).status_code == 200


async def test_bad_poll_seconds_is_a_400(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))
    for value in ("abc", "-1", "3601", "1.5", "", "1e3"):
        response = await gw.http.post(pexec(fid), json={}, headers={"NVCF-POLL-SECONDS": value})
        assert response.status_code == 400, value
        assert response.headers["content-type"] == PROBLEM
        status = await gw.http.get(
            f"/v2/nvcf/pexec/status/{uuid.uuid4()}", headers={"NVCF-POLL-SECONDS": value}
        )
        assert status.status_code == 400, value
    assert (await gw.http.post(pexec(fid), json={}, headers={"NVCF-POLL-SECONDS": "3600"})).status_code == 200


async def test_missing_or_bad_key_and_missing_scope(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))
    async with httpx.AsyncClient(base_url=gw.url) as anonymous:
        missing = await anonymous.post(pexec(fid), json={})
        assert missing.status_code == 401
        assert missing.headers["content-type"] == PROBLEM
        assert (await anonymous.post(pexec(fid), json={}, headers=auth("nope"))).status_code == 401
        assert (await anonymous.get(f"/v2/nvcf/queues/functions/{fid}")).status_code == 401

    queue_only = auth("key-queue-only")
    assert (await gw.http.post(pexec(fid), json={}, headers=queue_only)).status_code == 403
    assert (await gw.http.get(f"/v2/nvcf/pexec/status/{uuid.uuid4()}", headers=queue_only)).status_code == 403
    invoke_only = auth("key-invoke-only")
    assert (await gw.http.post(pexec(fid), json={}, headers=invoke_only)).status_code == 200
    assert (await gw.http.get(f"/v2/nvcf/queues/functions/{fid}", headers=invoke_only)).status_code == 403
    position = await gw.http.get(f"/v2/nvcf/queues/{uuid.uuid4()}/position", headers=invoke_only)
    assert position.status_code == 403


async def test_org_and_team_paths(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))
    for prefix in (f"/v2/orgs/{ACCOUNT}", f"/v2/orgs/{ACCOUNT}/teams/research"):
        response = await gw.http.post(prefix + pexec(fid)[3:], json={"n": 1})
        assert response.status_code == 200, prefix
        queues = await gw.http.get(f"{prefix}/nvcf/queues/functions/{fid}")
        assert queues.status_code == 200
    foreign = await gw.http.post(f"/v2/orgs/{OTHER_ACCOUNT}" + pexec(fid)[3:], json={})
    assert foreign.status_code == 403
    assert (await gw.http.get(pexec(fid))).status_code == 405


async def test_request_body_limit(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls[:1], function_id=fid))
    limit = 5 * 1024 * 1024

    too_large = await gw.http.post(pexec(fid), content=b"x" * (limit + 1))
    assert too_large.status_code == 413
    assert too_large.headers["content-type"] == PROBLEM

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield b"y" * (1024 * 1024)

    streamed = await gw.http.post(pexec(fid), content=chunked())  # no Content-Length: counted as it arrives
    assert streamed.status_code == 413

    at_limit = await gw.http.post(pexec(fid), content=b"z" * limit, headers={"Content-Type": "text/plain"})
    assert at_limit.status_code == 200
    assert len(at_limit.content) == limit


async def test_response_over_the_limit_is_an_errored_answer(echo_urls: list[str]) -> None:
    async with serve_gateway(settings(max_response_bytes=1000)) as small:
        fid, vid = uid(), uid("ver")
        small.apply(route(vid, echo_urls[:1], function_id=fid))

        response = await small.http.post(pexec(fid), json={"pad": "p" * 2000})
        assert response.status_code == 502
        assert response.headers["nvcf-status"] == "errored"
        assert response.headers["nvcf-reqid"]
        assert "NVCF-MAX-RESPONSE-SIZE-BYTES" in response.json()["detail"]

        # The gateway carries on (and the instance too).
        assert (await small.http.post(pexec(fid), json={"pad": "ok"})).status_code == 200


async def test_concurrent_invocations_all_answer(gw: Served, echo_urls: list[str]) -> None:
    fid, vid = uid(), uid("ver")
    gw.apply(route(vid, echo_urls, function_id=fid, concurrency=8))
    responses = await asyncio.gather(*(gw.http.post(pexec(fid), json={"n": n}) for n in range(40)))
    assert [r.json()["n"] for r in responses] == list(range(40))
    assert gw.load(vid)["inFlight"] == 0
