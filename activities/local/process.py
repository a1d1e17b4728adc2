"""The process runtime of the local backend: an instance is a command line run on this machine.

Isolated (the worker runs as root), the command runs as the slot's uid in the slot's network namespace
(`activities.isolation.launch_prefix`); either way in a private working directory that is also its HOME
and TMPDIR. The code directory (the worker's working directory) stays where it is: a relative path in
the command line that names a file there is made absolute, so `python examples/echo/server.py` works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from activities.isolation import Slot, launch_prefix, make_private_dir
from activities.local.records import STOP_GRACE_SECONDS, LocalInstance, proc_start_time
from workflows.models import InstanceStatus

log = logging.getLogger(__name__)


def resolve_code_paths(command: list[str], code_dir: Path) -> list[str]:
    """Return `command` with each relative argument naming a file in `code_dir` made absolute."""
    resolved = []
    for arg in command:
        candidate = code_dir / arg
        if arg and not arg.startswith(("-", "/")) and candidate.is_file():
            resolved.append(str(candidate))
        else:
            resolved.append(arg)
    return resolved


class ProcessRunner:
    """Starts and stops instance processes, and collects the exit codes of its own children."""

    def __init__(self, logs: Path, code_dir: Path, private_root: Path) -> None:
        self._logs = logs
        self._code_dir = code_dir
        self._private_root = private_root
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def launch(self, instance: LocalInstance, env: dict[str, str]) -> None:
        """Start the instance's command with `env`; record its pid, or its error."""
        slot = Slot(**instance.slot) if instance.slot is not None else None
        private = make_private_dir(self._private_root, instance.instanceId, slot.uid if slot else None)
        instance.privateDir = str(private)
        env.setdefault("HOME", str(private))
        env.setdefault("TMPDIR", str(private))
        command = (launch_prefix(slot) if slot is not None else []) + resolve_code_paths(
            instance.command, self._code_dir
        )
        log_path = self._logs / f"{instance.instanceId}.log"
        try:
            # Mode 0600 and owned by the worker: the instance writes through the descriptor it is given,
            # but cannot reopen the file (e.g. via /proc/self/fd/1) to read it or learn where logs live.
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                process = subprocess.Popen(
                    command,
                    env=env,
                    # Its own directory: the code directory is not its to write (nor its cwd to list).
                    cwd=private,
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
        instance.procStart = proc_start_time(process.pid)
        instance.startedAt = datetime.now(UTC).isoformat()
        instance.error = None
        log.info(
            "Started instance %s: pid %s on %s:%s",
            instance.instanceId,
            process.pid,
            instance.host,
            instance.port,
        )

    async def stop(self, pid: int, proc_start: str | None) -> None:
        """Stop the process group of `pid` (TERM, then KILL after the grace period)."""
        if proc_start_time(pid) != proc_start:
            self.reap(pid)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE_SECONDS
        while loop.time() < deadline:
            self.reap(pid)
            if proc_start_time(pid) != proc_start:
                return
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)
        self.reap(pid)

    def reap(self, pid: int) -> int | None:
        """Collect an exited child of this worker; return its exit code if it has exited."""
        process = self._children.get(pid)
        if process is None:
            return None
        code = process.poll()
        if code is not None:
            self._children.pop(pid, None)
        return code


def stop_processes(instances: list[LocalInstance], grace_seconds: float) -> None:
    """Stop the process groups of running instances at once (TERM, then KILL after `grace_seconds`)."""
    alive = [i for i in instances if i.pid is not None and proc_start_time(i.pid) == i.procStart]
    for instance in alive:
        assert instance.pid is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(instance.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(proc_start_time(i.pid or 0) == i.procStart for i in alive):
        time.sleep(0.05)
    for instance in alive:
        if instance.pid is not None and proc_start_time(instance.pid) == instance.procStart:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(instance.pid, signal.SIGKILL)
