"""The load report's deltas, over real HTTP, and the worker's LoadMonitor that applies them."""

from __future__ import annotations

from typing import Any

from activities.gateway import LoadMonitor
from api.gateway.load_report import LoadReport
from tests.gateway.helpers import auth, route, serve_gateway, uid


async def test_a_poller_gets_only_the_versions_that_changed(echo_urls: list[str]) -> None:
    async with serve_gateway() as gw:
        busy, idle, fid = uid("busy"), uid("idle"), uid()
        gw.apply(route(busy, echo_urls[:1], function_id=fid, routes_version=1))
        gw.apply(route(idle, echo_urls[1:], function_id=uid(), routes_version=1))
        first = (await gw.http.get("/internal/v1/load", headers=auth("key-admin"))).json()
        assert first["full"] and set(first["versions"]) >= {busy, idle}

        since = {"since": first["generation"], "epoch": first["epoch"]}
        quiet = (await gw.http.get("/internal/v1/load", params=since, headers=auth("key-admin"))).json()
        assert quiet["versions"] == {} and quiet["removed"] == [] and not quiet["full"]
        assert quiet["generation"] == first["generation"]

        gw.apply(route(busy, echo_urls[:1], function_id=fid, routes_version=2))
        gw.gateway.routes.remove(idle)
        delta = (await gw.http.get("/internal/v1/load", params=since, headers=auth("key-admin"))).json()
        assert set(delta["versions"]) == {busy} and delta["versions"][busy]["routesVersion"] == 2
        assert delta["removed"] == [idle]
        assert delta["generation"] > first["generation"]

        stranger = {"since": delta["generation"], "epoch": "another-gateway"}
        full = (await gw.http.get("/internal/v1/load", params=stranger, headers=auth("key-admin"))).json()
        assert full["full"] and busy in full["versions"]


def test_removed_versions_are_reported_until_forgotten() -> None:
    loads: dict[str, dict[str, Any]] = {"a": {"queued": 0}, "b": {"queued": 1}}
    report = LoadReport(lambda: dict(loads))
    start = report.report()
    del loads["b"]
    loads["a"] = {"queued": 2}
    delta = report.report(start["generation"], start["epoch"])
    assert delta["versions"] == {"a": {"queued": 2}} and delta["removed"] == ["b"]
    assert report.report(delta["generation"], start["epoch"])["removed"] == []
    # A poller from the future (another gateway's numbers under this epoch) gets everything.
    assert report.report(delta["generation"] + 5, start["epoch"])["full"]


async def test_the_monitor_keeps_a_full_view_from_deltas(echo_urls: list[str]) -> None:
    async with serve_gateway() as gw:
        kept, dropped, fid = uid("kept"), uid("dropped"), uid()
        gw.apply(route(kept, echo_urls[:1], function_id=fid, routes_version=3))
        gw.apply(route(dropped, echo_urls[1:], function_id=uid(), routes_version=3))
        monitor = LoadMonitor([gw.url], "key-admin")
        try:
            await monitor.next_tick()
            assert monitor.reachable
            assert monitor.load(kept).routesVersion == 3 and monitor.load(kept).ready == 1
            assert monitor.load(dropped).ready == 1
            await monitor.next_tick()  # from here on, the monitor polls with deltas
            gw.apply(route(kept, echo_urls, function_id=fid, routes_version=4))
            await monitor.next_tick()
            await monitor.next_tick()
            assert monitor.load(kept).routesVersion == 4 and monitor.load(kept).ready == 2
            assert monitor.load(dropped).ready == 1  # unchanged versions stay known
            gw.gateway.routes.remove(dropped)
            await monitor.next_tick()
            await monitor.next_tick()
            assert monitor.load(dropped).ready == 0 and monitor.load(kept).ready == 2
        finally:
            await monitor.close()
