"""The gateway's Prometheus metrics, on a registry of its own.

Counters and histograms are labelled by function id and version id (bounded: one set per deployed version)
and, for the request counter, by status class and outcome (both small fixed sets). Request ids never
become labels. The children of each version are bound once and cached, so recording a request costs a dict
lookup and a few `inc`/`observe` calls, no label resolution.

Queue depth, requests in flight and ready instances are read from the route table when scraped (a custom
collector), so the hot path does nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.observability.records import OUTCOMES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Seconds: from a few milliseconds (a warm call) to minutes (a cold start of a large image)."""

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

VERSION_LABELS = ("function_id", "version_id")


class VersionMetrics:
    """The pre-bound metric children of one function version."""

    __slots__ = (
        "_family",
        "_labels",
        "cold_start_wait",
        "duration",
        "instance_time",
        "queue_wait",
        "request_bytes",
        "requests",
        "response_bytes",
    )

    def __init__(self, metrics: GatewayMetrics, function_id: str, version_id: str) -> None:
        self.queue_wait = metrics.queue_wait.labels(function_id, version_id)
        self.cold_start_wait = metrics.cold_start_wait.labels(function_id, version_id)
        self.instance_time = metrics.instance_time.labels(function_id, version_id)
        self.duration = metrics.duration.labels(function_id, version_id)
        self.request_bytes = metrics.request_bytes.labels(function_id, version_id)
        self.response_bytes = metrics.response_bytes.labels(function_id, version_id)
        # status class -> outcome -> counter, bound lazily (most versions see few combinations).
        self.requests: dict[str, dict[str, Any]] = {}
        self._family = metrics.requests
        self._labels = (function_id, version_id)

    def request_counter(self, status: int, outcome: str) -> Any:
        """Return the request counter child of a status and outcome."""
        status_class = STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]
        by_outcome = self.requests.get(status_class)
        if by_outcome is None:
            by_outcome = self.requests[status_class] = {}
        child = by_outcome.get(outcome)
        if child is None:
            child = by_outcome[outcome] = self._family.labels(*self._labels, status_class, outcome)
        return child


class _LoadCollector(Collector):
    """Queue depth, in-flight requests and ready instances per version, read from the route table."""

    def __init__(self, load: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        self._load = load

    def collect(self) -> Iterable[Metric]:
        versions = self._load()
        families = (
            (
                "queued",
                "gpufn_gateway_queue_depth",
                "Requests waiting in this replica's queue of the version.",
            ),
            ("inFlight", "gpufn_gateway_in_flight", "Requests this replica runs on the version's instances."),
            (
                "ready",
                "gpufn_gateway_ready_instances",
                "Instances this replica routes the version's requests to.",
            ),
        )
        for field, name, help_text in families:
            family = GaugeMetricFamily(name, help_text, labels=["version_id"])
            for version_id, item in sorted(versions.items()):
                family.add_metric([version_id], float(item.get(field, 0)))
            yield family


class GatewayMetrics:
    """The gateway's metric families and the cache of their per-version children.

    Args:
        registry: Where the families are registered (one registry per gateway, so tests and replicas in
            one process do not mix their counts).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "gpufn_gateway_requests",
            "Invocations answered, by status class and outcome ("
            + ", ".join(OUTCOMES)
            + "); refusals before acceptance (401, 403, 404, 400) are not counted.",
            (*VERSION_LABELS, "status_class", "outcome"),
            registry=reg,
        )
        self.queue_wait = Histogram(
            "gpufn_gateway_queue_wait_seconds",
            "Time from a request's arrival until an instance slot took it (cold starts included).",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.cold_start_wait = Histogram(
            "gpufn_gateway_cold_start_wait_seconds",
            "For requests that arrived while their version had no ready instance: time until one was ready.",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.instance_time = Histogram(
            "gpufn_gateway_instance_seconds",
            "Time from an instance taking a request until its answer was complete.",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.duration = Histogram(
            "gpufn_gateway_request_duration_seconds",
            "Time from a request's arrival until its answer was complete (not until a poll fetched it).",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.request_bytes = Counter(
            "gpufn_gateway_request_bytes", "Bytes of accepted request bodies.", VERSION_LABELS, registry=reg
        )
        self.response_bytes = Counter(
            "gpufn_gateway_response_bytes",
            "Bytes of answer bodies (streamed answers are not counted).",
            VERSION_LABELS,
            registry=reg,
        )
        self._versions: dict[str, VersionMetrics] = {}

    def version(self, function_id: str, version_id: str) -> VersionMetrics:
        """Return the version's pre-bound children (bound on first use)."""
        bound = self._versions.get(version_id)
        if bound is None:
            bound = self._versions[version_id] = VersionMetrics(self, function_id, version_id)
        return bound

    def watch_load(self, load: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        """Export the per-version load gauges, read from `load()` at each scrape."""
        self.registry.register(_LoadCollector(load))
