"""The route table and request ids, without HTTP."""

from __future__ import annotations

import uuid

import pytest

from api.gateway import RouteTable, replica_tag
from api.gateway.invocations import new_request_id
from api.gateway.upstream import Endpoint
from tests.gateway.helpers import route, uid
from workflows.models import FunctionStatus


def test_apply_indexes_versions_by_id_and_function() -> None:
    table = RouteTable()
    fid = uid()
    table.apply(route("v1", ["http://127.0.0.1:9001"], function_id=fid, concurrency=3))
    table.apply(route("v2", [], function_id=fid, status=FunctionStatus.DEGRADED))

    v1 = table.get("v1")
    assert v1 is not None
    assert v1.invocable
    assert [i.capacity for i in v1.active] == [3]
    assert b"POST /echo HTTP/1.1\r\nhost: 127.0.0.1:9001\r\n" in v1.active[0].prefix
    assert [v.version_id for v in table.function_versions(fid)] == ["v1", "v2"]
    v2 = table.get("v2")
    assert v2 is not None and v2.degraded and not v2.invocable


def test_stale_routes_are_ignored_and_removal_forgets() -> None:
    table = RouteTable()
    fid = uid()
    table.apply(route("v1", ["http://127.0.0.1:9001"], function_id=fid, routes_version=5))
    table.apply(route("v1", [], function_id=fid, routes_version=4))
    version = table.get("v1")
    assert version is not None and len(version.active) == 1
    assert table.load_snapshot()["versions"]["v1"]["routesVersion"] == 5

    table.remove("v1")
    assert table.get("v1") is None
    assert table.function_versions(fid) == []
    assert table.load_snapshot() == {"versions": {}}


def test_draining_version_is_not_invocable() -> None:
    table = RouteTable()
    table.apply(
        route(
            "v1",
            ["http://127.0.0.1:9001"],
            function_id=uid(),
            status=FunctionStatus.ACTIVE,
            deployed=False,
            draining=True,
        )
    )
    version = table.get("v1")
    assert version is not None
    assert not version.invocable
    assert len(version.active) == 1  # still routed for the requests already queued


def test_pick_prefers_the_least_loaded_instance_with_a_free_slot() -> None:
    table = RouteTable()
    table.apply(
        route("v1", ["http://127.0.0.1:9001", "http://127.0.0.1:9002"], function_id=uid(), concurrency=2)
    )
    version = table.get("v1")
    assert version is not None
    first, second = version.active
    first.in_flight = 2
    assert version.pick() is second
    second.in_flight = 1
    assert version.pick() is second
    second.in_flight = 2
    assert version.pick() is None


def test_request_ids_are_uuids_naming_the_replica() -> None:
    tag = replica_tag("api-0")
    ids = {new_request_id(tag) for _ in range(1000)}
    assert len(ids) == 1000
    for request_id in ids:
        parsed = uuid.UUID(request_id)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert request_id.endswith(tag)
    assert replica_tag("api-0") != replica_tag("api-1")


def test_endpoint_parsing() -> None:
    assert Endpoint("http://127.0.3.7:8000").key == ("127.0.3.7", 8000, False)
    assert Endpoint("https://fn.example.com").port == 443
    assert Endpoint("10.0.0.1:9000").host_header == b"10.0.0.1:9000"
    with pytest.raises(ValueError):
        Endpoint("ftp://x")


def test_instance_moving_address_keeps_its_in_flight_count() -> None:
    table = RouteTable()
    fid = uid()
    table.apply(route("v1", ["http://127.0.0.1:9001"], function_id=fid, routes_version=1))
    version = table.get("v1")
    assert version is not None
    instance = version.active[0]
    instance.in_flight = version.in_flight = 1

    table.apply(route("v1", ["http://127.0.0.1:9002"], function_id=fid, routes_version=2))
    assert version.active == [instance]
    assert instance.endpoint.port == 9002
    table.released(version, instance)
    assert table.load_snapshot()["versions"]["v1"]["instances"] == {"v1-i0": 0}
