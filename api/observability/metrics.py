"""The gateway's Prometheus metrics, on a registry of its own.

Counters and histograms are labelled by function id and version id (bounded: one set per deployed version)
and, for the request counter, by status class and outcome (both small fixed sets). Request ids never
become labels.

The gateway records on its event loop's thread only, so its per-version counts are plain Python numbers on
one object per version (`VersionMetrics`, bound once and cached): recording a request costs a dict lookup,
a `bisect` per histogram and a few additions, no locks and no label resolution. A `prometheus_client`
collector turns them into metric families when scraped (from the exporter's thread: it copies before it
reads, and the interpreter lock makes each single update atomic). `prometheus_client` does the registry,
the exposition format and the HTTP serving.

Queue depth, requests in flight and ready instances are read from the route table when scraped, so the
hot path does nothing for them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from api.observability.records import OUTCOMES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Seconds: from a few milliseconds (a warm call) to minutes (a cold start of a large image)."""
_BUCKET_LABELS = [*(floatToGoString(b) for b in LATENCY_BUCKETS), "+Inf"]

STATUS_CLASSES = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")
"""Status class by `status // 100` (0 and below count as 1xx; 6xx and above are clamped to 5xx)."""

VERSION_LABELS = ["function_id", "version_id"]

HISTOGRAMS = (
    (
        "queue_wait",
        "gpufn_gateway_queue_wait_seconds",
        "Time from a request's arrival until an instance slot took it (cold starts included).",
    ),
    (
        "cold_start_wait",
        "gpufn_gateway_cold_start_wait_seconds",
        "For requests that arrived while their version had no ready instance: time until one was ready.",
    ),
    (
        "instance_time",
        "gpufn_gateway_instance_seconds",
        "Time from an instance taking a request until its answer was complete.",
    ),
    (
        "duration",
        "gpufn_gateway_request_duration_seconds",
        "Time from a request's arrival until its answer was complete (not until a poll fetched it).",
    ),
)


class Histogram:
    """Observations of one version in the latency buckets (non-cumulative; summed when scraped)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """Return the buckets as Prometheus has them (cumulative, `le` labels) and the sum."""
        counts, total = list(self.counts), self.total
        running = 0
        buckets: list[tuple[str, float]] = []
        for label, count in zip(_BUCKET_LABELS, counts, strict=True):
            running += count
            buckets.append((label, running))
        return buckets, total


class VersionMetrics:
    """The counts of one function version."""

    __slots__ = (
        "cold_start_wait",
        "duration",
        "function_id",
        "instance_time",
        "queue_wait",
        "request_bytes",
        "requests",
        "response_bytes",
        "version_id",
    )

    def __init__(self, function_id: str, version_id: str) -> None:
        self.function_id = function_id
        self.version_id = version_id
        self.queue_wait = Histogram()
        self.cold_start_wait = Histogram()
        self.instance_time = Histogram()
        self.duration = Histogram()
        self.request_bytes = 0
        self.response_bytes = 0
        self.requests: dict[str, dict[str, int]] = {}
        """Requests by status class, then outcome."""

    def count(self, status: int, outcome: str) -> None:
        """Count one request answered with `status`, ending as `outcome`."""
        status_class = STATUS_CLASSES[min(max(status // 100, 0), 5)]
        by_outcome = self.requests.get(status_class)
        if by_outcome is None:
            by_outcome = self.requests[status_class] = {}
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1


class GatewayMetrics(Collector):
    """The gateway's metrics: per-version counts, exported as metric families when scraped.

    Args:
        registry: Where to register (a fresh registry when omitted: one per gateway, so tests and
            replicas in one process do not mix their counts).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._versions: dict[str, VersionMetrics] = {}
        self._load: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None
        self.registry.register(self)

    def version(self, function_id: str, version_id: str) -> VersionMetrics:
        """Return the version's counts (created on first use)."""
        bound = self._versions.get(version_id)
        if bound is None:
            bound = self._versions[version_id] = VersionMetrics(function_id, version_id)
        return bound

    def watch_load(self, load: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        """Export the per-version load gauges, read from `load()` at each scrape."""
        self._load = load

    def collect(self) -> Iterable[Metric]:
        """Return the metric families (called by the registry when scraped)."""
        versions = list(self._versions.values())
        requests = CounterMetricFamily(
            "gpufn_gateway_requests",
            "Invocations answered, by status class and outcome ("
            + ", ".join(OUTCOMES)
            + "); refusals before a version is chosen (401, 403, 404, 400) are not counted.",
            labels=[*VERSION_LABELS, "status_class", "outcome"],
        )
        request_bytes = CounterMetricFamily(
            "gpufn_gateway_request_bytes", "Bytes of accepted request bodies.", labels=VERSION_LABELS
        )
        response_bytes = CounterMetricFamily(
            "gpufn_gateway_response_bytes",
            "Bytes of answer bodies (streamed answers are not counted).",
            labels=VERSION_LABELS,
        )
        histograms = {
            attribute: HistogramMetricFamily(name, help_text, labels=VERSION_LABELS)
            for attribute, name, help_text in HISTOGRAMS
        }
        for bound in versions:
            labels = [bound.function_id, bound.version_id]
            for status_class, by_outcome in sorted(dict(bound.requests).items()):
                for outcome, count in sorted(dict(by_outcome).items()):
                    requests.add_metric([*labels, status_class, outcome], count)
            request_bytes.add_metric(labels, bound.request_bytes)
            response_bytes.add_metric(labels, bound.response_bytes)
            for attribute, family in histograms.items():
                buckets, total = getattr(bound, attribute).cumulative()
                family.add_metric(labels, buckets, total)
        yield requests
        yield from histograms.values()
        yield request_bytes
        yield response_bytes
        if self._load is not None:
            yield from _load_gauges(self._load())


def _load_gauges(versions: Mapping[str, Mapping[str, Any]]) -> Iterable[Metric]:
    """Queue depth, in-flight requests and ready instances per version, from the route table."""
    families = (
        ("queued", "gpufn_gateway_queue_depth", "Requests waiting in this replica's queue of the version."),
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
