"""The Helm backend's helm: finding the executable, its private homes, the chart cache, uninstalling.

pyhelm3 runs helm with the worker's own environment (it takes no other), so helm's homes are set there,
unless the operator set them. A worker without a working helm still starts: Helm-chart functions on that
cluster group then fail at once with `HelmUnavailable`, saying why.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pyhelm3
from pyhelm3 import errors as helm_errors
from temporalio.exceptions import ApplicationError

from activities.kube.config import HelmSettings
from activities.kube.releases import Release, helm_error
from activities.registry import RegistryResolver

log = logging.getLogger(__name__)

HELM_HOMES = {"HELM_CACHE_HOME": "cache", "HELM_CONFIG_HOME": "config", "HELM_DATA_HOME": "data"}


class HelmCli:
    """One cluster's helm client, its chart cache and its uninstall.

    Args:
        kubeconfig: The cluster's kubeconfig, for helm.
        resolver: Downloads (and verifies) pinned charts.
        settings: The Helm backend's knobs (executable, home, timeout).
        cluster_group: The cluster group's name, for messages.
    """

    def __init__(
        self, kubeconfig: Path, resolver: RegistryResolver, settings: HelmSettings, cluster_group: str
    ) -> None:
        self._kubeconfig = kubeconfig
        self._resolver = resolver
        self._settings = settings
        self._cluster_group = cluster_group
        self._client: pyhelm3.Client | None = None
        self._problem = "the Helm backend is not started"
        self._chart_locks: dict[str, asyncio.Lock] = {}

    @property
    def timeout(self) -> str:
        """Helm's `--timeout` for installs and uninstalls."""
        return f"{int(self._settings.timeout_seconds)}s"

    @property
    def client(self) -> pyhelm3.Client | None:
        """The helm client, or None when this worker has no working helm."""
        return self._client

    async def start(self) -> None:
        """Find helm, give it private homes, and check that it runs."""
        home = self._settings.home
        for variable, sub in HELM_HOMES.items():
            os.environ.setdefault(variable, str(home / sub))
        executable = self._settings.executable or shutil.which("helm")
        if executable is None:
            self._problem = "helm is not installed on this worker (set GPUFN_HELM_EXECUTABLE)"
            log.warning("Helm-chart functions disabled on cluster %s: %s", self._cluster_group, self._problem)
            return
        try:
            self._client = await asyncio.to_thread(
                pyhelm3.Client,
                executable=executable,
                kubeconfig=self._kubeconfig,
                default_timeout=self.timeout,
            )
        except (AssertionError, OSError, ValueError, subprocess.CalledProcessError) as err:
            self._problem = f"helm at {executable} does not work: {err}"
            log.warning("Helm-chart functions disabled on cluster %s: %s", self._cluster_group, err)

    def require(self) -> pyhelm3.Client:
        """Return the helm client, or fail non-retryably saying why there is none."""
        if self._client is None:
            raise ApplicationError(
                f"Helm-chart functions cannot run on cluster group '{self._cluster_group}': {self._problem}",
                type="HelmUnavailable",
                non_retryable=True,
            )
        return self._client

    async def chart(self, pinned: str) -> pyhelm3.Chart:
        """Return the pinned chart, downloaded (and verified) once per worker into the chart cache."""
        helm = self.require()
        key = hashlib.sha256(pinned.encode()).hexdigest()[:32]
        directory = self._settings.home / "charts" / key
        async with self._chart_locks.setdefault(key, asyncio.Lock()):
            archives = sorted(directory.glob("*.tgz")) if directory.is_dir() else []
            if not archives:
                staging = directory.with_name(f"{key}.partial")
                await asyncio.to_thread(shutil.rmtree, staging, True)
                await asyncio.to_thread(staging.mkdir, parents=True)
                await self._resolver.fetch_chart(pinned, staging)
                # Renamed whole, so a worker killed mid-download leaves no half chart in the cache. Another
                # worker sharing the home may have won the race: its copy is the same verified chart.
                try:
                    await asyncio.to_thread(staging.rename, directory)
                except OSError:
                    await asyncio.to_thread(shutil.rmtree, staging, True)
                archives = sorted(directory.glob("*.tgz"))
        try:
            return await helm.get_chart(archives[0])
        except helm_errors.Error as err:
            raise helm_error(err, f"read the chart {pinned}") from err

    async def uninstall(self, release: Release) -> None:
        """Uninstall a release (gone already counts); a permanent failure falls back to no hooks."""
        helm = self.require()
        try:
            await helm.uninstall_release(release.name, namespace=release.namespace, timeout=self.timeout)
            return
        except helm_errors.Error as err:
            failure = helm_error(err, f"uninstall release {release.name}")
            if not failure.non_retryable:
                raise failure from err
            log.warning("%s; uninstalling without hooks", failure.message)
        try:
            await helm.uninstall_release(
                release.name, namespace=release.namespace, timeout=self.timeout, no_hooks=True
            )
        except helm_errors.Error as err:
            # Deleting the namespace still removes the release and everything in it.
            log.warning("%s; deleting its namespace regardless", helm_error(err, "uninstall").message)
