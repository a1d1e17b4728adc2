"""The local backend: each function instance is a process on this machine.

Where the worker runs as root, each instance runs as its own uid in its own network namespace, addressed
by its veth address (see `activities.isolation`); elsewhere it runs as the worker's user on its own
loopback address. Either way its environment is built from the function's spec alone, and its secrets
are opened only when it starts: instance records hold sealed values, never plaintext.

The supervisor lives in the worker process. It records every instance in a JSON file under the state
directory (pid and process start time), so instances outlive a crashed worker and a restarted worker
adopts the ones still alive. Instances the stack stopped when it shut down are started again by the
next worker (a stop of the platform is not a fault of the function). It probes each instance's health
endpoint, notices exits at once, and wakes the watcher activities of the version whose instances changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from temporalio.exceptions import ApplicationError

from activities.isolation import (
    Slot,
    SlotAllocator,
    instance_python,
    launch_prefix,
    make_private_dir,
    release_slot,
    remove_private_dir,
    unavailable_reason,
)
from gpufn.durations import parse_iso_duration
from gpufn.inventory import CPU_INSTANCE_TYPE, LocalGpu, local_instance_type
from gpufn.sealing import SecretBox, secret_context
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    FunctionVersionSpec,
    InstanceRecord,
    InstanceStatus,
    PrepareInput,
    PrepareResult,
    VersionRef,
)

log = logging.getLogger(__name__)

STARTING_PROBE_SECONDS = 0.2
RUNNING_PROBE_SECONDS = 1.0
EXIT_CHECK_SECONDS = 0.2
FAILED_PROBES_BEFORE_ERROR = 3
STOP_GRACE_SECONDS = 5.0
LOG_TAIL_LINES = 20
NO_COMMAND_LINE = (
    "The local backend runs a version's containerArgs as a command line, and this version has none"
)
STOPPED_WITH_STACK = "Stopped with the stack; the next worker starts it again"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class LocalInstance:
    """One instance process, as recorded on disk."""

    instanceId: str
    accountId: str
    functionId: str
    versionId: str
    specIndex: int
    instanceType: str
    host: str
    port: int
    healthUrl: str
    healthStatus: int
    healthTimeout: float
    command: list[str]
    env: dict[str, str]
    """The environment without secrets; those are in `sealedSecrets` and opened at each start."""
    createdAt: str
    startTimeout: float
    gpuIndex: int | None = None
    pid: int | None = None
    procStart: str | None = None
    startedAt: str | None = None
    status: str = InstanceStatus.STARTING.value
    error: str | None = None
    failedProbes: int = 0
    exitCode: int | None = None
    sealedSecrets: dict[str, str] = field(default_factory=dict)
    slot: dict[str, Any] | None = None
    """The isolation slot (uid, namespace, addresses) when the instance is isolated."""
    privateDir: str | None = None
    stoppedWithStack: bool = False
    lastProbeAt: float = field(default=0.0, repr=False)

    def record(self, log_tail: str | None) -> InstanceRecord:
        """Return the instance as the workflow sees it."""
        return InstanceRecord(
            instanceId=self.instanceId,
            specIndex=self.specIndex,
            status=InstanceStatus(self.status),
            address=f"http://{self.host}:{self.port}",
            error=self.error,
            logTail=log_tail if self.status == InstanceStatus.ERRORED.value else None,
            createdAt=datetime.fromisoformat(self.createdAt),
            updatedAt=None,
        )


def _proc_start_time(pid: int) -> str | None:
    """Return the process's start time in clock ticks (identifies a pid across reuse), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after the last ')' are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class LocalSupervisor:
    """Starts, probes, adopts and stops the local instance processes of this machine."""

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
    ) -> None:
        self._dir = home / "instances"
        self._logs = home / "logs"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._logs.mkdir(parents=True, exist_ok=True)
        self._cpu_slots = cpu_slots
        self._gpus = gpus
        self._box = secret_box
        self._start_timeout = start_timeout
        self._workdir = workdir or Path.cwd()
        # Instances must not read the state directory: keys, logs, Temporal's database, other records.
        home.chmod(0o700)
        self.isolation_unavailable = unavailable_reason()
        self._slots = (
            SlotAllocator(instance_network, uid_base) if self.isolation_unavailable is None else None
        )
        self._private_root = private_root or Path(tempfile.gettempdir()) / "gpufn-instances"
        self._python_bin, self._python_path = (
            instance_python(self._private_root)
            if self._slots is not None
            else (Path(sys.executable).parent, None)
        )
        if self.isolation_unavailable is not None:
            log.warning(
                "Instances run as the worker's user without network isolation: %s",
                self.isolation_unavailable,
            )
        self._instances: dict[str, LocalInstance] = {}
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._generations: dict[str, int] = {}
        """Per version, how many changes were notified (lets a watcher see one it was not waiting for)."""
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # --- Lifecycle of the supervisor itself ---------------------------------------------------------

    async def start(self) -> None:
        """Adopt the instances recorded on disk that are still alive, and start probing."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for path in sorted(self._dir.glob("*.json")):
            try:
                instance = LocalInstance(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as err:
                log.warning("Ignoring unreadable instance record %s: %s", path, err)
                continue
            if instance.stoppedWithStack:
                # The stack stopped it, not a fault of its own: start it again under the same id.
                instance.stoppedWithStack = False
                instance.pid = instance.procStart = instance.startedAt = None
                instance.status = InstanceStatus.STARTING.value
                instance.error = None
                instance.failedProbes = 0
                self._readdress(instance)
                self._save(instance)
            elif instance.pid is not None and _proc_start_time(instance.pid) != instance.procStart:
                if instance.status != InstanceStatus.ERRORED.value:
                    instance.status = InstanceStatus.ERRORED.value
                    instance.error = "The instance process exited while no worker was watching it"
            self._instances[instance.instanceId] = instance
            log.info("Adopted instance %s (pid %s, %s)", instance.instanceId, instance.pid, instance.status)
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

    def log_tail(self, instance_id: str, lines: int = LOG_TAIL_LINES) -> str | None:
        """Return the last lines an instance printed."""
        path = self._logs / f"{instance_id}.log"
        try:
            with path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - 16384))
                text = handle.read().decode(errors="replace")
        except OSError:
            return None
        return "\n".join(text.splitlines()[-lines:]) or None

    def changed_event(self, versionId: str) -> asyncio.Event:
        """Return the event set whenever one of the version's instances changes."""
        return self._changed.setdefault(versionId, asyncio.Event())

    def generation(self, versionId: str) -> int:
        """Return how many changes of the version's instances were notified so far."""
        return self._generations.get(versionId, 0)

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
                self._create(request)
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

    def _create(self, request: EnsureInstancesInput) -> LocalInstance:
        spec, dspec = request.spec, request.deploymentSpec
        if not spec.containerArgs:
            raise ApplicationError(
                NO_COMMAND_LINE,
                type="InvalidSpec",
                non_retryable=True,
            )
        instance_id = f"{spec.versionId[:8]}-{random.getrandbits(40):010x}"
        slot: Slot | None = None
        if self._slots is not None:
            try:
                slot = self._slots.claim()
            except OSError as err:
                raise ApplicationError(f"Could not isolate a new instance: {err}", type="NoAddress") from err
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
            command=shlex.split(spec.containerArgs),
            env=self._environment(spec, dspec, request.ref, host, instance_id),
            createdAt=datetime.now(UTC).isoformat(),
            startTimeout=self._start_timeout,
            sealedSecrets=dict(spec.encryptedSecrets),
            slot=asdict(slot) if slot is not None else None,
        )
        self._instances[instance_id] = instance
        self._try_launch(instance)
        self._save(instance)
        return instance

    def _readdress(self, instance: LocalInstance) -> None:
        """Give an instance the stack stopped a new slot (its old one was freed with the stack)."""
        if self._slots is None:
            return
        try:
            slot = self._slots.claim()
        except OSError as err:
            instance.status = InstanceStatus.ERRORED.value
            instance.error = f"Could not isolate the instance: {err}"
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
    ) -> dict[str, str]:
        """Return the instance's environment without its secrets: from the spec alone, never the worker's."""
        # Instances find the worker's Python (and the packages of its environment) first on PATH.
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
            if host not in taken and _port_free(host, port):
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

    def _try_launch(self, instance: LocalInstance) -> None:
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
        env["CUDA_VISIBLE_DEVICES"] = "" if gpu_index is None else str(gpu_index)
        instance.gpuIndex = gpu_index
        slot = Slot(**instance.slot) if instance.slot is not None else None
        private = make_private_dir(self._private_root, instance.instanceId, slot.uid if slot else None)
        instance.privateDir = str(private)
        env.setdefault("HOME", str(private))
        env.setdefault("TMPDIR", str(private))
        command = (launch_prefix(slot) if slot is not None else []) + instance.command
        log_path = self._logs / f"{instance.instanceId}.log"
        try:
            # Mode 0600 and owned by the worker: the instance writes through the descriptor it is given,
            # but cannot reopen the file (e.g. via /proc/self/fd/1) to read it or learn where logs live.
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                process = subprocess.Popen(
                    command,
                    env=env,
                    # The code directory, read-only to an isolated instance, like a container's image.
                    cwd=self._workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=subprocess.STDOUT,
                    # Its own session: the instance survives a crash of this worker, and stops as a group.
                    start_new_session=True,
                )
            finally:
                os.close(log_fd)
        except OSError as err:
            instance.status = InstanceStatus.ERRORED.value
            instance.error = f"Could not start {shlex.join(instance.command)}: {err}"
            return
        self._children[process.pid] = process
        instance.pid = process.pid
        instance.procStart = _proc_start_time(process.pid)
        instance.startedAt = datetime.now(UTC).isoformat()
        instance.error = None
        log.info(
            "Started instance %s: pid %s on %s:%s",
            instance.instanceId,
            process.pid,
            instance.host,
            instance.port,
        )

    async def _remove(self, instance: LocalInstance) -> None:
        self._instances.pop(instance.instanceId, None)
        with contextlib.suppress(OSError):
            (self._dir / f"{instance.instanceId}.json").unlink()
        if instance.pid is not None:
            await self._stop_process(instance.pid, instance.procStart)
        _release(instance)
        log.info("Removed instance %s", instance.instanceId)

    async def _stop_process(self, pid: int, proc_start: str | None) -> None:
        if _proc_start_time(pid) != proc_start:
            self._reap(pid)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE_SECONDS
        while loop.time() < deadline:
            self._reap(pid)
            if _proc_start_time(pid) != proc_start:
                return
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)
        self._reap(pid)

    def _reap(self, pid: int) -> int | None:
        """Collect an exited child of this worker; return its exit code if it has exited."""
        process = self._children.get(pid)
        if process is None:
            return None
        code = process.poll()
        if code is not None:
            self._children.pop(pid, None)
        return code

    def _save(self, instance: LocalInstance) -> None:
        path = self._dir / f"{instance.instanceId}.json"
        tmp = path.with_suffix(".tmp")
        data = asdict(instance)
        data.pop("lastProbeAt", None)
        tmp.write_text(json.dumps(data))
        tmp.chmod(0o600)
        tmp.rename(path)

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
                        self._try_launch(instance)
                        self._save(instance)
                        if instance.pid is not None or instance.status == InstanceStatus.ERRORED.value:
                            self._notify(instance.versionId)
                continue
            code = self._reap(instance.pid)
            # A command that exits at once can be a zombie before its start time is read (procStart is
            # None then, like the dead process's), so the exit code of our own child counts first.
            if code is not None or _proc_start_time(instance.pid) != instance.procStart:
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
        if instance.pid is not None and _proc_start_time(instance.pid) == instance.procStart:
            # A failing instance is stopped at once; the workflow decides whether to replace it.
            asyncio.get_running_loop().create_task(self._stop_process(instance.pid, instance.procStart))
        log.info("Instance %s failed: %s", instance.instanceId, error)
        self._notify(instance.versionId)


class LocalBackend:
    """The `Backend` of cluster group `local`: instances are processes run by the `LocalSupervisor`."""

    def __init__(self, supervisor: LocalSupervisor) -> None:
        self._supervisor = supervisor
        self._observed: dict[str, int] = {}
        """Per version, the change generation its last observation saw."""

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        """Record the image reference; the local backend runs the command line, so it pulls nothing."""
        if request.spec.helmChart:
            raise ApplicationError(
                "Helm-chart functions need a Kubernetes cluster group; the local backend runs processes",
                type="InvalidSpec",
                non_retryable=True,
            )
        if not request.spec.containerArgs:
            raise ApplicationError(
                NO_COMMAND_LINE,
                type="InvalidSpec",
                non_retryable=True,
            )
        return PrepareResult(resolvedImage=request.spec.containerImage)

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        """Make the spec have exactly `count` live instances."""
        await self._supervisor.ensure(request)
        return await self.observe(request.ref, [])

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        """Return the version's instances now."""
        self._observed[ref.versionId] = self._supervisor.generation(ref.versionId)
        return [
            i.record(
                self._supervisor.log_tail(i.instanceId) if i.status == InstanceStatus.ERRORED.value else None
            )
            for i in self._supervisor.instances_of(ref.versionId)
        ]

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        """Return when one of the version's instances changed, or after `max_wait` seconds.

        A change notified after the last `observe` and before this wait began (the watcher observes, then
        starts its waits as tasks) returns at once: without it, that change waited for the next re-check.
        """
        if self._supervisor.generation(ref.versionId) != self._observed.get(ref.versionId):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._supervisor.changed_event(ref.versionId).wait(), timeout=max(0.0, max_wait)
            )

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        """Stop every instance of the version."""
        await self._supervisor.remove_version(ref.versionId)


def _release(instance: LocalInstance) -> None:
    """Free what an instance held besides its process: its slot and its private directory."""
    if instance.slot is not None:
        release_slot(Slot(**instance.slot))
        instance.slot = None
    if instance.privateDir is not None:
        remove_private_dir(Path(instance.privateDir))
        instance.privateDir = None


def stop_recorded_instances(home: Path, grace_seconds: float = STOP_GRACE_SECONDS) -> int:
    """Stop every instance recorded under `home` (the embedded stack calls this when it shuts down).

    Returns how many instance processes were still running and got stopped.
    """
    import time

    records = []
    for path in (home / "instances").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, TypeError):
            records.append((path, LocalInstance(**json.loads(path.read_text()))))
    alive = [(path, r) for path, r in records if r.pid is not None and _proc_start_time(r.pid) == r.procStart]
    for _, record in alive:
        assert record.pid is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(_proc_start_time(r.pid or 0) == r.procStart for _, r in alive):
        time.sleep(0.05)
    for _, record in alive:
        if record.pid is not None and _proc_start_time(record.pid) == record.procStart:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGKILL)
    for path, record in records:
        if record.status != InstanceStatus.ERRORED.value:
            # Not a fault of the function: the next worker starts it again, under the same id.
            record.stoppedWithStack = True
            record.error = STOPPED_WITH_STACK
        # Every slot and private directory is freed, so a stack that does not come back leaves no
        # namespace behind; the next worker claims new slots for the instances it starts again.
        _release(record)
        with contextlib.suppress(OSError):
            data = asdict(record)
            data.pop("lastProbeAt", None)
            path.write_text(json.dumps(data))
    return len(alive)
