"""The embedded stack as `make up` runs it: printed URLs and key, restarts keep functions, TLS."""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gpufn.settings import Settings
from gpufn.stack import Stack
from tests.conftest import ROOT, cpu_spec, echo_function, free_port

START_TIMEOUT = 90.0


class UpProcess:
    """`gpufn up` running in its own process group, its output collected."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.log = home / "up.out"
        home.mkdir(parents=True, exist_ok=True)
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gpufn.cli", "up"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        """Return what this run printed (the log file is shared by runs on the same home)."""
        return self.log.read_text()[self.offset :]

    def wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.output()
            if "gpufn is up." in text:
                return text
            if self.process.poll() is not None:
                raise AssertionError(f"gpufn up exited: {text}")
            time.sleep(0.2)
        raise AssertionError(f"gpufn up not ready: {self.output()}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def stack_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFN_")}
    env.update(
        {
            "GPUFN_HOME": str(home),
            "GPUFN_API_PORT": str(free_port()),
            "GPUFN_TEMPORAL_PORT": str(free_port()),
            "GPUFN_UI_PORT": str(free_port()),
            "GPUFN_NATS_PORT": str(free_port()),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state"


def test_up_prints_urls_and_key_and_keeps_functions_across_restarts(home: Path) -> None:
    env = stack_env(home)
    first = UpProcess(home, env)
    try:
        banner = first.wait_ready()
        key = (home / "admin.key").read_text().strip()
        assert key.startswith("nvapi-") and key in banner
        assert f"http://127.0.0.1:{env['GPUFN_API_PORT']}" in banner
        assert f"http://127.0.0.1:{env['GPUFN_UI_PORT']}" in banner
        api = f"http://127.0.0.1:{env['GPUFN_API_PORT']}"
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{api}/health").status_code == 200
        created = httpx.post(
            f"{api}/v2/nvcf/functions",
            headers=headers,
            json={"name": "survivor", "inferenceUrl": "/echo", "containerImage": "example.com/echo:1"},
        )
        assert created.status_code == 200, created.text
        function_id = created.json()["function"]["id"]
        ui = httpx.get(f"http://127.0.0.1:{env['GPUFN_UI_PORT']}/")
        assert ui.status_code == 200
    finally:
        assert first.stop() == 0
    assert "gpufn: stopped." in first.output()

    second = UpProcess(home, env)
    try:
        second.wait_ready()
        listed = httpx.get(f"{api}/v2/nvcf/functions/ids", headers=headers)
        assert listed.status_code == 200
        assert function_id in listed.json()["functionIds"]
    finally:
        assert second.stop() == 0


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_up_serves_https_with_the_given_certificate(home: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    env = stack_env(home, GPUFN_TLS_CERT=str(cert), GPUFN_TLS_KEY=str(key))
    up = UpProcess(home, env)
    try:
        banner = up.wait_ready()
        api = f"https://127.0.0.1:{env['GPUFN_API_PORT']}"
        assert api in banner
        response = httpx.get(f"{api}/health", verify=False)
        assert response.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{env['GPUFN_API_PORT']}/health", timeout=3)
    finally:
        assert up.stop() == 0


def _api(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['GPUFN_API_PORT']}"


def _wait(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def _deploy_echo(api: str, headers: dict[str, str], name: str, start_seconds: int) -> dict[str, str]:
    body = echo_function(
        name, containerEnvironment=[{"key": "ECHO_START_SECONDS", "value": str(start_seconds)}]
    )
    created = httpx.post(f"{api}/v2/nvcf/functions", headers=headers, json=body)
    assert created.status_code == 200, created.text
    function: dict[str, str] = created.json()["function"]
    deployed = httpx.post(
        f"{api}/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}",
        headers=headers,
        json=cpu_spec(),
        timeout=30,
    )
    assert deployed.status_code == 200, deployed.text
    return function


def _status(api: str, headers: dict[str, str], function: dict[str, str]) -> str | None:
    with contextlib.suppress(httpx.HTTPError):
        answer = httpx.get(
            f"{api}/v2/nvcf/deployments/functions/{function['id']}/versions/{function['versionId']}",
            headers=headers,
            timeout=5,
        )
        if answer.status_code == 200:
            status: str = answer.json()["deployment"]["functionStatus"]
            return status
    return None


def _records(home: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in (home / "instances").glob("*.json")]


def _deploy_slow_starter_then_stop(home: Path, env: dict[str, str], name: str) -> dict[str, str]:
    """Deploy a function whose instance takes 8 s to start, and stop the stack while it is DEPLOYING."""
    api = _api(env)
    first = UpProcess(home, env)
    try:
        first.wait_ready()
        # The instance takes a while to load its "model", so the stack stops it mid-deploy.
        function = _deploy_echo(api, _headers(home), name, start_seconds=8)
        _wait(lambda: any(r["pid"] for r in _records(home)), 30, "the instance process started")
        assert _status(api, _headers(home), function) == "DEPLOYING"
    finally:
        assert first.stop() == 0
    return function


def _start_until_active(home: Path, env: dict[str, str], function: dict[str, str]) -> UpProcess:
    """Start the stack again and wait until the deployment is ACTIVE without passing through ERROR."""
    api = _api(env)
    second = UpProcess(home, env)
    second.wait_ready()
    statuses: list[str | None] = []

    def active() -> bool:
        statuses.append(_status(api, _headers(home), function))
        return statuses[-1] == "ACTIVE"

    try:
        _wait(active, 60, "the deployment became ACTIVE")
        assert "ERROR" not in statuses
    except BaseException:
        second.stop()
        raise
    return second


def _headers(home: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {(home / 'admin.key').read_text().strip()}"}


def test_a_stack_stopped_while_deploying_continues_the_deployment_on_the_next_start(home: Path) -> None:
    env = stack_env(home)
    function = _deploy_slow_starter_then_stop(home, env, "slow-starter")
    [stopped] = _records(home)
    assert stopped["stoppedWithStack"] is True and stopped["status"] != "ERRORED"

    second = _start_until_active(home, env, function)
    try:
        answer = httpx.post(
            f"{_api(env)}/v2/nvcf/pexec/functions/{function['id']}",
            headers=_headers(home),
            json={"a": 1},
            timeout=30,
        )
        assert answer.status_code == 200 and answer.json() == {"a": 1}
    finally:
        assert second.stop() == 0


def test_a_stack_stopped_longer_than_the_deploy_timeout_still_deploys_after_the_restart(home: Path) -> None:
    """Time the platform was down is not deploy time: a stop longer than GPUFN_DEPLOY_TIMEOUT is no ERROR."""
    env = stack_env(home, GPUFN_DEPLOY_TIMEOUT="20")
    function = _deploy_slow_starter_then_stop(home, env, "stopped-long")
    # Down for longer than the deploy timeout plus the workflow's margin for a slow worker (30 s).
    time.sleep(55)
    assert _start_until_active(home, env, function).stop() == 0


def _children(pid: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def test_a_dead_temporal_is_restarted_and_instances_keep_running(home: Path) -> None:
    env = stack_env(home)
    api = _api(env)
    up = UpProcess(home, env)
    try:
        up.wait_ready()
        headers = {"Authorization": f"Bearer {(home / 'admin.key').read_text().strip()}"}
        function = _deploy_echo(api, headers, "outlives-temporal", start_seconds=0)
        _wait(lambda: _status(api, headers, function) == "ACTIVE", 60, "the deployment became ACTIVE")
        [instance] = _records(home)
        [temporal] = [pid for pid, cmd in _children(up.process.pid).items() if "start-dev" in cmd]

        os.kill(temporal, signal.SIGKILL)
        _wait(lambda: "temporal exited" in up.output(), 10, "the supervisor noticed Temporal's death")
        _wait(
            lambda: [p for p, c in _children(up.process.pid).items() if "start-dev" in c and p != temporal],
            15,
            "Temporal restarted",
        )
        assert up.process.poll() is None
        _wait(lambda: _status(api, headers, function) == "ACTIVE", 60, "the API answers again")
        # The instance kept running through it, and is still the one serving.
        [after] = _records(home)
        assert after["instanceId"] == instance["instanceId"] and after["pid"] == instance["pid"]

        def invoked() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.post(
                    f"{api}/v2/nvcf/pexec/functions/{function['id']}", headers=headers, json={}, timeout=10
                )
                return answer.status_code == 200
            return False

        _wait(invoked, 30, "an invocation succeeded")
        # Temporal works again: a new function registers.
        created = httpx.post(f"{api}/v2/nvcf/functions", headers=headers, json=echo_function("after"))
        assert created.status_code == 200, created.text
    finally:
        assert up.stop() == 0


def _restarted(stack: Stack, old_pid: int) -> bool:
    return stack.processes["api"].pid != old_pid


def test_one_child_restarts_without_blocking_the_others_and_backoff_resets(tmp_path: Path) -> None:
    stack = Stack(Settings(home=tmp_path, admin_key="nvapi-x", secret_key=None))
    stack.backoff = (0.2, 30.0)
    stack.healthy_reset_seconds = 1.0
    # Real processes: a worker that keeps crashing at once, and a long-lived API.
    stack.starters = {
        "worker": lambda: stack._spawn("worker", ["false"]),
        "api": lambda: stack._spawn("api", ["sleep", "60"]),
    }
    for start in stack.starters.values():
        start()
    supervisor = threading.Thread(target=stack.supervise, daemon=True)
    supervisor.start()
    try:
        # The worker crashed twice: its next restart is 30 s away.
        _wait(lambda: stack.restart_due.get("worker", 0) - time.monotonic() > 20, 10, "worker backed off")
        for _ in range(2):  # the second round shows the backoff reset after a healthy second
            api = stack.processes["api"]
            _wait(lambda: time.monotonic() - stack.started_at["api"] > 1.2, 5, "api up for a while")
            assert stack.restarts.get("api", 0) == 0
            api.kill()
            # Restarted after the shortest backoff, while the worker's long wait is still pending.
            _wait(functools.partial(_restarted, stack, api.pid), 3, "api restarted promptly")
            assert "worker" in stack.restart_due
    finally:
        stack.stopping = True
        supervisor.join(timeout=5)
        stack.stop()
