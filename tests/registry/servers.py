"""Real registry servers on loopback for the resolver tests, and the artifacts pushed into them.

* `RegistryServer`: Debian's `docker-registry` (the CNCF distribution registry) in a temp dir, open, behind
  htpasswd Basic auth, or behind a Bearer token service;
* `TokenService`: a token service for the latter, signing JWTs the way the registry's token auth expects
  (RS256, certificate chain in the `x5c` header, trusted through the registry's `rootcertbundle`);
* `oci_image_layout` / `skopeo_copy` / `skopeo_digest`: a tiny image, built offline as an OCI layout and
  pushed with skopeo;
* `chart_archive`: a minimal chart `.tgz`, and `StaticServer` to serve archives and an `index.yaml`.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import json
import re
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

REGISTRY_BINARY = "docker-registry"
SERVICE = "gpufn-test-registry"
ISSUER = "gpufn-test-token-issuer"
START_TIMEOUT_SECONDS = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """A Bearer token service: Basic credentials in, a JWT granting `pull` on the asked repository out.

    Users in `users` get the access they ask for; anonymous callers get a token that grants nothing (so the
    registry refuses them after authentication); wrong credentials get 401 from the service itself.
    """

    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        self.users = users
        self.port = free_port()
        self.requests: list[dict[str, str]] = []
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = workdir / "token-signer.crt"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._runner: web.AppRunner | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self._issue)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _issue(self, request: web.Request) -> web.Response:
        scope = request.query.get("scope", "")
        self.requests.append({"scope": scope, "service": request.query.get("service", "")})
        user = ""
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(user) != password:
                return web.json_response(
                    {"errors": [{"code": "UNAUTHORIZED", "message": "incorrect username or password"}]},
                    status=401,
                )
        access = []
        if user and scope.startswith("repository:"):
            _, repository, actions = scope.split(":", 2)
            access.append({"type": "repository", "name": repository, "actions": actions.split(",")})
        return web.json_response({"token": self._jwt(user or "anonymous", access), "expires_in": 300})

    def _jwt(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


class RegistryServer:
    """A `docker-registry` process on a free loopback port, with its storage in `workdir`.

    Args:
        workdir: Directory for the config, the storage and the log.
        users: With `auth="htpasswd"`, the accepted username/password pairs.
        auth: `none`, `htpasswd` (Basic) or `token` (Bearer, through `token_service`).
        token_service: The token service for `auth="token"`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        auth: str = "none",
        users: dict[str, str] | None = None,
        token_service: TokenService | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.auth = auth
        self.users = users or {}
        self.token_service = token_service
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.workdir / "storage")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host, "secret": uuid.uuid4().hex},
        }
        if self.auth == "htpasswd":
            lines = []
            for user, password in self.users.items():
                # bcrypt (the only scheme the registry accepts), at the lowest cost: tests need no strength.
                done = subprocess.run(
                    ["htpasswd", "-nbBC", "4", user, password], capture_output=True, check=True, text=True
                )
                lines.append(done.stdout.strip())
            (self.workdir / "htpasswd").write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "gpufn-test", "path": str(self.workdir / "htpasswd")}}
        elif self.auth == "token":
            assert self.token_service is not None
            config["auth"] = {
                "token": {
                    "realm": self.token_service.realm,
                    "service": SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": str(self.token_service.cert_path),
                }
            }
        return config

    def start(self) -> RegistryServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "config.yml"
        # JSON is YAML: no YAML writer needed.
        config_path.write_text(json.dumps(self._config(), indent=2))
        with (self.workdir / "registry.log").open("wb") as log:
            self._process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(self.workdir / 'registry.log').read_text()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1):
                    return self
            except urllib.error.HTTPError:
                return self  # 401: up, and asking for credentials
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer on {self.host}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _blob(root: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def oci_image_layout(root: Path, content: bytes, tag: str) -> str:
    """Write a one-layer image (a single file holding `content`) as an OCI layout; return its digest."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("content.txt")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    return write_oci_layout(root, buffer.getvalue(), tag, {})


def write_oci_layout(root: Path, layer_tar: bytes, tag: str, image_config: dict[str, object]) -> str:
    """Write a one-layer image (uncompressed `layer_tar`) as an OCI layout tagged `tag`; return its digest.

    `image_config` is the image configuration's `config` (entrypoint, environment, ...).
    """
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    layer, layer_size = _blob(root, gzip.compress(layer_tar, mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
    }
    config_digest, config_size = _blob(root, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_size}
        ],
    }
    digest, size = _blob(root, json.dumps(manifest).encode())
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    return digest


def _skopeo(*args: str) -> str:
    # --insecure-policy: no /etc/containers/policy.json is needed; nothing here is verified by signature.
    done = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def skopeo_copy(layout: Path, tag: str, destination: str, creds: tuple[str, str] | None = None) -> None:
    """Push the image tagged `tag` in an OCI layout to `docker://destination` over plain HTTP."""
    auth = ["--dest-creds", f"{creds[0]}:{creds[1]}"] if creds else []
    _skopeo("copy", "--dest-tls-verify=false", *auth, f"oci:{layout}:{tag}", f"docker://{destination}")


def skopeo_digest(reference: str, creds: tuple[str, str] | None = None) -> str:
    """Return the manifest digest skopeo sees for `docker://reference`."""
    auth = ["--creds", f"{creds[0]}:{creds[1]}"] if creds else []
    digest: str = json.loads(_skopeo("inspect", "--tls-verify=false", *auth, f"docker://{reference}"))[
        "Digest"
    ]
    return digest


def chart_archive(name: str, version: str) -> bytes:
    """Return a minimal chart `.tgz` (Chart.yaml and one ConfigMap template), byte-for-byte reproducible."""
    files = {
        f"{name}/Chart.yaml": f"apiVersion: v2\nname: {name}\nversion: {version}\n".encode(),
        f"{name}/templates/configmap.yaml": (
            b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\n"
        ),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0)


def chart_index(base_url: str, charts: dict[str, bytes]) -> str:
    """Return a chart repository `index.yaml` (as JSON, which is YAML) for archives named `<name>-<v>.tgz`."""
    entries: dict[str, list[dict[str, Any]]] = {}
    for filename, data in charts.items():
        # The version starts at the first "-<digit>": chart names may contain dashes, versions too.
        match = re.fullmatch(r"(.+?)-(\d.*)\.tgz", filename)
        assert match is not None, filename
        name, version = match.groups()
        entries.setdefault(name, []).append(
            {
                "apiVersion": "v2",
                "name": name,
                "version": version,
                # Relative, as `helm repo index` writes them without --url.
                "urls": [filename],
                "digest": hashlib.sha256(data).hexdigest(),
            }
        )
    return json.dumps({"apiVersion": "v1", "entries": entries})


class StaticServer:
    """Serves files from memory on a free loopback port; optionally behind Basic auth."""

    def __init__(self, files: dict[str, bytes], basic_auth: tuple[str, str] | None = None) -> None:
        self.files = files
        self.port = free_port()
        self.basic_auth = basic_auth
        self.status_override: int | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, request: web.Request) -> web.Response:
        if self.status_override is not None:
            return web.Response(status=self.status_override, text="try again later")
        if self.basic_auth is not None:
            expected = "Basic " + base64.b64encode(":".join(self.basic_auth).encode()).decode()
            if request.headers.get("Authorization") != expected:
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="charts"'})
        data = self.files.get(request.path)
        if data is None:
            return web.Response(status=404, text=f"{request.path} not found")
        return web.Response(body=data)

    async def start(self) -> StaticServer:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def helm_push(helm: Path, archive: Path, destination: str, env: dict[str, str]) -> str:
    """Push a chart archive to `oci://destination` over plain HTTP; return the digest helm reports."""
    done = subprocess.run(
        [str(helm), "push", str(archive), f"oci://{destination}", "--plain-http"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"helm push failed: {done.stderr}")
    for line in (done.stdout + done.stderr).splitlines():
        if line.startswith("Digest:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"helm push printed no digest: {done.stdout}{done.stderr}")


def tools_missing() -> list[str]:
    """Return the programs the registry tests need that are not installed."""
    return [tool for tool in (REGISTRY_BINARY, "skopeo", "htpasswd") if shutil.which(tool) is None]
