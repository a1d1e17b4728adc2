"""The gpufn worker: runs the lifecycle workflows and their activities against the configured backends.

`python -m worker` (the embedded stack starts it this way). It builds every client once, registers the
search attributes the workflows use, and polls the task queue until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from activities.backend import Backend, BackendActivities
from activities.gateway import GatewayActivities, LoadMonitor
from activities.helm import HelmBackend
from activities.kube.config import HelmSettings, KubeSettings
from activities.kube_group import KubernetesGroupBackend
from activities.kubernetes import kubernetes_backends
from activities.local import LocalBackend, LocalSupervisor
from activities.registry import PinningBackend, RegistryConfig, RegistryResolver
from activities.telemetry import MetricsInterceptor, WorkerMetrics
from activities.watcher import WatchActivities
from gpufn.inventory import LOCAL_CLUSTER_GROUP, discover_gpus, parse_local_gpus
from gpufn.sealing import SecretBox
from gpufn.settings import Settings
from gpufn.telemetry import serve_metrics, temporal_interceptors
from workflows import search_attributes as sa
from workflows.function_version import FunctionVersionWorkflow
from workflows.key_registry import KeyRegistryWorkflow
from workflows.models import ReconcileSignal

log = logging.getLogger("gpufn.worker")

MAX_CONCURRENT_ACTIVITIES = 4000
"""A version watcher runs for as long as its version is deployed, so slots are many and cheap."""

_INDEXED_TYPES = {
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "Datetime": IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
}


async def register_search_attributes(client: Client) -> None:
    """Register gpufn's search attributes (idempotent; the dev server also gets them on its command line)."""
    wanted = {
        key.name: _INDEXED_TYPES["Datetime" if key is sa.ROUTES_UPDATED_AT else "Keyword"] for key in sa.ALL
    }
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=wanted)
        )
    except RPCError as err:
        if err.status != RPCStatusCode.ALREADY_EXISTS:
            raise


@asynccontextmanager
async def build_worker(
    client: Client, settings: Settings, task_queue: str | None = None, metrics: WorkerMetrics | None = None
) -> AsyncIterator[tuple[Worker, LocalSupervisor]]:
    """Build a worker with its backends and clients; close them on exit. Its activities feed `metrics`."""
    gpus = parse_local_gpus(settings.local_gpus) if settings.local_gpus is not None else discover_gpus()
    secret_box = SecretBox(settings.resolved_secret_key())
    supervisor = LocalSupervisor(
        home=settings.home,
        cpu_slots=settings.local_cpu_slots,
        gpus=gpus,
        secret_box=secret_box,
        start_timeout=settings.instance_start_timeout,
        workdir=Path.cwd(),
        instance_network=settings.local_instance_network,
        uid_base=settings.local_instance_uid_base,
        private_root=settings.local_instance_dir,
        runtime=settings.local_runtime,
        oci_runtime=settings.local_oci_runtime,
        registry=RegistryConfig.from_settings(settings),
    )
    await supervisor.start()
    resolver = RegistryResolver(RegistryConfig.from_settings(settings))
    backends: dict[str, Backend] = {LOCAL_CLUSTER_GROUP: LocalBackend(supervisor, resolver)}
    # One backend per configured cluster, named like the cluster group the API offers for it.
    kube_settings = KubeSettings.from_settings(settings)
    clusters = kubernetes_backends(settings.kubeconfigs, secret_box, kube_settings)
    helm_settings = HelmSettings.from_settings(settings)
    charts: list[HelmBackend] = []
    for kubeconfig, cluster in zip(settings.kubeconfigs, clusters, strict=True):
        await cluster.start()
        # Kubernetes pods run the digest their image tag pointed at when the version was deployed (the
        # local backend pins its containers' images itself, and only records those of its processes).
        containers = PinningBackend(cluster, resolver) if settings.resolve_artifacts else cluster
        # Helm-chart versions of the same cluster group are Helm releases; that backend pins its charts
        # itself (helm needs the archive anyway), so it is not wrapped.
        chart_backend = HelmBackend(kubeconfig, resolver, kube_settings, helm_settings, cluster.cluster_group)
        await chart_backend.start()
        charts.append(chart_backend)
        backends[cluster.cluster_group] = KubernetesGroupBackend(containers, chart_backend)
    monitor = LoadMonitor(settings.gateways, settings.resolved_admin_key())
    backend_activities = BackendActivities(backends)
    gateway_activities = GatewayActivities(monitor)
    watch_activities = WatchActivities(backend_activities, monitor)
    worker = Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=[FunctionVersionWorkflow, KeyRegistryWorkflow],
        activities=[
            backend_activities.prepare,
            backend_activities.ensure_instances,
            backend_activities.observe_instances,
            backend_activities.teardown,
            gateway_activities.wait_drained,
            watch_activities.watch_version,
            # The watchers of versions started before `watch_version` existed.
            gateway_activities.watch_load,
        ],
        max_concurrent_activities=MAX_CONCURRENT_ACTIVITIES,
        interceptors=[MetricsInterceptor(metrics if metrics is not None else WorkerMetrics())],
    )
    try:
        yield worker, supervisor
    finally:
        await monitor.close()
        await supervisor.close()
        for chart_backend in charts:
            await chart_backend.close()
        for cluster in clusters:
            await cluster.close()
        await resolver.close()


DEPLOYED_QUERY = (
    "ExecutionStatus = 'Running' AND GpufnStatus IN ('ACTIVE', 'DEPLOYING', 'DEGRADING', 'DEGRADED')"
)
REATTACH_CONCURRENCY = 16


async def reattach_deployed_versions(client: Client) -> int:
    """Send `reconcile_now` to every deployed version, so its watchers run on a live worker at once.

    A worker that died took its watcher activities with it; Temporal would retry them only after their
    heartbeat timeout.
    Returns how many versions were signalled.
    """
    semaphore = asyncio.Semaphore(REATTACH_CONCURRENCY)

    async def signal(workflow_id: str) -> None:
        async with semaphore:
            with contextlib.suppress(RPCError):
                handle = client.get_workflow_handle(workflow_id)
                await handle.signal(FunctionVersionWorkflow.reconcile_now, ReconcileSignal())

    ids = [execution.id async for execution in client.list_workflows(DEPLOYED_QUERY)]
    await asyncio.gather(*(signal(workflow_id) for workflow_id in ids))
    return len(ids)


async def run(settings: Settings) -> None:
    """Connect, register search attributes, and run the worker until a signal arrives."""
    runtime = None
    if settings.worker_sdk_metrics_address:
        # The Temporal SDK's own metrics (task latencies, slots, polls), served by the SDK itself.
        # Prometheus conventions: counters end in _total, durations are seconds named _seconds.
        prometheus = PrometheusConfig(
            bind_address=settings.worker_sdk_metrics_address,
            counters_total_suffix=True,
            unit_suffix=True,
            durations_as_seconds=True,
        )
        runtime = Runtime(telemetry=TelemetryConfig(metrics=prometheus))
    client = await Client.connect(
        settings.temporal_target,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        runtime=runtime,
        interceptors=temporal_interceptors("gpufn-worker"),
    )
    metrics = WorkerMetrics()
    stop_metrics = (
        serve_metrics(settings.worker_metrics_address, metrics.registry)
        if settings.worker_metrics_address
        else None
    )
    counting = asyncio.create_task(metrics.count_deployments(client, settings.task_queue))
    await register_search_attributes(client)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with build_worker(client, settings, metrics=metrics) as (worker, _):
        log.info("Worker polling task queue %s on %s", settings.task_queue, settings.temporal_target)
        worker_task = asyncio.create_task(worker.run())
        reattached = await reattach_deployed_versions(client)
        log.info("Re-attached %d function versions", reattached)
        stop_task = asyncio.create_task(stop.wait())
        await asyncio.wait([worker_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
        if not worker_task.done():
            await worker.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await worker_task
        stop_task.cancel()
    counting.cancel()
    if stop_metrics is not None:
        stop_metrics()


def main() -> None:
    """Run the worker process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(Settings()))
    # Everything is closed by now. The Temporal SDK's Rust threads can still call into Python while the
    # interpreter finalizes, which aborts a cleanly stopped worker with SIGABRT; leave without finalizing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
