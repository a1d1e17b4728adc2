"""Helpers of the platform chart tests: helm (the binary tests/cluster/build.sh caches) and rendering."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.fixtures import real_cluster
from tests.cluster.harness import cache_dir, helm_environment
from tests.conftest import ROOT

__all__ = ["CHART", "REQUIRED", "Helm", "helm", "real_cluster"]

CHART = ROOT / "deploy" / "helm" / "gpufn"
REQUIRED = {
    "image": {"repository": "registry.example.com/gpufn", "tag": "1.2.3"},
    "temporal": {"address": "temporal:7233"},
}


@dataclass
class Helm:
    """The helm binary with private homes, so tests never read or write the user's helm configuration."""

    binary: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}{done.stdout}"
            )
        return done

    def template(
        self, values: dict[str, Any], workdir: Path, namespace: str = "gpufn", release: str = "gpufn"
    ) -> list[dict[str, Any]]:
        """Render the chart with `values` (merged over REQUIRED) and return its objects."""
        path = write_values(workdir, merge(REQUIRED, values))
        done = self.run("template", release, str(CHART), "--namespace", namespace, "-f", str(path))
        return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge nested dicts the way helm merges values files (override wins, dicts merge)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_values(workdir: Path, values: dict[str, Any]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"values-{len(list(workdir.glob('values-*.json')))}.json"
    # JSON is YAML: helm reads it as a values file.
    path.write_text(json.dumps(values))
    return path


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return local_helm(tmp_path_factory)


def local_helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Return the cluster build's helm with a private home and no cluster (skip the test without it)."""
    binary = cache_dir() / "bin" / "helm"
    if not os.access(binary, os.X_OK):
        pytest.skip(f"no helm at {binary}: run bash tests/cluster/build.sh (make test-cluster)")
    env = helm_environment(tmp_path_factory.mktemp("helm-home"))
    env.pop("KUBECONFIG", None)
    return Helm(binary, env)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """Return the one object of `kind` (and `name`)."""
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (
        f"{len(found)} {kind} {name or ''} in {[(o['kind'], o['metadata']['name']) for o in objects]}"
    )
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    [only] = workload["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def env_of(workload: dict[str, Any]) -> dict[str, str]:
    """The plain `value` entries of a workload's container env."""
    return {e["name"]: e["value"] for e in container(workload).get("env", []) if "value" in e}
