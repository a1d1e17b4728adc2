"""Helm-chart functions on Kubernetes: each deployment spec of a version is one Helm release.

A version with `helmChart` and `helmChartServiceName` is installed with pyhelm3 as the release
`fn-<versionId>-<specIndex>`, alone in its namespace `<prefix><account>-<versionId>-<specIndex>`, so that the
release's pods are the namespace's pods and tearing it down is uninstalling it and deleting the namespace.
The namespace is the release's record in the cluster (`activities/kube/releases.py`): it carries the labels
of the container backend's objects plus `gpufn.io/helm-release`, and the service name and inference port as
annotations, so that observing and tearing down (which only get the version's id) need nothing else. Like
every namespace gpufn makes, it is hardened: a NetworkPolicy, no service-account token in its default
account, Pod Security admission's baseline (`activities/kube/cluster.py`).

* Values: the deployment specification's `configuration` (NVCF's Helm values override), with what the
  platform decides set over it: the instance count at `replicaCount` (`GPUFN_HELM_REPLICA_COUNT_KEY`), the
  instance type's GPUs as the `nvidia.com/gpu` limit and request at `resources`
  (`GPUFN_HELM_GPU_VALUES_KEY`), and, for a function with secrets, `gpufn.secretName`: the Secret
  `gpufn-secrets` in the release's namespace, which holds the secrets (opened here, never in workflow data
  or in Helm's record of the release) for the chart to mount. The count wins over `configuration`: it is the
  platform's decision, and a chart pinned to another count would make the workflow upgrade it again and again.
* Prepare pins the chart (`RegistryResolver`), renders it with `helm template` and checks that it renders
  the named Service with a selector and the inference port, and gives a pod the instance type's GPUs, so
  that a chart that cannot render or serve ends in ERROR at once, with Helm's own message.
* Ensure installs or upgrades the release with `Client.ensure_release`: a release left pending by a worker
  killed mid-install is uninstalled (or rolled back) and installed again, and an unchanged release is left
  alone, so a retried activity never makes a second release or a needless revision. Installs do not wait
  (`--wait=false`): readiness is judged from the pods.
* Instances are the pods of the namespace that the named Service selects. Their address is
  `http://<podIP>:<targetPort>` of the Service's inference port (ClusterIPs are never used: the gateway calls
  ready pods directly, as for container functions); a pod is RUNNING when Running and Ready, and otherwise
  judged by the container backend's rules (`view_pod`: unschedulable, image pull, crash loop, not ready).
* Scale-down lowers the count through the values; the chart's controller picks the pods to remove. Pods the
  workflow drained (or that failed) are deleted first, so the controller replaces them, and the lower count
  then removes the replacement, which is the newest and not yet ready: Helm functions drain by count.

One informer keeps the release namespaces in memory, and one per release namespace keeps its pods, so
observing reads memory and a pod event wakes the version's watcher.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyhelm3 import errors as helm_errors
from temporalio.exceptions import ApplicationError

from activities.kube.cluster import Cluster
from activities.kube.config import HelmSettings, KubeSettings
from activities.kube.helm_cli import HelmCli
from activities.kube.informer import Informer
from activities.kube.names import VERSION_LABEL, label_value
from activities.kube.placement import instance_gpus
from activities.kube.pods import PodView
from activities.kube.releases import (
    RELEASE_NAMESPACES,
    SECRET_NAME,
    Release,
    ServiceTarget,
    check_rendered_gpus,
    check_rendered_service,
    helm_error,
    instance_view,
    invalid_chart,
    namespace_manifest,
    release_name,
    release_namespace,
    release_values,
    service_target,
)
from activities.kube.secrets import ensure_secret, open_secrets
from activities.kube.wakeups import Wakeups
from activities.registry import RegistryResolver
from gpufn.sealing import SecretBox
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    FunctionVersionSpec,
    InstanceRecord,
    PrepareInput,
    PrepareResult,
    VersionRef,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]

FENCE_SECONDS = 5.0
"""How long ensure_instances waits for the pods to show the new count, so its answer is never stale."""
NAMESPACE_GONE_SECONDS = 60.0
"""How long teardown waits for a release namespace to disappear (its pods are gone well before)."""
EXECUTOR_THREADS = 8


class HelmBackend:
    """The `Backend` of Helm-chart functions on one Kubernetes cluster.

    Args:
        kubeconfig: The cluster's kubeconfig (its current context), for helm and the API client.
        resolver: Pins and downloads charts.
        settings: The container backend's knobs: the namespace prefix and the bounds that judge pods.
        helm: The Helm backend's knobs.
        name: The cluster group name (default: derived from the kubeconfig).
    """

    def __init__(
        self,
        kubeconfig: Path,
        resolver: RegistryResolver,
        settings: KubeSettings,
        helm: HelmSettings,
        name: str | None = None,
    ) -> None:
        self._cluster = Cluster(kubeconfig, name, EXECUTOR_THREADS, "helm")
        self.cluster_group = self._cluster.name
        self._resolver = resolver
        self._settings = settings
        self._helm_settings = helm
        self._core = self._cluster.core
        self._call = self._cluster.call
        self._run = self._cluster.run
        self._helm = HelmCli(kubeconfig, resolver, helm, self.cluster_group)
        self._wakeups = Wakeups()
        self._releases = Informer(
            self._core.list_namespace,
            RELEASE_NAMESPACES,
            self._wakeups.notify,
            f"{self.cluster_group}-releases",
        )
        self._pods: dict[str, Informer] = {}
        self._pod_keys: dict[str, str] = {}
        """Release namespace -> the version (label value) whose watcher its pod events wake."""
        self._seen: set[str] = set()
        """Release namespaces observed alive (and not yet dropped)."""
        self._services: dict[str, ServiceTarget] = {}

    # --- Lifecycle of the backend itself ------------------------------------------------------------

    async def start(self) -> None:
        """Find helm (`HelmCli.start`) and start watching release namespaces (without waiting)."""
        self._wakeups.bind(asyncio.get_running_loop())
        await self._helm.start()
        self._releases.start()

    async def close(self) -> None:
        """Stop watching and close the API client."""
        informers = [self._releases, *self._pods.values()]
        self._pods.clear()
        await asyncio.gather(*(asyncio.to_thread(i.stop) for i in informers))
        self._cluster.close()

    # --- Backend verbs ------------------------------------------------------------------------------

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        """Pin the chart, render it with the deployment's values, and check it renders the function's Service.

        Raises:
            ApplicationError: Non-retryable when the chart is missing, does not render (Helm's message), or
                renders no Service that can serve the function.
        """
        helm = self._helm.require()
        spec = request.spec
        if not spec.helmChart or not spec.helmChartServiceName:
            raise invalid_chart("A Helm-chart function needs helmChart and helmChartServiceName")
        gpus = instance_gpus(self.cluster_group, request.deploymentSpec)[1]
        pinned = (await self._resolver.resolve_chart(spec.helmChart)).pinned
        chart = await self._helm.chart(pinned)
        ref, dspec = request.ref, request.deploymentSpec
        values = self._values(spec, dspec, max(1, dspec.minInstances))
        try:
            rendered = list(
                await helm.template_resources(
                    chart,
                    release_name(ref.versionId, 0),
                    values,
                    namespace=release_namespace(self._settings.namespace_prefix, ref, 0),
                )
            )
        except helm_errors.Error as err:
            raise helm_error(err, f"render the chart {spec.helmChart}") from err
        check_rendered_service(rendered, spec.helmChartServiceName, spec.serving_port)
        check_rendered_gpus(rendered, gpus, self._helm_settings.gpu_values_key)
        return PrepareResult(resolvedChart=pinned)

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        """Delete the pods in `request.remove`, then install or upgrade the release with `count` instances.

        Idempotent: a retry finds the namespace there, the pods gone, and the release deployed with the same
        chart and values (left alone), or left pending by a dead attempt (uninstalled or rolled back first).
        """
        helm = self._helm.require()
        ref, spec = request.ref, request.spec
        release = self._release_of(spec, ref, request.specIndex)
        await self._cluster.wait_synced(self._releases, "its release namespaces")
        namespace = await self._ensure_namespace(release, ref)
        release = replace(release, uid=str(namespace["metadata"].get("uid") or ""))
        pods = await self._pod_informer(release.namespace, label_value(ref.versionId))
        if spec.encryptedSecrets:
            # Before the chart: its pods mount the Secret. Updated values reach the pods started afterwards.
            secrets = open_secrets(self._require_box(), spec)
            await self._run(ensure_secret, self._cluster, release.namespace, SECRET_NAME, ref, secrets)
        if request.remove:
            await self._run(self._cluster.delete_pods, release.namespace, request.remove)
        pinned = (
            request.prepared.resolvedChart
            or (await self._resolver.resolve_chart(spec.helmChart or "")).pinned
        )
        chart = await self._helm.chart(pinned)
        values = self._values(spec, request.deploymentSpec, request.count)
        try:
            await helm.ensure_release(
                release.name,
                chart,
                values,
                namespace=release.namespace,
                create_namespace=False,
                timeout=self._helm.timeout,
                wait=False,
            )
        except helm_errors.Error as err:
            raise helm_error(err, f"install release {release.name} in {release.namespace}") from err
        log.info(
            "Release %s/%s of cluster %s: %s instances",
            release.namespace,
            release.name,
            self.cluster_group,
            request.count,
        )
        await self._fence(release, pods, set(request.remove), request.count)
        return await self.observe(ref, [])

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        """Return the version's instances: the pods its releases' Services select (none for containers)."""
        await self._cluster.wait_synced(self._releases, "its release namespaces")
        key = label_value(ref.versionId)
        now = datetime.now(UTC)
        views: list[PodView] = []
        live: set[str] = set()
        for namespace in self._releases.items(key):
            release = Release.of(namespace)
            if release is None or release.terminating:
                continue
            live.add(release.namespace)
            pods = await self._pod_informer(release.namespace, key)
            target = await self._service(release)
            if target is None:
                continue
            for pod in pods.items(""):
                view = instance_view(pod, now, self._settings, release.spec_index, target)
                if view is not None:
                    views.append(view)
        # Stop watching the version's namespaces that went away (torn down by this or another worker). Only
        # those seen alive before: a namespace ensure_instances just made may not be in the watch yet.
        self._seen.update(live)
        for gone in [n for n, k in self._pod_keys.items() if k == key and n in self._seen and n not in live]:
            await self._drop_namespace(gone)
        self._wakeups.observed(key, (v.deadline for v in views))
        records = [v.record for v in views]
        return sorted(records, key=lambda r: (r.createdAt or now, r.instanceId))

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        """Return when a release or pod of the version changed, a pod's bound passed, or after `max_wait`."""
        await self._wakeups.wait(label_value(ref.versionId), max_wait)

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        """Uninstall the version's releases and delete their namespaces; return once the namespaces are gone.

        Uninstalling runs the chart's pre-delete hooks and removes what it made outside its namespace;
        deleting the namespace removes everything else, a release a failed uninstall left included.
        """
        key = label_value(ref.versionId)
        listed = await self._run(
            self._call,
            "list namespaces",
            self._core.list_namespace,
            label_selector=f"{RELEASE_NAMESPACES},{VERSION_LABEL}={key}",
        )
        namespaces = list((listed or {}).get("items") or [])
        for namespace in namespaces:
            release = Release.of(namespace)
            name = namespace["metadata"]["name"]
            self._services.pop(str(namespace["metadata"].get("uid") or ""), None)
            if release is not None and not release.terminating and self._helm.client is not None:
                await self._helm.uninstall(release)
            await self._run(self._call, "delete a namespace", self._core.delete_namespace, name, ok=(404,))
            log.info("Deleted release namespace %s of cluster %s", name, self.cluster_group)
        for namespace in namespaces:
            await self._cluster.wait_namespace_gone(namespace["metadata"]["name"], NAMESPACE_GONE_SECONDS)
        for namespace in namespaces:
            await self._drop_namespace(namespace["metadata"]["name"])
        self._wakeups.forget(key)

    # --- Helpers: helm ------------------------------------------------------------------------------

    def _release_of(self, spec: FunctionVersionSpec, ref: VersionRef, spec_index: int) -> Release:
        if not spec.helmChart or not spec.helmChartServiceName:
            raise invalid_chart("A Helm-chart function needs helmChart and helmChartServiceName")
        return Release(
            name=release_name(ref.versionId, spec_index),
            namespace=release_namespace(self._settings.namespace_prefix, ref, spec_index),
            spec_index=spec_index,
            service=spec.helmChartServiceName,
            port=spec.serving_port,
        )

    # --- Helpers: objects ---------------------------------------------------------------------------

    async def _ensure_namespace(self, release: Release, ref: VersionRef) -> JSON:
        """Create the release's namespace (idempotent, hardened) and wait until pods can be created in it."""
        namespace = await self._cluster.create_namespace(namespace_manifest(release, ref))
        if namespace is None:
            existing: JSON = await self._run(
                self._call, "read a namespace", self._core.read_namespace, release.namespace
            )
            namespace = existing
        found = Release.of(namespace)
        if found is None or found.terminating:
            # Retryable: the version's previous deployment is still being deleted (or another namespace
            # has the name, which an operator must sort out).
            raise ApplicationError(
                f"Namespace {release.namespace} is being deleted, or is not a gpufn release namespace",
                type="NamespaceNotReady",
            )
        await self._cluster.prepare_namespace(release.namespace, self._settings)
        return namespace

    async def _service(self, release: Release) -> ServiceTarget | None:
        """Return where the release's Service sends traffic (cached), or None while it is missing."""
        cached = self._services.get(release.uid)
        if cached is not None:
            return cached
        service = await self._run(
            self._call,
            "read a Service",
            self._core.read_namespaced_service,
            release.service,
            release.namespace,
            ok=(404,),
        )
        if service is None:
            return None
        target = service_target(service, release.port)
        if isinstance(target, str):
            log.warning("Release %s/%s: %s", release.namespace, release.name, target)
            return None
        # The Service only changes with the deployment's configuration, which a deployment never changes.
        if release.uid:
            self._services[release.uid] = target
        return target

    async def _fence(self, release: Release, pods: Informer, removed: set[str], count: int) -> None:
        """Wait (briefly) until the watched pods show the removed pods gone and `count` instances.

        Otherwise the answer could show a removed pod, or the replacement its controller made before the
        lower count reached it, and the workflow would act on that.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FENCE_SECONDS
        while loop.time() < deadline:
            target = await self._service(release)
            if target is not None:
                now = datetime.now(UTC)
                live = [
                    p
                    for p in pods.items("")
                    if instance_view(p, now, self._settings, release.spec_index, target) is not None
                ]
                names = {p["metadata"]["name"] for p in live}
                if not names & removed and len(live) == count:
                    return
            await asyncio.sleep(0.02)
        log.info(
            "Release %s/%s does not show %s instances after %s s",
            release.namespace,
            release.name,
            count,
            FENCE_SECONDS,
        )

    # --- Helpers: informers, threads, events --------------------------------------------------------

    async def _pod_informer(self, namespace: str, key: str) -> Informer:
        """Return the informer of a release namespace's pods, started (and synced) on first use."""
        informer = self._pods.get(namespace)
        if informer is None:
            informer = Informer(
                functools.partial(self._core.list_namespaced_pod, namespace),
                None,
                lambda _: self._wakeups.notify({key}),
                f"{self.cluster_group}-{namespace}",
            )
            self._pods[namespace] = informer
            self._pod_keys[namespace] = key
            informer.start()
        await self._cluster.wait_synced(informer, f"the pods of {namespace}")
        return informer

    async def _drop_namespace(self, namespace: str) -> None:
        informer = self._pods.pop(namespace, None)
        self._pod_keys.pop(namespace, None)
        self._seen.discard(namespace)
        if informer is not None:
            await asyncio.to_thread(informer.stop)

    # --- Helpers: values ----------------------------------------------------------------------------

    def _values(self, spec: FunctionVersionSpec, dspec: DeploymentSpecification, count: int) -> JSON:
        """Return the release's values: the deployment's configuration, the count, the GPUs, the secrets."""
        return release_values(
            dspec.configuration,
            count,
            self._helm_settings.replica_count_key,
            gpus=instance_gpus(self.cluster_group, dspec)[1],
            gpu_key=self._helm_settings.gpu_values_key,
            secret_name=SECRET_NAME if spec.encryptedSecrets else None,
        )

    def _require_box(self) -> SecretBox:
        if self._helm_settings.secret_box is None:
            raise ApplicationError(
                f"Cluster group '{self.cluster_group}' cannot open secrets (no secret key)",
                type="SecretUnreadable",
                non_retryable=True,
            )
        return self._helm_settings.secret_box
