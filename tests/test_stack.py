"""The embedded stack as `make up` runs it: printed URLs and key, restarts keep functions, TLS."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import ROOT, free_port

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
