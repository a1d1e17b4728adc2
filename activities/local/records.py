"""The local backend's instance records: what one instance is, and how it is kept on disk.

Every instance is a JSON file `instances/<id>.json` under the state directory (mode 0600, in a 0700
directory). It holds the pid and process start time of the instance's process (for a container, of the
container's main process), so a restarted worker adopts what still runs, and sealed secrets only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from activities.isolation import Slot, release_slot, remove_private_dir
from workflows.models import InstanceRecord, InstanceStatus

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 5.0
LOG_TAIL_LINES = 20
NO_COMMAND_LINE = (
    "The local backend runs a version's containerArgs as a command line, and this version has none"
)
STOPPED_WITH_STACK = "Stopped with the stack; the next worker starts it again"
PROCESS_RUNTIME = "process"
CONTAINER_RUNTIME = "podman"


@dataclass
class LocalInstance:
    """One instance (a process or a container), as recorded on disk."""

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
    """The command line (process runtime), or the arguments given to the image (container runtime)."""
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
    lastSlotIndex: int | None = None
    """The slot it held before the stack stopped: claimed again first, so its address stays the same."""
    runtime: str = PROCESS_RUNTIME
    """`process` or `podman` (docs/operations.md, Security)."""
    image: str | None = None
    """The pinned image a container instance runs."""
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

    @property
    def container_name(self) -> str:
        """The name of the instance's container (container runtime)."""
        return f"gpufn-{self.instanceId}"


def proc_start_time(pid: int) -> str | None:
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


def is_alive(instance: LocalInstance) -> bool:
    """Return whether the instance's recorded process is still the one that runs."""
    return instance.pid is not None and proc_start_time(instance.pid) == instance.procStart


def port_free(host: str, port: int) -> bool:
    """Return whether `host:port` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def save_record(directory: Path, instance: LocalInstance) -> None:
    """Write the instance's record atomically, readable by the worker alone."""
    path = directory / f"{instance.instanceId}.json"
    tmp = path.with_suffix(".tmp")
    data = asdict(instance)
    data.pop("lastProbeAt", None)
    tmp.write_text(json.dumps(data))
    tmp.chmod(0o600)
    tmp.rename(path)


def load_records(directory: Path) -> list[LocalInstance]:
    """Return the instances recorded in `directory`, skipping (and logging) unreadable records."""
    instances = []
    for path in sorted(directory.glob("*.json")):
        try:
            instances.append(LocalInstance(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError) as err:
            log.warning("Ignoring unreadable instance record %s: %s", path, err)
    return instances


def delete_record(directory: Path, instance_id: str) -> None:
    """Forget an instance's record."""
    with contextlib.suppress(OSError):
        (directory / f"{instance_id}.json").unlink()


def release(instance: LocalInstance) -> None:
    """Free what an instance held besides its process: its slot and its private directory."""
    if instance.slot is not None:
        slot = Slot(**instance.slot)
        release_slot(slot)
        instance.lastSlotIndex = slot.index
        instance.slot = None
    if instance.privateDir is not None:
        remove_private_dir(Path(instance.privateDir))
        instance.privateDir = None


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str | None:
    """Return the last lines of an instance's log.

    A container's log is conmon's k8s-file format (`<time> <stream> <F|P> <text>`): only the text is kept.
    """
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    kept = []
    for line in text.splitlines()[-lines:]:
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[1] in ("stdout", "stderr") and parts[2] in ("F", "P"):
            line = parts[3]
        kept.append(line)
    return "\n".join(kept) or None
