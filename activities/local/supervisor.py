"""The supervisor of the local backend's instances: start, probe, adopt, stop.

The supervisor lives in the worker process. It records every instance under the state directory
(`activities.local.records`), so instances outlive a crashed worker and a restarted worker adopts the
ones still alive; it reaps what a crash left behind (network namespaces no record holds, containers no
record names). Instances the stack stopped when it shut down are started again by the next worker (a
stop of the platform is not a fault of the function). It probes each instance's health endpoint,
notices exits at once, and wakes the watcher activities of the version whose instances changed.

An instance runs on one of two runtimes: a command line (`activities.local.process`) or the version's
container image under podman (`activities.local.containers`); `GPUFN_LOCAL_RUNTIME` chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shlex
import sys
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from temporalio.exceptions import ApplicationError

from activities.isolation import (
    SLOTS_DIR,
    Slot,
    SlotAllocator,
    forget_claim,
    instance_python,
    reap_unrecorded,
    record_claim,
)
from activities.local.containers import PodmanRunner, podman_unavailable_reason
from activities.local.process import ProcessRunner
from activities.local.records import (
    CONTAINER_RUNTIME,
    NO_COMMAND_LINE,
    PROCESS_RUNTIME,
    LocalInstance,
    delete_record,
    is_alive,
    load_records,
    port_free,
    proc_start_time,
    read_log_tail,
    release,
    save_record,
)
from activities.registry.artifacts import RegistryConfig
from gpufn.durations import parse_iso_duration
from gpufn.inventory import CPU_INSTANCE_TYPE, LocalGpu, local_instance_type
from gpufn.isolation_check import unavailable_reason
from gpufn.sealing import SecretBox, secret_context
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    FunctionVersionSpec,
    InstanceStatus,
    VersionRef,
)

log = logging.getLogger(__name__)

STARTING_PROBE_SECONDS = 0.2
RUNNING_PROBE_SECONDS = 1.0
EXIT_CHECK_SECONDS = 0.2
FAILED_PROBES_BEFORE_ERROR = 3
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
RUNTIMES = ("auto", PROCESS_RUNTIME, CONTAINER_RUNTIME)


class LocalSupervisor:
    """Starts, probes, adopts and stops the local instances (processes or containers) of this machine."""

    def __init__(
        self,
        home: Path,
        cpu_slots: int,
        gpus: list[LocalGpu],
        secret_box: SecretBox,
        start_timeout: float,
        workdir: Path | None = None,
        instance_network: str = "10.213.0.0/16",
        uid_base: int = 1_640_000,
        private_root: Path | None = None,
        runtime: str = PROCESS_RUNTIME,
        oci_runtime: str = "runc",
        registry: RegistryConfig | None = None,
    ) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"local runtime {runtime!r} is none of {', '.join(RUNTIMES)}")
        self._home = home
        self._dir = home / "instances"
        self._logs = home / "logs"
        self._claims = home / SLOTS_DIR
        self._dir.mkdir(parents=True, exist_ok=True)
        self._logs.mkdir(parents=True, exist_ok=True)
        self._cpu_slots = cpu_slots
        self._gpus = gpus
        self._box = secret_box
        self._start_timeout = start_timeout
        # Instances must not read the state directory: keys, logs, Temporal's database, other records.
        home.chmod(0o700)
        self.isolation_unavailable = unavailable_reason()
        self._slots = (
            SlotAllocator(instance_network, uid_base, self._claims)
            if self.isolation_unavailable is None
            else None
        )
        private_root = private_root or Path(tempfile.gettempdir()) / "gpufn-instances"
        self._python_bin, self._python_path = (
            instance_python(private_root) if self._slots is not None else (Path(sys.executable).parent, None)
        )
        if self.isolation_unavailable is not None:
            log.warning(
                "Instances run as the worker's user without network isolation: %s",
                self.isolation_unavailable,
            )
        self._processes = ProcessRunner(self._logs, workdir or Path.cwd(), private_root)
        self._runtime = runtime
        self.containers_unavailable = (
            podman_unavailable_reason() or self.isolation_unavailable if runtime != PROCESS_RUNTIME else None
        )
        self._containers = (
            PodmanRunner(home, oci_runtime, registry=registry)
            if runtime != PROCESS_RUNTIME and self.containers_unavailable is None
            else None
        )
        if runtime == CONTAINER_RUNTIME and self._containers is None:
            log.error(
                "GPUFN_LOCAL_RUNTIME=podman, but containers cannot run: %s", self.containers_unavailable
            )
        self._instances: dict[str, LocalInstance] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._generations: dict[str, int] = {}
        """Per version, how many changes were notified (lets a watcher see one it was not waiting for)."""
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # --- Lifecycle of the supervisor itself ---------------------------------------------------------

    async def start(self) -> None:
        """Adopt the instances recorded on disk that are still alive, reap leftovers, start probing."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for instance in load_records(self._dir):
            if instance.stoppedWithStack:
                # The stack stopped it, not a fault of its own: start it again under the same id.
                instance.stoppedWithStack = False
                instance.pid = instance.procStart = instance.startedAt = None
                instance.status = InstanceStatus.STARTING.value
                instance.error = None
                instance.failedProbes = 0
                self._readdress(instance)
                self._save(instance)
            elif instance.pid is not None and not is_alive(instance):
                if instance.status != InstanceStatus.ERRORED.value:
                    instance.status = InstanceStatus.ERRORED.value
                    instance.error = "The instance process exited while no worker was watching it"
            self._instances[instance.instanceId] = instance
            log.info("Adopted instance %s (pid %s, %s)", instance.instanceId, instance.pid, instance.status)
        # A worker killed between claiming a slot (or creating a container) and recording its instance
        # left a namespace or a container behind that nothing else would ever delete.
        reap_unrecorded(
            self._claims, {i.slot["index"] for i in self._instances.values() if i.slot is not None}
        )
        if self._containers is not None:
            await self._containers.remove_orphans(
                {i.container_name for i in self._instances.values() if i.runtime == CONTAINER_RUNTIME}
            )
        self._task = asyncio.create_task(self._supervise())

    async def close(self) -> None:
        """Stop probing; instances keep running (a restarted worker adopts them)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    # --- Queries ------------------------------------------------------------------------------------

    def instances_of(self, versionId: str) -> list[LocalInstance]:
        """Return the version's instances, oldest first."""
        return sorted(
            (i for i in self._instances.values() if i.versionId == versionId), key=lambda i: i.createdAt
        )

    def log_tail(self, instance_id: str) -> str | None:
        """Return the last lines an instance printed."""
        return read_log_tail(self._logs / f"{instance_id}.log")

    def changed_event(self, versionId: str) -> asyncio.Event:
        """Return the event set whenever one of the version's instances changes."""
        return self._changed.setdefault(versionId, asyncio.Event())

    def generation(self, versionId: str) -> int:
        """Return how many changes of the version's instances were notified so far."""
        return self._generations.get(versionId, 0)

    def runtime_for(self, spec: FunctionVersionSpec) -> str:
        """Return the runtime a new instance of `spec` runs on.

        Raises:
            ApplicationError: `ContainerRuntimeUnavailable` (non-retryable) when podman is asked for and
                cannot run here.
        """
        if self._runtime == CONTAINER_RUNTIME:
            if self._containers is None:
                raise ApplicationError(
                    f"The local backend is set to run containers (GPUFN_LOCAL_RUNTIME=podman), but "
                    f"cannot: {self.containers_unavailable}",
                    type="ContainerRuntimeUnavailable",
                    non_retryable=True,
                )
            return CONTAINER_RUNTIME
        if self._runtime == "auto" and self._containers is not None and spec.containerImage:
            return CONTAINER_RUNTIME
        return PROCESS_RUNTIME

    async def pull(self, image: str) -> None:
        """Pull a container image before its instances start (raises as `PodmanRunner.pull`)."""
        assert self._containers is not None
        await self._containers.pull(image)

    # --- Changes ------------------------------------------------------------------------------------

    async def ensure(self, request: EnsureInstancesInput) -> None:
        """Remove the listed instances, then start or stop instances until `count` are live."""
        async with self._lock:
            for instance_id in request.remove:
                instance = self._instances.get(instance_id)
                if instance is not None and instance.versionId == request.ref.versionId:
                    await self._remove(instance)
            mine = [i for i in self.instances_of(request.ref.versionId) if i.specIndex == request.specIndex]
            live = [i for i in mine if i.status != InstanceStatus.ERRORED.value]
            # Scale-down without a named victim: the newest, still-starting ones go first.
            surplus = sorted(live, key=lambda i: (i.status == InstanceStatus.RUNNING.value, i.createdAt))
            for instance in surplus[: max(0, len(live) - request.count)]:
                await self._remove(instance)
            for _ in range(request.count - len(live)):
                await self._create(request)
            self._notify(request.ref.versionId)

    async def remove_version(self, versionId: str) -> None:
        """Stop and forget every instance of a version."""
        async with self._lock:
            for instance in self.instances_of(versionId):
                await self._remove(instance)
            self._notify(versionId)

    async def stop_all(self) -> None:
        """Stop every instance on this machine (used when the embedded stack shuts down)."""
        async with self._lock:
            await asyncio.gather(*(self._remove(i) for i in list(self._instances.values())))

    async def _create(self, request: EnsureInstancesInput) -> LocalInstance:
        spec, dspec = request.spec, request.deploymentSpec
        runtime = self.runtime_for(spec)
        if runtime == PROCESS_RUNTIME and not spec.containerArgs:
            raise ApplicationError(NO_COMMAND_LINE, type="InvalidSpec", non_retryable=True)
        instance_id = f"{spec.versionId[:8]}-{random.getrandbits(40):010x}"
        slot: Slot | None = None
        if self._slots is not None:
            slot = self._claim()
            host = slot.instanceAddress
        else:
            host = self._free_address(spec.serving_port)
        health_port = spec.health.port or spec.serving_port
        instance = LocalInstance(
            instanceId=instance_id,
            accountId=request.ref.accountId,
            functionId=request.ref.functionId,
            versionId=request.ref.versionId,
            specIndex=request.specIndex,
            instanceType=dspec.instanceType,
            host=host,
            port=spec.serving_port,
            healthUrl=f"http://{host}:{health_port}{spec.health.uri}",
            healthStatus=spec.health.expectedStatusCode,
            healthTimeout=parse_iso_duration(spec.health.timeout, default=10.0),
            command=shlex.split(spec.containerArgs or ""),
            env=self._environment(spec, dspec, request.ref, host, instance_id, runtime),
            createdAt=datetime.now(UTC).isoformat(),
            startTimeout=self._start_timeout,
            sealedSecrets=dict(spec.encryptedSecrets),
            slot=asdict(slot) if slot is not None else None,
            runtime=runtime,
            image=(request.prepared.resolvedImage or spec.containerImage)
            if runtime == CONTAINER_RUNTIME
            else None,
        )
        self._instances[instance_id] = instance
        # Recorded before it starts: a worker killed while it starts leaves a record the next one adopts.
        self._save(instance)
        await self._try_launch(instance)
        self._save(instance)
        return instance

    def _claim(self, preferred: int | None = None) -> Slot:
        assert self._slots is not None
        try:
            slot = self._slots.claim(preferred)
        except OSError as err:
            raise ApplicationError(f"Could not isolate a new instance: {err}", type="NoAddress") from err
        record_claim(self._claims, slot)
        return slot

    def _readdress(self, instance: LocalInstance) -> None:
        """Give an instance the stack stopped a slot again (its old one was freed with the stack).

        Its old slot, when still free, so its address (and the gateways' routes to it) stay the same.
        """
        if self._slots is None:
            return
        try:
            slot = self._claim(instance.lastSlotIndex)
        except ApplicationError as err:
            instance.status = InstanceStatus.ERRORED.value
            instance.error = str(err)
            return
        old = instance.host
        instance.slot = asdict(slot)
        instance.host = slot.instanceAddress
        instance.healthUrl = instance.healthUrl.replace(f"//{old}:", f"//{slot.instanceAddress}:", 1)
        instance.env["HOST"] = slot.instanceAddress

    def _environment(
        self,
        spec: FunctionVersionSpec,
        dspec: DeploymentSpecification,
        ref: VersionRef,
        host: str,
        instance_id: str,
        runtime: str,
    ) -> dict[str, str]:
        """Return the instance's environment without its secrets: from the spec alone, never the worker's."""
        env: dict[str, str] = {}
        if runtime == PROCESS_RUNTIME:
            # Instances find the worker's Python (and the packages of its environment) first on PATH; a
            # container has its image's PATH.
            env = {"PATH": f"{self._python_bin}{os.pathsep}{SYSTEM_PATH}", "LANG": "C.UTF-8"}
            if self._python_path:
                env["PYTHONPATH"] = self._python_path
        for entry in spec.containerEnvironment or []:
            env[entry.key] = entry.value
        env.update(
            {
                "HOST": host,
                "PORT": str(spec.serving_port),
                "NVCF_BACKEND": dspec.backend or dspec.clusterGroup,
                "NVCF_ENV": "local",
                "NVCF_FUNCTION_ID": ref.functionId,
                "NVCF_FUNCTION_NAME": spec.name,
                "NVCF_FUNCTION_VERSION_ID": ref.versionId,
                "NVCF_INSTANCETYPE": dspec.instanceType,
                "NVCF_NCA_ID": ref.accountId,
                "NVCF_REGION": "local",
                "NVCF_INSTANCE_ID": instance_id,
            }
        )
        return env

    def _free_address(self, port: int) -> str:
        taken = {i.host for i in self._instances.values()}
        for _ in range(1000):
            # 127.64.0.0/10 keeps clear of 127.0.0.x, which other local services commonly use.
            host = f"127.{random.randint(64, 127)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
            if host not in taken and port_free(host, port):
                return host
        raise ApplicationError("No free loopback address for a new instance", type="NoAddress")

    def _gpu_for(self, instance: LocalInstance) -> tuple[bool, int | None, str]:
        """Return (fits, gpu index, reason when it does not fit) for a pending instance."""
        live = [
            i
            for i in self._instances.values()
            if i.pid is not None and i.status != InstanceStatus.ERRORED.value and i is not instance
        ]
        if instance.instanceType == CPU_INSTANCE_TYPE:
            used = sum(1 for i in live if i.instanceType == CPU_INSTANCE_TYPE)
            if used >= self._cpu_slots:
                return (
                    False,
                    None,
                    f"Insufficient capacity: all {self._cpu_slots} {CPU_INSTANCE_TYPE} slots are in use",
                )
            return True, None, ""
        held = {i.gpuIndex for i in live if i.gpuIndex is not None}
        candidates = [g for g in self._gpus if local_instance_type(g.name) == instance.instanceType]
        for gpu in candidates:
            if gpu.index not in held:
                return True, gpu.index, ""
        return (
            False,
            None,
            f"Insufficient capacity: {len(candidates)} GPU(s) of type {instance.instanceType} here, "
            "none free",
        )

    async def _try_launch(self, instance: LocalInstance) -> None:
        fits, gpu_index, reason = self._gpu_for(instance)
        if not fits:
            instance.error = reason
            return
        env = dict(instance.env)
        try:
            for name, sealed in instance.sealedSecrets.items():
                env[name] = self._box.open(sealed, secret_context(instance.versionId, name))
        except Exception as err:  # a wrong key or tampered record: the instance cannot start
            instance.status = InstanceStatus.ERRORED.value
            instance.error = f"Could not open the instance's secrets: {type(err).__name__}"
            return
        instance.gpuIndex = gpu_index
        if instance.runtime == CONTAINER_RUNTIME:
            if self._containers is None:
                instance.status = InstanceStatus.ERRORED.value
                instance.error = f"Containers cannot run here: {self.containers_unavailable}"
                return
            # podman takes a moment (up to a second here): off the event loop, which heartbeats and probes.
            await asyncio.to_thread(self._containers.launch, instance, env, gpu_index)
            return
        env["CUDA_VISIBLE_DEVICES"] = "" if gpu_index is None else str(gpu_index)
        self._processes.launch(instance, env)

    async def _remove(self, instance: LocalInstance) -> None:
        self._instances.pop(instance.instanceId, None)
        delete_record(self._dir, instance.instanceId)
        await self._stop(instance)
        if instance.slot is not None:
            forget_claim(self._claims, Slot(**instance.slot))
        release(instance)
        log.info("Removed instance %s", instance.instanceId)

    async def _stop(self, instance: LocalInstance) -> None:
        if instance.runtime == CONTAINER_RUNTIME:
            if self._containers is not None:
                await self._containers.remove(instance)
        elif instance.pid is not None:
            await self._processes.stop(instance.pid, instance.procStart)

    def _save(self, instance: LocalInstance) -> None:
        save_record(self._dir, instance)

    def _notify(self, versionId: str) -> None:
        self._generations[versionId] = self._generations.get(versionId, 0) + 1
        event = self._changed.pop(versionId, None)
        if event is not None:
            event.set()

    # --- Probing ------------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            try:
                await self._check_all()
            except Exception:
                log.exception("Instance supervision pass failed")
            await asyncio.sleep(EXIT_CHECK_SECONDS)

    async def _check_all(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        probes = []
        for instance in list(self._instances.values()):
            if instance.status == InstanceStatus.ERRORED.value:
                continue
            if instance.pid is None:
                async with self._lock:
                    if instance.instanceId in self._instances:
                        await self._try_launch(instance)
                        self._save(instance)
                        if instance.pid is not None or instance.status == InstanceStatus.ERRORED.value:
                            self._notify(instance.versionId)
                continue
            code = self._processes.reap(instance.pid)
            # A command that exits at once can be a zombie before its start time is read (procStart is
            # None then, like the dead process's), so the exit code of our own child counts first.
            if code is not None or proc_start_time(instance.pid) != instance.procStart:
                if code is None and instance.runtime == CONTAINER_RUNTIME and self._containers is not None:
                    code = await self._containers.exit_code(instance)
                detail = f"exited with code {code}" if code is not None else "exited"
                self._fail(instance, f"Instance {instance.instanceId} {detail}")
                continue
            interval = (
                STARTING_PROBE_SECONDS
                if instance.status == InstanceStatus.STARTING.value
                else RUNNING_PROBE_SECONDS
            )
            if now - instance.lastProbeAt >= interval:
                instance.lastProbeAt = now
                probes.append(self._probe(instance))
        if probes:
            await asyncio.gather(*probes)

    async def _probe(self, instance: LocalInstance) -> None:
        assert self._session is not None
        try:
            async with self._session.get(
                instance.healthUrl, timeout=aiohttp.ClientTimeout(total=instance.healthTimeout)
            ) as response:
                healthy = response.status == instance.healthStatus
                reason = f"health check {instance.healthUrl} answered {response.status}"
        except (aiohttp.ClientError, TimeoutError) as err:
            healthy, reason = False, f"health check {instance.healthUrl} failed: {err or type(err).__name__}"
        if instance.instanceId not in self._instances or instance.status == InstanceStatus.ERRORED.value:
            return
        if healthy:
            instance.failedProbes = 0
            if instance.status == InstanceStatus.STARTING.value:
                instance.status = InstanceStatus.RUNNING.value
                instance.error = None
                self._save(instance)
                self._notify(instance.versionId)
            return
        if instance.status == InstanceStatus.STARTING.value:
            started = datetime.fromisoformat(instance.startedAt or instance.createdAt)
            if (datetime.now(UTC) - started).total_seconds() > instance.startTimeout:
                self._fail(
                    instance,
                    f"Instance {instance.instanceId} did not pass its health check within "
                    f"{instance.startTimeout:.0f} s ({reason})",
                )
            return
        instance.failedProbes += 1
        if instance.failedProbes >= FAILED_PROBES_BEFORE_ERROR:
            self._fail(
                instance, f"Instance {instance.instanceId}: {reason} ({instance.failedProbes} times in a row)"
            )

    def _fail(self, instance: LocalInstance, error: str) -> None:
        instance.status = InstanceStatus.ERRORED.value
        instance.error = error
        self._save(instance)
        if is_alive(instance):
            # A failing instance is stopped at once; the workflow decides whether to replace it.
            asyncio.get_running_loop().create_task(self._stop(instance))
        log.info("Instance %s failed: %s", instance.instanceId, error)
        self._notify(instance.versionId)
