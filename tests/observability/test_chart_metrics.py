"""The platform chart's metrics values: ports, settings, scrape annotations and the PodMonitor.

Rendered with the real helm binary (tests/cluster/build.sh caches it); the settings are read back with
`Settings`, as the processes read them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufn.settings import Settings
from tests.platform_chart.conftest import Helm, container, find, local_helm


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return local_helm(tmp_path_factory)


def test_metrics_are_off_by_default(chart: Helm, tmp_path: Path) -> None:
    objects = chart.template({}, tmp_path)
    config = find(objects, "ConfigMap", "gpufn-config")["data"]
    assert not [name for name in config if "METRICS" in name]
    assert "PodMonitor" not in {o["kind"] for o in objects}
    for workload in (find(objects, "StatefulSet"), find(objects, "Deployment")):
        assert "prometheus.io/scrape" not in workload["spec"]["template"]["metadata"]["annotations"]


def test_metrics_ports_settings_annotations_and_pod_monitor(
    chart: Helm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = chart.template({"metrics": {"enabled": True, "podMonitor": {"enabled": True}}}, tmp_path)
    config = find(objects, "ConfigMap", "gpufn-config")["data"]
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.api_metrics_address == "0.0.0.0:9464"
    assert settings.worker_metrics_address == "0.0.0.0:9465"
    assert settings.worker_sdk_metrics_address == "0.0.0.0:9466"

    api, worker = find(objects, "StatefulSet"), find(objects, "Deployment")
    assert {p["name"]: p["containerPort"] for p in container(api)["ports"]}["metrics"] == 9464
    assert {p["name"]: p["containerPort"] for p in container(worker)["ports"]} == {
        "metrics": 9465,
        "sdk-metrics": 9466,
    }
    api_annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert api_annotations["prometheus.io/scrape"] == "true"
    assert api_annotations["prometheus.io/port"] == "9464"
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9465"

    monitor = find(objects, "PodMonitor")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics", "sdk-metrics"]
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
