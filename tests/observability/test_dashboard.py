"""The Grafana dashboard charts only metrics gpufn exports, under the names and label names it exports."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry

from activities.telemetry import WorkerMetrics
from api.observability.metrics import GatewayMetrics
from tests.conftest import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "gpufn.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Return every sample name the registry exports, with the label names of its family."""
    names: dict[str, set[str]] = {}
    for family in registry.collect():
        labels = {name for sample in family.samples for name in sample.labels}
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = labels | set(getattr(family, "_labelnames", ()))
    return names


def test_dashboard_queries_exported_metrics() -> None:
    gateway, worker = GatewayMetrics(), WorkerMetrics()
    gateway.watch_load(lambda: {"v": {"queued": 0, "inFlight": 0, "ready": 0}})
    # Bind one child of each labelled family, so its label names show in the samples.
    bound = gateway.version("f", "v")
    bound.count(200, "direct")
    worker.activities.labels("a", "ok").inc(0)
    for family in (worker.instance_starts, worker.instance_failures, worker.cold_start):
        family.labels("f", "v", "CPU", "LOCAL.CPU")
    worker.scaling_decisions.labels("f", "v", "rule", "up")
    worker.deployments.labels("ACTIVE").set(0)
    names = exported(gateway.registry) | exported(worker.registry)

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "gpufn"
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bgpufn_\w+", expr)}
    assert used, "the dashboard charts no gpufn metric"
    missing = used - set(names)
    assert not missing, f"the dashboard queries metrics gpufn does not export: {sorted(missing)}"
    for expr in exprs:
        for name, selector in re.findall(r"\b(gpufn_\w+)\{([^}]*)\}", expr):
            labels = set(re.findall(r"(\w+)\s*(?:=~|!=|=)", selector))
            assert labels <= names[name] | {"le"}, (name, labels, names[name])
