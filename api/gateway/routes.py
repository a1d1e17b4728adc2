"""The routing table: which versions exist, whether they take new requests, and which instances serve them.

It is fed with the dicts that `workflows.routes.route_memo` publishes (by `api/route_sync.py`:
`apply(route)` for every version seen, `remove(version_id)` for a version that disappeared), and read on
every invocation with plain dict lookups. Each version also carries its request queue and the in-flight
count of each instance, because those outlive route changes: a request in flight on an instance that
left the routes still counts against that instance until it ends (graceful drains wait for exactly that).

Not thread-safe: call it from the event loop that serves the gateway.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from api.gateway.rate_limit import RateLimit
from api.gateway.upstream import Endpoint
from gpufn.contracts import RouteEntry
from workflows.models import INVOCABLE_STATUSES, FunctionStatus

if TYPE_CHECKING:
    from api.gateway.invocations import Invocation

log = logging.getLogger(__name__)

_INVOCABLE = frozenset(s.value for s in INVOCABLE_STATUSES)
_DEGRADED = FunctionStatus.DEGRADED.value


def header_value(value: object) -> bytes:
    """Return `value` as a header value, with any line break removed (header injection)."""
    return str(value).replace("\r", "").replace("\n", "").encode()


class Instance:
    """One instance of a version: where it listens, how many requests it may run, how many it runs."""

    __slots__ = ("capacity", "endpoint", "failed", "id", "in_flight", "limit", "peak", "prefix", "routed")

    def __init__(self, instance_id: str, endpoint: Endpoint) -> None:
        self.id = instance_id
        self.endpoint = endpoint
        self.capacity = 1
        """Requests this replica may send it at once: `limit`, or the slots it leased from the plane."""
        self.limit = 1
        """The version's `maxRequestConcurrency` for it: over all replicas together."""
        self.in_flight = 0
        self.peak = 0
        """Most requests in flight on it here since the plane's last lease review (slots kept)."""
        self.routed = True
        """Listed by the last applied route."""
        self.failed = False
        """A connection to it failed; no new requests until the next `apply` lists it again."""
        self.prefix = b""
        """Request line, Host and the version's fixed NVCF headers, built once per route change."""


class VersionRoute:
    """One function version as the gateway sees it: its route, its queue, its instances' load."""

    __slots__ = (
        "_next",
        "account_id",
        "active",
        "backlog",
        "deployed",
        "durable_waiting",
        "function_id",
        "function_name",
        "in_flight",
        "inference_path",
        "instances",
        "invocable",
        "queue",
        "rate_limit",
        "rate_limit_config",
        "removed",
        "routes_version",
        "status",
        "version_id",
    )

    def __init__(self, version_id: str, function_id: str, account_id: str) -> None:
        self.version_id = version_id
        self.function_id = function_id
        self.account_id = account_id
        self.function_name = ""
        self.status = FunctionStatus.INACTIVE.value
        self.deployed = False
        self.invocable = False
        """ACTIVE or DEGRADING and deployed (not draining): takes new requests."""
        self.routes_version = 0
        self.inference_path = b"/"
        self.instances: dict[str, Instance] = {}
        """Every instance listed by the route, plus unlisted ones still running requests."""
        self.active: list[Instance] = []
        """The instances new requests may go to: listed and not failed."""
        self.queue: deque[Invocation] = deque()
        """Requests waiting for a free slot, in arrival order."""
        self.in_flight = 0
        self.backlog = False
        self.durable_waiting = 0
        """Requests this replica accepted into the shared queue that have not started here or elsewhere."""
        """The version's shared (durable) queue may hold requests: new ones queue behind them."""
        self.removed = False
        self.rate_limit: RateLimit | None = None
        """The version's NVCF `rateLimit`, when it has a valid one."""
        self.rate_limit_config: object = None
        self._next = 0

    @property
    def degraded(self) -> bool:
        """Return whether the version lost all its instances (NVCF: invoking it is a 400)."""
        return self.status == _DEGRADED

    def pick(self) -> Instance | None:
        """Return the least loaded instance with a free slot, or None when every slot is taken."""
        active = self.active
        count = len(active)
        if count == 1:
            only = active[0]
            return only if only.in_flight < only.capacity else None
        best: Instance | None = None
        # Start at a rotating position so ties spread over the instances.
        start = self._next = (self._next + 1) % count if count else 0
        for offset in range(count):
            instance = active[(start + offset) % count]
            if instance.in_flight >= instance.capacity:
                continue
            if instance.in_flight == 0:
                return instance
            if best is None or instance.in_flight * best.capacity < best.in_flight * instance.capacity:
                best = instance
        return best

    def load(self) -> dict[str, Any]:
        """Return this version's entry of the load report the autoscaler and drains read."""
        return {
            "queued": len(self.queue) + self.durable_waiting,
            "inFlight": self.in_flight,
            "ready": len(self.active),
            "routesVersion": self.routes_version,
            "instances": {i.id: i.in_flight for i in self.instances.values()},
        }


class RouteListener(Protocol):
    """What the dispatcher does when routes change."""

    def routes_changed(self, version: VersionRoute) -> None:
        """Start queued requests on instances that may now have free slots."""

    def route_removed(self, version: VersionRoute) -> None:
        """Fail the version's queued requests: nothing will serve them."""

    def instance_gone(self, instance: Instance) -> None:
        """Let go of what is kept for an instance that left the routes (idle connections)."""


class RouteTable:
    """All versions this replica can route to, indexed by version id and by function id.

    Args:
        listener: Told about route changes (the gateway's dispatcher); None for a table on its own.
        static_headers: Header lines sent to every instance (region, environment, size limit), each
            ending in CRLF.
    """

    def __init__(
        self, listener: RouteListener | None = None, static_headers: bytes = b"", replicas: int = 1
    ) -> None:
        self._listener = listener
        self._static_headers = static_headers
        self._replicas = max(1, replicas)
        self.leased = False
        """Instances' slots are leased from the shared plane (their capacity is what this replica holds)."""
        """Gateway replicas sharing each version's rate limit."""
        self._versions: dict[str, VersionRoute] = {}
        self._functions: dict[str, list[VersionRoute]] = {}
        self._retiring: dict[str, VersionRoute] = {}
        """Removed versions that still have requests in flight (still reported as load)."""

    def apply(self, route: Mapping[str, Any]) -> None:
        """Apply one version's route, as published by `workflows.routes.route_memo`.

        A route with a lower `routesVersion` than the one applied is stale and ignored; the same or a
        higher one is applied, and lists again any instance dropped after a connection failure. The
        entry is read as a `gpufn.contracts.RouteEntry` of any schema version (an older or newer
        publisher's, during a rolling upgrade).
        """
        route = RouteEntry.parse(route).to_json()
        version_id = str(route["versionId"])
        routes_version = int(route.get("routesVersion", 0))
        version = self._versions.get(version_id)
        if version is None:
            version = self._retiring.pop(version_id, None)
            if version is not None:
                version.removed = False
            else:
                version = VersionRoute(version_id, str(route["functionId"]), str(route["accountId"]))
            self._versions[version_id] = version
            self._functions.setdefault(version.function_id, []).append(version)
        elif routes_version < version.routes_version:
            return
        self._update(version, route, routes_version)
        if self._listener is not None:
            self._listener.routes_changed(version)

    def remove(self, version_id: str) -> None:
        """Forget a version (undeployed at once, or deleted): its queued requests fail."""
        version = self._versions.pop(version_id, None)
        if version is None:
            return
        siblings = self._functions.get(version.function_id, [])
        if version in siblings:
            siblings.remove(version)
        if not siblings:
            self._functions.pop(version.function_id, None)
        version.removed = True
        version.invocable = False
        version.active = []
        for instance in version.instances.values():
            instance.routed = False
        if self._listener is not None:
            self._listener.route_removed(version)
            for instance in version.instances.values():
                self._listener.instance_gone(instance)
        self._forget_idle_instances(version)
        if version.in_flight:
            self._retiring[version_id] = version

    def get(self, version_id: str) -> VersionRoute | None:
        """Return a routed version by id."""
        return self._versions.get(version_id)

    def function_versions(self, function_id: str) -> list[VersionRoute]:
        """Return the routed versions of a function."""
        return self._functions.get(function_id, [])

    def __iter__(self) -> Iterator[VersionRoute]:
        return iter(list(self._versions.values()))

    def __len__(self) -> int:
        return len(self._versions)

    def drop_instance(self, version: VersionRoute, instance: Instance) -> None:
        """Stop sending requests to an instance a connection to failed, until a route lists it again."""
        if instance.failed:
            return
        log.warning("Dropping instance %s of version %s: connection failed", instance.id, version.version_id)
        instance.failed = True
        version.active = [i for i in version.active if i is not instance]
        if self._listener is not None:
            self._listener.instance_gone(instance)

    def released(self, version: VersionRoute, instance: Instance) -> None:
        """Account for a request that ended on `instance`; forget what no longer needs keeping."""
        instance.in_flight -= 1
        version.in_flight -= 1
        if not instance.routed and instance.in_flight == 0:
            version.instances.pop(instance.id, None)
        if version.removed and version.in_flight == 0:
            self._retiring.pop(version.version_id, None)

    def load_snapshot(self) -> dict[str, Any]:
        """Return the load report: every routed version, idle ones included, and retiring ones."""
        versions = {v.version_id: v.load() for v in self._retiring.values()}
        for version in self._versions.values():
            versions[version.version_id] = version.load()
        return {"versions": versions}

    def _update(self, version: VersionRoute, route: Mapping[str, Any], routes_version: int) -> None:
        version.routes_version = routes_version
        version.function_name = str(route.get("functionName", ""))
        version.status = str(route.get("status", FunctionStatus.INACTIVE.value))
        version.deployed = bool(route.get("deployed", False))
        version.invocable = version.status in _INVOCABLE and version.deployed
        rate_limit = route.get("rateLimit")
        if rate_limit != version.rate_limit_config:
            # Built once per change: a limit's buckets live as long as the route and its rate.
            version.rate_limit_config = rate_limit
            version.rate_limit = RateLimit.from_route(rate_limit, self._replicas)
        path = str(route.get("inferenceUrl") or "/")
        if "://" in path:
            # An absolute URL names a path on the instance; the instance address comes from the route.
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        if not path.startswith("/"):
            path = "/" + path
        version.inference_path = header_value(path)
        specs = list(route.get("specs") or [])
        version_headers = (
            b"nvcf-function-id: %s\r\nnvcf-function-name: %s\r\nnvcf-function-version-id: %s\r\n"
            % (
                header_value(version.function_id),
                header_value(version.function_name),
                header_value(version.version_id),
            )
        )
        listed: set[str] = set()
        for item in route.get("instances") or []:
            instance_id = str(item["id"])
            address = str(item.get("address") or "")
            if not address:
                continue
            instance = version.instances.get(instance_id)
            if instance is None or instance.endpoint.url != address:
                try:
                    endpoint = Endpoint(address)
                except ValueError:
                    log.warning("Ignoring instance %s with address %r", instance_id, address)
                    continue
                if instance is None:
                    instance = Instance(instance_id, endpoint)
                    if self.leased:
                        instance.capacity = 0  # until this replica leases slots of it
                    version.instances[instance_id] = instance
                else:
                    # Same id at a new address: one object, so requests in flight still count against it.
                    if self._listener is not None:
                        self._listener.instance_gone(instance)
                    instance.endpoint = endpoint
            spec_index = int(item.get("spec", 0) or 0)
            spec: Mapping[str, Any] = specs[spec_index] if 0 <= spec_index < len(specs) else {}
            instance.limit = max(1, int(spec.get("maxRequestConcurrency") or 1))
            if not self.leased:
                instance.capacity = instance.limit
            instance.routed = True
            instance.failed = False
            instance.prefix = b"".join(
                (
                    b"POST ",
                    version.inference_path,
                    b" HTTP/1.1\r\nhost: ",
                    instance.endpoint.host_header,
                    b"\r\n",
                    version_headers,
                    b"nvcf-backend: %s\r\n" % header_value(spec.get("backend") or ""),
                    b"nvcf-instancetype: %s\r\n" % header_value(spec.get("instanceType") or ""),
                    self._static_headers,
                )
            )
            listed.add(instance_id)
        for instance_id, instance in list(version.instances.items()):
            if instance_id not in listed and instance.routed:
                instance.routed = False
                if self._listener is not None:
                    self._listener.instance_gone(instance)
        self._forget_idle_instances(version)
        version.active = [i for i in version.instances.values() if i.routed and not i.failed]

    @staticmethod
    def _forget_idle_instances(version: VersionRoute) -> None:
        for instance_id, instance in list(version.instances.items()):
            if not instance.routed and instance.in_flight == 0:
                del version.instances[instance_id]
