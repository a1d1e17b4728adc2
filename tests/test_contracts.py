"""The messages that cross processes still read across a rolling upgrade (`gpufn/contracts.py`).

An old route entry (published before entries carried `schema`) still routes in a new gateway, and a newer
one with a field this code does not know still does; an old gateway's load report and a newer one's are
read by a worker's load monitor over real HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from activities.gateway import LOAD_PATH, LoadMonitor
from api.gateway.load_report import LoadReport
from api.gateway.routes import RouteTable
from gpufn.contracts import ROUTE_SCHEMA, LoadReportBody, RouteEntry

OLD_ROUTE: dict[str, Any] = {
    # The route memo as `workflows.routes.route_memo` wrote it before the contract existed.
    "accountId": "acct",
    "functionId": "fn-1",
    "versionId": "ver-1",
    "functionName": "echo",
    "status": "ACTIVE",
    "deployed": True,
    "inferenceUrl": "/echo",
    "specs": [{"gpu": "L40S", "instanceType": "local", "backend": "local", "maxRequestConcurrency": 3}],
    "instances": [{"id": "i-1", "address": "http://127.0.0.1:9001", "spec": 0}],
    "routesVersion": 4,
    "rateLimit": None,
    "deploymentId": "dep-1",
    "deployment": None,
}


def test_an_old_route_entry_routes_in_a_new_gateway() -> None:
    table = RouteTable()
    table.apply(OLD_ROUTE)
    version = table.get("ver-1")
    assert version is not None and version.invocable
    assert version.routes_version == 4
    [instance] = version.instances.values()
    assert instance.endpoint.url == "http://127.0.0.1:9001" and instance.capacity == 3
    assert RouteEntry.parse(OLD_ROUTE).schema_version == 1


def test_a_newer_route_entry_with_unknown_fields_still_routes() -> None:
    newer = {
        **OLD_ROUTE,
        "schema": ROUTE_SCHEMA + 1,
        "routesVersion": 5,
        "placement": {"zone": "b"},
        "instances": [{"id": "i-2", "address": "http://127.0.0.1:9002", "spec": 0, "weight": 2}],
    }
    table = RouteTable()
    table.apply(OLD_ROUTE)
    table.apply(newer)
    version = table.get("ver-1")
    assert version is not None and version.routes_version == 5
    assert [i.endpoint.url for i in version.instances.values() if i.routed] == ["http://127.0.0.1:9002"]
    # What a newer publisher added travels with the entry, unread.
    assert RouteEntry.parse(newer).to_json()["placement"] == {"zone": "b"}


def test_a_route_entry_without_its_identity_is_refused() -> None:
    with pytest.raises(ValueError):
        RouteTable().apply({"status": "ACTIVE"})


def test_the_load_report_is_the_contract_and_keeps_what_a_newer_gateway_adds() -> None:
    entries = {"ver-1": {"queued": 2, "inFlight": 1, "ready": 1, "routesVersion": 4, "instances": {"i-1": 1}}}
    report = LoadReport(lambda: {v: {**e, "waitingMs": 7} for v, e in entries.items()}).report()
    body = LoadReportBody.parse(report)
    assert report["schema"] == 1 and body.full and body.versions["ver-1"].queued == 2
    assert report["versions"]["ver-1"]["waitingMs"] == 7


@pytest.fixture
async def gateways() -> AsyncIterator[tuple[str, str]]:
    """Two gateways on real HTTP: one answers an old-shape report, the other a newer one."""
    old = {
        "epoch": "e-old",
        "generation": 3,
        "full": True,
        "versions": {
            "ver-1": {"queued": 2, "inFlight": 1, "ready": 1, "routesVersion": 4, "instances": {"i-1": 1}}
        },
        "removed": [],
    }
    newer = {
        "schema": 2,
        "epoch": "e-new",
        "generation": 9,
        "full": True,
        "versions": {
            "ver-1": {
                "queued": 0,
                "inFlight": 2,
                "ready": 2,
                "routesVersion": 5,
                "instances": {"i-2": 2},
                "waitingMs": 3,
            }
        },
        "removed": [],
        "region": "eu",
    }

    def serving(body: dict[str, Any]) -> web.Application:
        app = web.Application()

        async def load(request: web.Request) -> web.Response:
            return web.json_response(body)

        app.router.add_get(LOAD_PATH, load)
        return app

    runners = [web.AppRunner(serving(old)), web.AppRunner(serving(newer))]
    urls = []
    for runner in runners:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        urls.append(f"http://127.0.0.1:{port}")
    try:
        yield urls[0], urls[1]
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_a_worker_reads_old_and_newer_gateways_load_reports(gateways: tuple[str, str]) -> None:
    monitor = LoadMonitor(list(gateways), admin_key="k")
    try:
        await monitor.next_tick()
        load = monitor.load("ver-1")
    finally:
        await monitor.close()
    assert monitor.reachable
    assert (load.queued, load.inFlight, load.ready, load.routesVersion) == (2, 3, 2, 4)
    assert load.instances == {"i-1": 1, "i-2": 2}
