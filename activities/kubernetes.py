"""The Kubernetes backend: each deployment spec of a version is a Deployment; its pods are the instances.

Objects live in the account's namespace (`gpufn-<account>`), carry the labels `app.kubernetes.io/managed-by`,
`gpufn.io/function-id`, `gpufn.io/version-id` and `gpufn.io/account`, and are named after the version
(`fn-<versionId>-<specIndex>`):

* a Deployment whose replicas are the spec's instance count. Its pods ask for `nvidia.com/gpu` as the
  instance type says, require a node whose `nvidia.com/gpu.product` is the spec's GPU, run `containerArgs`
  as the container command, are ready when the version's health check passes (a readiness probe), and are
  hardened (`activities/kube/manifests.py`);
* a Secret with the version's secrets, opened from their sealed form here (never in workflow data) and
  owned by the Deployment, so that deleting the Deployment removes everything.

The namespace gets a NetworkPolicy that isolates its pods (`activities/kube/cluster.py`). Prepare checks the
cluster has the spec's GPU and makes a server-side dry run of the Deployment, so that permissions, admission
and quota refuse a deployment at once, with the API server's words.

One watch per cluster keeps every gpufn pod in memory: observing a version reads memory, and a pod event
wakes the version's watcher activity at once. Pods are judged by `activities/kube/pods.py`; an ERRORED pod's
warning events and last log lines are added to its error (`activities/kube/diagnosis.py`).

Scale-down removes exactly the pods the workflow drained. Kubernetes 1.20 has no pod-deletion-cost, so
those pods are first released from their ReplicaSet (a label change takes them out of its selector), then
the replica count is lowered, then the released pods are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from activities.kube.cluster import Cluster
from activities.kube.config import KubeSettings
from activities.kube.diagnosis import FailureDetails
from activities.kube.errors import AlreadyExists, api_error, invalid_spec
from activities.kube.informer import Informer
from activities.kube.manifests import deployment_manifest, namespace_manifest
from activities.kube.names import (
    MANAGED_SELECTOR,
    MERGE_PATCH,
    deployment_name,
    label_value,
    namespace_name,
    version_selector,
)
from activities.kube.placement import gpu_products, instance_gpus
from activities.kube.pods import scheduler_decided, view_pod
from activities.kube.removal import delete_version_objects, force_delete_stuck, release_pods
from activities.kube.secrets import open_secrets, refresh_secret, secret_manifest
from activities.kube.wakeups import Wakeups
from gpufn.kube_inventory import (
    cluster_group_names,
    gpu_nodes,
)
from gpufn.sealing import SecretBox
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    InstanceRecord,
    PrepareInput,
    PrepareResult,
    VersionRef,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]

FENCE_SECONDS = 5.0
"""How long ensure_instances waits for the watch to show its own changes, so its answer is never stale."""
POLL_SECONDS = 0.25
EXECUTOR_THREADS = 16


class KubernetesBackend:
    """The `Backend` of one Kubernetes cluster (cluster group): container functions as Deployments.

    Args:
        kubeconfig: The cluster's kubeconfig; its current context is used.
        secret_box: Opens the version's sealed secrets.
        settings: Bounds and knobs.
        name: The cluster group name (default: derived from the kubeconfig).
    """

    def __init__(
        self, kubeconfig: Path, secret_box: SecretBox, settings: KubeSettings, name: str | None = None
    ) -> None:
        self._cluster = Cluster(kubeconfig, name, EXECUTOR_THREADS, "kube")
        self.cluster_group = self._cluster.name
        self._core = self._cluster.core
        self._apps = self._cluster.apps
        self._call = self._cluster.call
        self._run = self._cluster.run
        self._box = secret_box
        self._settings = settings
        self._wakeups = Wakeups()
        self._informer = Informer(
            self._core.list_pod_for_all_namespaces, MANAGED_SELECTOR, self._wakeups.notify, self.cluster_group
        )
        self._details = FailureDetails(self._cluster)
        self._namespaces: set[str] = set()

    # --- Lifecycle of the backend itself ------------------------------------------------------------

    async def start(self) -> None:
        """Start watching the cluster's gpufn pods (does not wait for the cluster)."""
        self._wakeups.bind(asyncio.get_running_loop())
        self._informer.start()

    async def close(self) -> None:
        """Stop watching and close the API client."""
        await asyncio.get_running_loop().run_in_executor(None, self._informer.stop)
        self._cluster.close()

    # --- Backend verbs ------------------------------------------------------------------------------

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        """Check that the cluster can run the spec: an image, nodes with its GPU, an object it accepts.

        Raises:
            ApplicationError: Non-retryable when the cluster can never run the spec as it is.
        """
        spec = request.spec
        if spec.helmChart:
            raise invalid_spec(
                f"Helm-chart functions are not served by the container backend of cluster group "
                f"'{self.cluster_group}'"
            )
        if not spec.containerImage:
            raise invalid_spec("A container function needs a containerImage")
        if spec.containerArgs:
            try:
                shlex.split(spec.containerArgs)
            except ValueError as err:
                raise invalid_spec(f"containerArgs is not a valid shell-quoted command line: {err}") from err
        # A server-side dry run of the Deployment: permissions, admission and quota refuse it here, where
        # the workflow ends in ERROR with the reason, rather than later while it scales.
        ref = request.ref
        namespace = namespace_name(self._settings.namespace_prefix, ref.accountId)
        name = deployment_name(ref.versionId, 0)
        draft = EnsureInstancesInput(
            ref=ref,
            spec=spec,
            deploymentSpec=request.deploymentSpec,
            specIndex=0,
            count=0,
            prepared=PrepareResult(resolvedImage=spec.containerImage),
        )
        secret_name = name if spec.encryptedSecrets else None
        manifest = await self._manifest(draft, namespace, name, secret_name, permanent=True)
        await self._ensure_namespace(namespace)
        await self._run(
            self._call,
            "create a Deployment",
            self._apps.create_namespaced_deployment,
            namespace,
            manifest,
            dry_run="All",
            ok=(409,),
        )
        return PrepareResult(resolvedImage=spec.containerImage)

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        """Remove exactly the pods in `request.remove`, then give the spec's Deployment `count` replicas.

        Idempotent: a retry finds the released pods released (or gone), the Deployment created, the replica
        count already right.
        """
        ref = request.ref
        namespace = namespace_name(self._settings.namespace_prefix, ref.accountId)
        name = deployment_name(ref.versionId, request.specIndex)
        await self._cluster.wait_synced(self._informer, "its pods")
        await self._ensure_namespace(namespace)
        released = await self._run(release_pods, self._cluster, namespace, ref.versionId, request.remove)
        current = await self._run(
            self._call, "read a Deployment", self._apps.read_namespaced_deployment, name, namespace, ok=(404,)
        )
        if current is None:
            await self._create(request, namespace, name)
        else:
            if request.spec.encryptedSecrets:
                # Secrets updated since the deploy reach the pods started from now on.
                await self._run(self._refresh_secret, namespace, name, open_secrets(self._box, request.spec))
            if (current.get("spec") or {}).get("replicas") != request.count:
                await self._run(self._scale, namespace, name, request.count)
        if released:
            await self._run(self._cluster.delete_pods, namespace, released)
        await self._fence(ref.versionId, request.specIndex, released, request.count)
        return await self.observe(ref, [])

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        """Return the version's instances in this cluster, from the watched pods."""
        await self._cluster.wait_synced(self._informer, "its pods")
        key = label_value(ref.versionId)
        pods = self._informer.items(key)
        now = datetime.now(UTC)
        views = [v for v in (view_pod(p, now, self._settings) for p in pods) if v is not None]
        self._wakeups.observed(key, (v.deadline for v in views))
        records = [await self._details.explained(ref.versionId, pods, v) for v in views]
        self._details.keep_only(ref.versionId, {v.uid for v in views})
        return sorted(records, key=lambda r: (r.createdAt or now, r.instanceId))

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        """Return when a pod of the version changed, a pod's bound passed, or after `max_wait` seconds."""
        await self._wakeups.wait(label_value(ref.versionId), max_wait)

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        """Delete every object of the version; return once no pod of it is left."""
        namespace = namespace_name(self._settings.namespace_prefix, ref.accountId)
        selector = version_selector(ref.versionId)
        await self._run(delete_version_objects, self._cluster, namespace, selector)
        while True:
            pods = await self._run(
                self._call,
                "list pods",
                self._core.list_namespaced_pod,
                namespace,
                label_selector=selector,
                ok=(404,),
            )
            items = (pods or {}).get("items") or []
            if not items:
                break
            if any(not p["metadata"].get("deletionTimestamp") for p in items):
                # Pods the ReplicaSet made before it went, or released pods a crashed worker left.
                await self._run(delete_version_objects, self._cluster, namespace, selector)
                await self._run(
                    self._call,
                    "delete pods",
                    self._core.delete_collection_namespaced_pod,
                    namespace,
                    label_selector=selector,
                    ok=(404,),
                )
            await self._run(force_delete_stuck, self._cluster, namespace, items)
            await asyncio.sleep(POLL_SECONDS)
        self._wakeups.forget(label_value(ref.versionId))
        self._details.forget(ref.versionId)

    # --- Helpers: objects ----------------------------------------------------------------------------

    async def _manifest(
        self,
        request: EnsureInstancesInput,
        namespace: str,
        name: str,
        secret_name: str | None,
        permanent: bool,
    ) -> JSON:
        """Return the spec's Deployment, steered to the cluster's nodes with its GPU (read now)."""
        gpu, count = instance_gpus(self.cluster_group, request.deploymentSpec)
        nodes = gpu_nodes(
            (await self._run(self._call, "list nodes", self._core.list_node)).get("items") or []
        )
        return deployment_manifest(
            request=request,
            name=name,
            namespace=namespace,
            gpus=count,
            products=gpu_products(self.cluster_group, nodes, gpu, count, permanent),
            secret_name=secret_name,
            cluster_group=self.cluster_group,
            settings=self._settings,
        )

    async def _ensure_namespace(self, namespace: str) -> None:
        """Create the account's namespace once (hardened), and wait until pods can be created in it."""
        if namespace in self._namespaces:
            return
        await self._cluster.create_namespace(namespace_manifest(namespace))
        await self._cluster.prepare_namespace(namespace, self._settings)
        self._namespaces.add(namespace)

    async def _create(self, request: EnsureInstancesInput, namespace: str, name: str) -> None:
        """Create the spec's Secret and Deployment (idempotent), and make the Deployment own the Secret."""
        ref, spec = request.ref, request.spec
        secret_name = name if spec.encryptedSecrets else None
        secret = (
            secret_manifest(secret_name, namespace, ref, open_secrets(self._box, spec))
            if secret_name is not None
            else None
        )
        manifest = await self._manifest(request, namespace, name, secret_name, permanent=False)
        await self._run(self._create_objects, namespace, name, manifest, secret, request.count)

    def _create_objects(
        self, namespace: str, name: str, manifest: JSON, secret: JSON | None, replicas: int
    ) -> None:
        """Create the Secret, then the Deployment, then make the Deployment own the Secret (idempotent)."""
        try:
            if secret is not None:
                with contextlib.suppress(AlreadyExists):
                    self._cluster.create(self._core.create_namespaced_secret, namespace, secret)
            try:
                created = self._cluster.create(self._apps.create_namespaced_deployment, namespace, manifest)
            except AlreadyExists:
                created = self._call(
                    "read a Deployment", self._apps.read_namespaced_deployment, name, namespace
                )
                if (created.get("spec") or {}).get("replicas") != replicas:
                    self._scale(namespace, name, replicas)
        except ApiException as err:
            if err.status == 404:
                # The namespace went away behind our back: create it again on the retry.
                self._namespaces.discard(namespace)
            raise api_error(err, f"create the objects of {namespace}/{name}") from err
        log.info("Deployment %s/%s of cluster %s: %s replicas", namespace, name, self.cluster_group, replicas)
        if secret is not None:
            owner = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": name,
                "uid": created["metadata"]["uid"],
            }
            self._call(
                "own a Secret",
                self._core.patch_namespaced_secret,
                secret["metadata"]["name"],
                namespace,
                {"metadata": {"ownerReferences": [owner]}},
                _content_type=MERGE_PATCH,
            )

    def _refresh_secret(self, namespace: str, name: str, values: dict[str, str]) -> None:
        """Write the version's current secret values into its Secret where they differ (one read)."""
        secret = self._call("read a Secret", self._core.read_namespaced_secret, name, namespace, ok=(404,))
        refresh_secret(self._cluster, namespace, secret, values)

    def _scale(self, namespace: str, name: str, replicas: int) -> None:
        self._call(
            "scale a Deployment",
            self._apps.patch_namespaced_deployment,
            name,
            namespace,
            {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH,
        )
        log.info("Deployment %s/%s of cluster %s: %s replicas", namespace, name, self.cluster_group, replicas)

    async def _fence(self, version_id: str, spec_index: int, released: list[str], count: int) -> None:
        """Wait (briefly) until the watch shows what was just done, and the scheduler's verdict on new pods.

        That is: the released pods gone, `count` pods live, each placed or refused by the scheduler.
        Otherwise the answer could show a released pod, or the replacement its ReplicaSet made before the
        replica count went down, and the workflow would act on that; and a pod that cannot be scheduled
        would not say why until its status changes again.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FENCE_SECONDS
        wanted = set(released)
        while loop.time() < deadline:
            now = datetime.now(UTC)
            views = [
                (p, view_pod(p, now, self._settings)) for p in self._informer.items(label_value(version_id))
            ]
            leftover = any(v is not None and v.record.instanceId in wanted for _, v in views)
            live = [p for p, v in views if v is not None and v.record.specIndex == spec_index]
            if not leftover and len(live) == count and all(scheduler_decided(p) for p in live):
                return
            await asyncio.sleep(0.02)
        log.info(
            "The pod watch of cluster %s is behind %s after %s s",
            self.cluster_group,
            version_id,
            FENCE_SECONDS,
        )


def kubernetes_backends(
    kubeconfigs: Sequence[Path], secret_box: SecretBox, settings: KubeSettings
) -> list[KubernetesBackend]:
    """Return one backend per configured cluster, each named after its kubeconfig's cluster."""
    names = cluster_group_names(kubeconfigs)
    return [
        KubernetesBackend(path, secret_box, settings, name)
        for path, name in zip(kubeconfigs, names, strict=True)
    ]
