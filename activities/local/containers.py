"""The container runtime of the local backend: an instance is the version's image, run by podman.

Each instance is one container, `gpufn-<instance id>`, run detached (conmon watches it, so it outlives a
crashed worker and the next worker adopts it by the pid of its main process):

- in the instance's own network namespace, the same slot the process runtime uses (a veth pair and a /30
  of the instance network, `activities.isolation`), so the gateway reaches it at the slot's address and
  it reaches neither the host's loopback nor another instance;
- as the slot's uid (never root, whatever the image says), with every capability dropped and
  `no-new-privileges`, in its own pid namespace (its /proc shows its own processes only);
- with the environment of its spec alone: the worker's and podman's are not passed;
- with its GPU, when it has one, as a CDI device (`nvidia.com/gpu=<index>`; the operator generates the
  CDI spec with the NVIDIA Container Toolkit, docs/operations.md);
- with its secrets in its environment. Podman writes a container's configuration, environment included,
  into its storage; so the containers' storage (and podman's database) lives on a tmpfs
  (`/dev/shm/gpufn-podman-<id of the state directory>`), and only images are kept on disk (under the
  state directory, `podman/images`, used read-only by the containers' storage as an image store);
- with its output in `logs/<instance id>.log` (conmon's k8s-file format), readable by the platform only.

The runtime and resource limits come from a containers.conf the runner writes (`runtime = "runc"`,
`default_ulimits`, cgroupfs, file events), so no system-wide podman configuration is needed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from temporalio.exceptions import ApplicationError

from activities.isolation import Slot
from activities.local.records import STOP_GRACE_SECONDS, LocalInstance, proc_start_time
from activities.registry.artifacts import RegistryConfig, parse_image_reference
from workflows.models import InstanceStatus

log = logging.getLogger(__name__)

PODMAN_TIMEOUT_SECONDS = 60.0
PULL_TIMEOUT_SECONDS = 1800.0
STATE_PARENT = Path("/dev/shm")
PODMAN_OWN_ENV = frozenset(
    {"PATH", "HOME", "TMPDIR", "LANG", "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "XDG_RUNTIME_DIR"}
)
"""Variables podman itself reads: an instance's value for one of these goes on podman's command line."""
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_NOT_FOUND_MARKERS = ("manifest unknown", "not found", "name unknown", "unauthorized", "denied")


def container_state_dir(home: Path) -> Path:
    """Return the tmpfs directory holding the containers' storage of the stack whose state is `home`."""
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
    return STATE_PARENT / f"gpufn-podman-{digest}"


def podman_unavailable_reason() -> str | None:
    """Return why the container runtime cannot run here, or None when it can."""
    if shutil.which("podman") is None:
        return "podman is not installed (Debian package podman; `make up` installs it as root)"
    if os.geteuid() != 0:
        return "the worker does not run as root (containers need the per-instance network namespace)"
    if not STATE_PARENT.is_dir():
        return f"{STATE_PARENT} (a tmpfs for the containers' storage) does not exist"
    return None


def podman_env(home: Path) -> dict[str, str]:
    """Return the environment podman runs with for the stack whose state is `home` (not the worker's)."""
    return {
        "PATH": SYSTEM_PATH,
        "CONTAINERS_CONF": str(home / "podman" / "containers.conf"),
        "LANG": "C.UTF-8",
    }


def podman_command(home: Path) -> list[str]:
    """Return the podman command line of the stack's containers: storage on tmpfs, images on disk."""
    state = container_state_dir(home)
    return [
        "podman",
        "--root",
        str(state / "root"),
        "--runroot",
        str(state / "run"),
        "--storage-driver",
        "overlay",
        "--storage-opt",
        f"overlay.imagestore={home / 'podman' / 'images'}",
    ]


def remove_containers_now(home: Path, names: list[str], grace: float) -> None:
    """Stop and delete containers of the stack at once, synchronously (the stack's shutdown)."""
    if names and shutil.which("podman") is not None:
        subprocess.run(
            [*podman_command(home), "rm", "--force", "--ignore", "--time", str(int(grace)), *names],
            env=podman_env(home),
            capture_output=True,
            check=False,
            timeout=PODMAN_TIMEOUT_SECONDS + grace,
        )


def remove_state_if_unused(home: Path) -> bool:
    """Delete the stack's tmpfs container state once it holds no container; return whether it did.

    Images stay (on disk); the next worker makes a new, empty state.
    """
    state = container_state_dir(home)
    if not state.is_dir() or shutil.which("podman") is None:
        return False
    listed = subprocess.run(
        [*podman_command(home), "ps", "--all", "--quiet"],
        env=podman_env(home),
        capture_output=True,
        text=True,
        check=False,
        timeout=PODMAN_TIMEOUT_SECONDS,
    )
    if listed.returncode != 0 or listed.stdout.strip():
        return False
    # The overlay driver bind-mounts its directory onto itself; unmounted first, deepest first.
    for point in sorted(_mounts_under(state), key=len, reverse=True):
        subprocess.run(["umount", point], capture_output=True, check=False)
    shutil.rmtree(state, ignore_errors=True)
    return not state.exists()


def _mounts_under(directory: Path) -> list[str]:
    """Return the mount points at or below `directory`."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    prefix = str(directory)
    points = [line.split()[4] for line in lines if len(line.split()) > 4]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


class PodmanRunner:
    """Pulls images and runs, inspects and removes the instance containers of one stack."""

    def __init__(
        self,
        home: Path,
        oci_runtime: str = "runc",
        ulimits: tuple[str, ...] = ("nofile=20000:20000", "nproc=32768:32768"),
        registry: RegistryConfig | None = None,
    ) -> None:
        self._home = home
        self._images = home / "podman" / "images"
        self._state = container_state_dir(home)
        self._conf = home / "podman" / "containers.conf"
        self._auth = home / "podman" / "auth.json"
        self._logs = home / "logs"
        self._registry = registry or RegistryConfig()
        self._images.mkdir(parents=True, exist_ok=True)
        self._state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._state.chmod(0o700)
        limits = ", ".join(json.dumps(u) for u in ulimits)
        self._conf.write_text(
            "# Written by the gpufn worker (activities/local/containers.py) for its instance containers.\n"
            "[containers]\n"
            f"default_ulimits = [{limits}]\n"
            'log_driver = "k8s-file"\n'
            "[engine]\n"
            f"runtime = {json.dumps(oci_runtime)}\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f"tmp_dir = {json.dumps(str(self._state / 'tmp'))}\n"
        )
        self._write_auth()

    def _write_auth(self) -> None:
        """Write the registry credentials podman pulls with (mode 0600, never on a command line)."""
        auths = {
            host: {"auth": base64.b64encode(f"{c.username}:{c.password}".encode()).decode()}
            for host, c in self._registry.credentials.items()
        }
        fd = os.open(self._auth, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"auths": auths}, handle)

    def _podman_env(self) -> dict[str, str]:
        return podman_env(self._home)

    def _containers(self) -> list[str]:
        return podman_command(self._home)

    def _image_store(self) -> list[str]:
        return [
            "podman",
            "--root",
            str(self._images),
            "--runroot",
            str(self._state / "run-images"),
            "--storage-driver",
            "overlay",
        ]

    async def _run(self, args: list[str], limit: float, env: dict[str, str] | None = None) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *args,
            env=env or self._podman_env(),
            stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), limit)
        except TimeoutError:
            process.kill()
            await process.wait()
            return -1, f"{args[0]} did not finish within {limit:.0f} s"
        return process.returncode or 0, out.decode(errors="replace").strip()

    # --- Images -------------------------------------------------------------------------------------

    async def pull(self, image: str) -> None:
        """Pull `image` (pinned by digest) into the image store, unless it is there already.

        Raises:
            ApplicationError: `ImageNotFound` (non-retryable) when the registry has no such image or
                refuses the credentials; `ImagePullFailed` (retryable) for anything else.
        """
        present, _ = await self._run([*self._image_store(), "image", "exists", image], PODMAN_TIMEOUT_SECONDS)
        if present == 0:
            return
        host = parse_image_reference(image).api_host
        insecure = self._registry.scheme_for(host) == "http"
        code, output = await self._run(
            [
                *self._image_store(),
                "pull",
                "--quiet",
                f"--tls-verify={'false' if insecure else 'true'}",
                f"--authfile={self._auth}",
                image,
            ],
            PULL_TIMEOUT_SECONDS,
        )
        if code == 0:
            return
        detail = output.splitlines()[-1] if output else f"exit code {code}"
        if any(marker in output.lower() for marker in IMAGE_NOT_FOUND_MARKERS):
            raise ApplicationError(
                f"Could not pull {image}: {detail}", type="ImageNotFound", non_retryable=True
            )
        raise ApplicationError(f"Could not pull {image}: {detail}", type="ImagePullFailed")

    # --- Containers ---------------------------------------------------------------------------------

    def launch(self, instance: LocalInstance, env: dict[str, str], gpu_index: int | None) -> None:
        """Run the instance's container with `env`; record the pid of its main process, or the error."""
        assert instance.slot is not None and instance.image is not None
        slot = Slot(**instance.slot)
        name = instance.container_name
        # A container left under this name (a start cut short, the stack's last run) is stale.
        subprocess.run(
            [*self._containers(), "rm", "--force", "--time", "0", name],
            env=self._podman_env(),
            capture_output=True,
            check=False,
            timeout=PODMAN_TIMEOUT_SECONDS,
        )
        own = self._podman_env()
        args = [
            *self._containers(),
            "run",
            "--detach",
            "--name",
            name,
            "--label",
            f"gpufn.instance={instance.instanceId}",
            "--network",
            f"ns:/run/netns/{slot.netns}",
            "--user",
            f"{slot.uid}:{slot.uid}",
            "--cap-drop",
            "all",
            "--security-opt",
            "no-new-privileges",
            "--log-driver",
            "k8s-file",
            "--log-opt",
            f"path={self._logs / f'{instance.instanceId}.log'}",
            "--pull",
            "never",
        ]
        child_env = dict(own)
        for key, value in env.items():
            if key in PODMAN_OWN_ENV:
                args += ["--env", f"{key}={value}"]
            else:
                # The value travels in podman's environment, never on a command line others can read.
                args += ["--env", key]
                child_env[key] = value
        if gpu_index is not None:
            args += ["--device", f"nvidia.com/gpu={gpu_index}"]
        args += [instance.image, *instance.command]
        try:
            done = subprocess.run(
                args,
                env=child_env,
                capture_output=True,
                text=True,
                check=False,
                timeout=PODMAN_TIMEOUT_SECONDS,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            instance.status = InstanceStatus.ERRORED.value
            instance.error = f"Could not run the container of {instance.image}: {err}"
            return
        if done.returncode != 0:
            instance.status = InstanceStatus.ERRORED.value
            lines = (done.stderr or done.stdout).strip().splitlines()
            instance.error = (
                f"Could not run the container of {instance.image}: {lines[-1] if lines else done.returncode}"
            )
            return
        pid, exit_code = self._main_pid(name)
        started = proc_start_time(pid) if pid is not None else None
        if pid is None or started is None:
            # Exited already (between `run` and `inspect`, or before its start time could be read).
            if pid is not None:
                exit_code = self._wait(name)
            instance.status = InstanceStatus.ERRORED.value
            instance.error = f"Instance {instance.instanceId} exited with code {exit_code} at once"
            return
        instance.pid = pid
        instance.procStart = started
        instance.startedAt = datetime.now(UTC).isoformat()
        instance.error = None
        log.info(
            "Started instance %s: container %s (pid %s) on %s:%s",
            instance.instanceId,
            name,
            pid,
            instance.host,
            instance.port,
        )

    def _main_pid(self, name: str) -> tuple[int | None, str]:
        """Return the pid of the container's main process (None once it exited) and its exit code."""
        done = subprocess.run(
            [*self._containers(), "inspect", "--format", "{{.State.Pid}} {{.State.ExitCode}}", name],
            env=self._podman_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=PODMAN_TIMEOUT_SECONDS,
        )
        pid, _, code = done.stdout.strip().partition(" ")
        return (int(pid) or None if pid.isdigit() else None), code or "unknown"

    def _wait(self, name: str) -> str:
        """Return the exit code of a container whose main process is gone (podman records it soon)."""
        try:
            done = subprocess.run(
                [*self._containers(), "wait", name],
                env=self._podman_env(),
                capture_output=True,
                text=True,
                check=False,
                timeout=PODMAN_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired:
            return "unknown"
        return done.stdout.strip() or "unknown"

    async def exit_code(self, instance: LocalInstance) -> int | None:
        """Return the exit code of the instance's container, if it exited and podman still knows it."""
        code, output = await self._run(
            [*self._containers(), "inspect", "--format", "{{.State.ExitCode}}", instance.container_name],
            PODMAN_TIMEOUT_SECONDS,
        )
        try:
            return int(output) if code == 0 else None
        except ValueError:
            return None

    async def remove(self, instance: LocalInstance, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop (TERM, KILL after `grace`) and delete the instance's container."""
        code, output = await self._run(
            [*self._containers(), "rm", "--force", "--time", str(int(grace)), instance.container_name],
            PODMAN_TIMEOUT_SECONDS + grace,
        )
        if code != 0 and "no such container" not in output.lower():
            log.warning("Could not remove container %s: %s", instance.container_name, output)

    async def remove_orphans(self, known: set[str]) -> list[str]:
        """Delete this stack's containers that no instance record names (a worker killed mid-start)."""
        code, output = await self._run(
            [
                *self._containers(),
                "ps",
                "--all",
                "--filter",
                "label=gpufn.instance",
                "--format",
                "{{.Names}}",
            ],
            PODMAN_TIMEOUT_SECONDS,
        )
        if code != 0:
            log.warning("Could not list the instance containers: %s", output)
            return []
        orphans = [name for name in output.split() if name not in known]
        if orphans:
            await self._run(
                [*self._containers(), "rm", "--force", "--time", "0", *orphans], PODMAN_TIMEOUT_SECONDS
            )
            log.info("Removed orphaned containers %s", ", ".join(orphans))
        return orphans
