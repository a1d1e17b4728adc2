"""One cluster as a backend uses it: API clients, a thread pool for blocking calls, and the namespaces gpufn
makes (created once, hardened, and ready for pods).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from temporalio.exceptions import ApplicationError

from activities.kube.config import KubeSettings
from activities.kube.errors import AlreadyExists, api_error, unreachable
from activities.kube.informer import Informer
from activities.kube.manifests import network_policy_manifest
from activities.kube.names import MERGE_PATCH
from gpufn.kube_inventory import api_client, cluster_group_names, read_json

log = logging.getLogger(__name__)

JSON = dict[str, Any]
T = TypeVar("T")

SYNC_TIMEOUT_SECONDS = 15.0
"""How long an activity waits for an informer's first list before it fails (and is retried)."""
NAMESPACE_READY_SECONDS = 15.0
"""How long a new namespace may take to get its default service account (pods are refused before)."""


class Cluster:
    """The API of one cluster (the current context of a kubeconfig), for one backend.

    Args:
        kubeconfig: The cluster's kubeconfig.
        name: The cluster group name (default: derived from the kubeconfig).
        threads: Threads for blocking API calls (the `kubernetes` client is synchronous).
        thread_prefix: Names the threads.
    """

    def __init__(self, kubeconfig: Path, name: str | None, threads: int, thread_prefix: str) -> None:
        self.name = name or cluster_group_names([kubeconfig])[0]
        self.kubeconfig = kubeconfig
        self.api = api_client(kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.networking = client.NetworkingV1Api(self.api)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"{thread_prefix}-{self.name}")

    def close(self) -> None:
        """Stop the threads and close the API client."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.api.close()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call in this cluster's threads, so the event loop never waits for the cluster."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    @staticmethod
    def call(action: str, fn: Callable[..., Any], *args: Any, ok: Iterable[int] = (), **kwargs: Any) -> Any:
        """Make one API call and return its JSON; None for a status in `ok` (the idempotent outcomes).

        Raises:
            ApplicationError: The call failed (`api_error` says whether a retry can help).
        """
        try:
            return read_json(fn, *args, **kwargs)
        except ApiException as err:
            if err.status in set(ok):
                return None
            raise api_error(err, action) from err

    @staticmethod
    def create(fn: Callable[..., Any], namespace: str, body: JSON) -> JSON:
        """Create an object and return it.

        Raises:
            AlreadyExists: It is there already (409).
            ApiException: Any other failure.
        """
        try:
            created: JSON = read_json(fn, namespace, body)
        except ApiException as err:
            if err.status == 409:
                raise AlreadyExists() from err
            raise
        return created

    def delete_pods(self, namespace: str, names: Iterable[str]) -> None:
        """Delete the named pods (gone already counts)."""
        for name in names:
            self.call("delete a pod", self.core.delete_namespaced_pod, name, namespace, ok=(404,))
            log.info("Removed pod %s/%s of cluster %s", namespace, name, self.name)

    async def wait_synced(self, informer: Informer, what: str) -> None:
        """Wait for an informer's first list; fail (retryably) when the cluster does not answer in time."""
        if informer.synced.is_set():
            return
        if not await asyncio.to_thread(informer.synced.wait, SYNC_TIMEOUT_SECONDS):
            raise unreachable(self.name, f"cannot list {what}: {informer.last_error or 'no answer'}")

    async def create_namespace(self, manifest: JSON) -> JSON | None:
        """Create a namespace; return it, or None when it exists already."""
        created: JSON | None = await self.run(
            self.call, "create a namespace", self.core.create_namespace, manifest, ok=(409,)
        )
        return created

    async def wait_namespace_gone(self, namespace: str, within_seconds: float, poll: float = 0.25) -> None:
        """Wait until a deleted namespace is gone, at most `within_seconds` (then say so and return)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_seconds
        while loop.time() < deadline:
            found = await self.run(
                self.call, "read a namespace", self.core.read_namespace, namespace, ok=(404,)
            )
            if found is None:
                return
            await asyncio.sleep(poll)
        log.warning("Namespace %s of cluster %s is still being deleted", namespace, self.name)

    async def prepare_namespace(self, namespace: str, settings: KubeSettings) -> None:
        """Make a namespace gpufn created ready for function pods, and hardened (idempotent).

        Its NetworkPolicy isolates its pods; its default service account mounts no token (a chart's pods use
        it unless they name another). Waits until the service-account controller has made that account:
        pods are refused before.

        Raises:
            ApplicationError: Retryable, when the account does not appear in time.
        """
        if settings.network_policy:
            await self.run(
                self.call,
                "create a NetworkPolicy",
                self.networking.create_namespaced_network_policy,
                namespace,
                network_policy_manifest(namespace, settings),
                ok=(409,),
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + NAMESPACE_READY_SECONDS
        while (
            await self.run(
                self.call,
                "read a service account",
                self.core.read_namespaced_service_account,
                "default",
                namespace,
                ok=(404,),
            )
            is None
        ):
            if loop.time() > deadline:
                raise ApplicationError(
                    f"Namespace {namespace} has no default service account yet", type="NamespaceNotReady"
                )
            await asyncio.sleep(0.05)
        await self.run(
            self.call,
            "keep the service-account token out of pods",
            self.core.patch_namespaced_service_account,
            "default",
            namespace,
            {"automountServiceAccountToken": False},
            _content_type=MERGE_PATCH,
        )
