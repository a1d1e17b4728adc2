"""Resolve a function's container image or Helm chart against its registry, before anything runs.

A deployment pins what it runs: an image tag becomes the manifest digest the registry serves for it now,
a chart becomes the sha256 of its archive (or the digest of its OCI manifest). Instances then run the
pinned artifact, so retagging or republishing afterwards does not change a deployed version.

`PinningBackend` wraps any `Backend` so that its `prepare` pins the artifact (`resolve_artifacts`); the
pins reach `ensure_instances` in `request.prepared`. `fetch_chart` downloads a pinned chart and checks it.

Failures are classified here, at the edge, because only here is the registry's answer known: a missing
repository, tag or chart and refused credentials are permanent (non-retryable `ApplicationError`s whose
message carries the registry's own error text, which the workflow shows in `healthInfo`); connection
errors, 5xx and 429 are transient and left to the activity's retry policy.

Configuration (the settings `registry_credentials` and `insecure_registries`):

* `GPUFN_REGISTRY_CREDENTIALS`: JSON `{"host[:port]": {"username": "...", "password": "..."}}`; used for
  Basic auth and for the Bearer token exchange of images, OCI charts and chart URLs of that host.
* `GPUFN_INSECURE_REGISTRIES`: JSON list of `host[:port]` spoken to over plain HTTP. Loopback hosts are
  always insecure, as Docker treats them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import yaml
from multidict import CIMultiDict
from temporalio.exceptions import ApplicationError

from activities.backend import Backend
from gpufn.settings import Settings
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    FunctionVersionSpec,
    InstanceRecord,
    PrepareInput,
    PrepareResult,
    VersionRef,
)

ENV_CREDENTIALS = "GPUFN_REGISTRY_CREDENTIALS"
ENV_INSECURE = "GPUFN_INSECURE_REGISTRIES"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
"""Lists first: a multi-platform image is pinned by its index, and each node picks its platform."""
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART_LAYER = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
LOOPBACK_HOSTS = frozenset({"localhost", "::1", "[::1]"})

REQUEST_TIMEOUT_SECONDS = 30.0
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
"""Manifests, chart archives and index files are read into memory; nothing legitimate comes near this."""
TOKEN_EXPIRY_MARGIN_SECONDS = 10.0
DEFAULT_TOKEN_LIFETIME_SECONDS = 60.0
"""What the distribution token spec says to assume when a token response has no `expires_in`."""
ERROR_TEXT_LIMIT = 500

# The grammar of docker/distribution's `reference` package, minus the host part (split off first).
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


# --- Errors -----------------------------------------------------------------------------------------


class ArtifactNotFoundError(ApplicationError):
    """The registry has no such repository, tag, digest or chart: the deployment cannot succeed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="ArtifactNotFound", non_retryable=True)


class ArtifactUnauthorizedError(ApplicationError):
    """The registry refused the configured credentials (or their absence): retrying will not help."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="ArtifactUnauthorized", non_retryable=True)


class InvalidArtifactReferenceError(ApplicationError):
    """The reference cannot name an artifact (bad syntax, not a chart, digest mismatch)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="InvalidArtifactReference", non_retryable=True)


class RegistryUnavailableError(ApplicationError):
    """The registry failed or throttled (5xx, 429): the activity's retry policy tries again."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="RegistryUnavailable")


# --- Configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryCredential:
    """A username and password (or token) for one registry host."""

    username: str
    password: str


def normalize_host(host: str) -> str:
    """Return the key a registry host is configured under: lower case, no scheme or path; Hub is docker.io."""
    text = host.strip().lower()
    if "://" in text:
        text = urlsplit(text).netloc
    text = text.split("/", 1)[0]
    return DOCKER_HUB if text in DOCKER_HUB_ALIASES else text


def _host_name(host: str) -> str:
    """Return the host without its port (`[::1]:5000` gives `[::1]`)."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback(host: str) -> bool:
    name = _host_name(host)
    return name in LOOPBACK_HOSTS or name.startswith("127.")


@dataclass(frozen=True)
class RegistryConfig:
    """Credentials and transport choices for the registries a worker talks to.

    Attributes:
        credentials: Registry host (`host[:port]`, as in image references) to its credential.
        insecure: Hosts spoken to over plain HTTP (loopback hosts always are).
        timeout: Seconds one HTTP request may take.
    """

    credentials: Mapping[str, RegistryCredential] = field(default_factory=dict)
    insecure: frozenset[str] = frozenset()
    timeout: float = REQUEST_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        # Normalized once, so `docker.io` and `index.docker.io` find the same credential.
        object.__setattr__(self, "credentials", {normalize_host(h): c for h, c in self.credentials.items()})
        object.__setattr__(self, "insecure", frozenset(normalize_host(h) for h in self.insecure))

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistryConfig:
        """Read `registry_credentials` and `insecure_registries` from the settings.

        Raises:
            ValueError: A registry's credential lacks a username or a password.
        """
        credentials = {}
        for host, value in settings.registry_credentials.items():
            username, password = value.get("username"), value.get("password")
            if not username or not password:
                raise ValueError(f"{ENV_CREDENTIALS}: '{host}' needs a username and a password")
            credentials[str(host)] = RegistryCredential(username, password)
        return cls(credentials=credentials, insecure=frozenset(settings.insecure_registries))

    def credential_for(self, host: str) -> RegistryCredential | None:
        """Return the credential configured for a registry host, if any."""
        return self.credentials.get(normalize_host(host))

    def scheme_for(self, host: str) -> str:
        """Return `http` for insecure and loopback hosts, else `https`."""
        key = normalize_host(host)
        return "http" if key in self.insecure or _is_loopback(key) else "https"


# --- References -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageReference:
    """A parsed image reference, with Docker Hub's defaults applied.

    Attributes:
        registry: `host[:port]`; `docker.io` for Docker Hub.
        repository: Path in the registry (`library/nginx` for Hub's official images).
        tag: The tag, `latest` when neither tag nor digest was given; None with a digest only.
        digest: The digest when the reference pins one.
    """

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        """Return the host that serves the v2 API (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def manifest_ref(self) -> str:
        """Return what the manifest endpoint is asked for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image_reference(ref: str) -> ImageReference:
    """Parse `[host[:port]/]repo[:tag][@digest]` the way Docker does.

    The first path component is a registry host when it contains `.` or `:` or is `localhost`; otherwise
    the image is on Docker Hub, where one-component names live under `library/`.

    Raises:
        InvalidArtifactReferenceError: The reference is not valid.
    """
    text = ref.strip()
    name, _, digest = text.partition("@")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, name
    tag: str | None = None
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        path, tag = path[:colon], path[colon + 1 :]
    registry = normalize_host(registry)
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _REPOSITORY.match(path):
        raise InvalidArtifactReferenceError(f"Invalid image reference '{ref}': bad repository name '{path}'")
    if tag is not None and not _TAG.match(tag):
        raise InvalidArtifactReferenceError(f"Invalid image reference '{ref}': bad tag '{tag}'")
    if digest and not _DIGEST.match(digest):
        raise InvalidArtifactReferenceError(f"Invalid image reference '{ref}': bad digest '{digest}'")
    if tag is None and not digest:
        tag = "latest"
    return ImageReference(registry=registry, repository=path, tag=tag, digest=digest or None)


def pin_image(ref: str, digest: str) -> str:
    """Return the reference that always names the same image: `host/repo@sha256:...`.

    The tag is dropped: container runtimes pull by digest when one is present, and keeping a tag that may
    move would only mislead whoever reads the pod spec.

    Raises:
        InvalidArtifactReferenceError: `ref` or `digest` is not valid.
    """
    parsed = parse_image_reference(ref)
    if not _DIGEST.match(digest):
        raise InvalidArtifactReferenceError(f"Invalid digest '{digest}' for image '{ref}'")
    return f"{parsed.registry}/{parsed.repository}@{digest}"


@dataclass(frozen=True)
class ResolvedImage:
    """An image reference and the manifest digest its registry serves for it.

    Attributes:
        reference: The reference as given.
        registry: `host[:port]` of the registry.
        repository: Repository path.
        tag: The tag resolved (None when the reference was a digest).
        digest: Digest of the manifest (or image index) served.
        mediaType: Media type of that manifest.
    """

    reference: str
    registry: str
    repository: str
    tag: str | None
    digest: str
    mediaType: str | None

    @property
    def pinned(self) -> str:
        """Return `host/repo@digest`, what instances run."""
        return f"{self.registry}/{self.repository}@{self.digest}"


@dataclass(frozen=True)
class ResolvedChart:
    """A chart reference and the exact archive (or OCI manifest) it names now.

    Attributes:
        reference: The reference as given.
        name: The chart's name (from its Chart.yaml).
        version: The chart's version.
        digest: `sha256:<hex>` of the archive, or of the OCI manifest for `oci://` charts.
        url: Where the archive is: an http(s) URL, or the `oci://host/repo` of the chart.
    """

    reference: str
    name: str
    version: str
    digest: str
    url: str

    @property
    def pinned(self) -> str:
        """Return the reference that names exactly this chart; `fetch_chart` downloads and verifies it.

        `oci://host/repo@sha256:...` for OCI charts, `<url>#sha256=<hex>` (pip's form) for archives.
        """
        if self.url.startswith("oci://"):
            return f"{self.url}@{self.digest}"
        return f"{self.url}#{self.digest.replace(':', '=', 1)}"


def _semver_key(version: str) -> tuple[int, int, int, int, str] | None:
    """Sort key of a semantic version (stable after its pre-releases), or None when it is not one."""
    match = _SEMVER.match(version)
    if match is None:
        return None
    major, minor, patch, pre = match.groups()
    return int(major), int(minor), int(patch), 0 if pre else 1, pre or ""


def _newest(versions: list[str]) -> str | None:
    """Return the newest stable semantic version, else the newest pre-release (what helm picks)."""
    keyed = [(key, v) for v in versions if (key := _semver_key(v)) is not None]
    stable = [item for item in keyed if item[0][3] == 1]
    pool = stable or keyed
    return max(pool)[1] if pool else None


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _chart_metadata(archive: bytes, source: str) -> tuple[str, str]:
    """Return (name, version) from the Chart.yaml at the top of a chart archive.

    Raises:
        InvalidArtifactReferenceError: The archive is not a Helm chart.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for member in tar:
                parts = member.name.strip("/").split("/")
                if len(parts) == 2 and parts[1] == "Chart.yaml" and member.isfile():
                    handle = tar.extractfile(member)
                    meta = yaml.safe_load(handle.read()) if handle is not None else None
                    if isinstance(meta, dict) and meta.get("name") and meta.get("version"):
                        return str(meta["name"]), str(meta["version"])
    except (tarfile.TarError, OSError, EOFError, yaml.YAMLError) as err:
        raise InvalidArtifactReferenceError(f"'{source}' is not a Helm chart archive: {err}") from err
    raise InvalidArtifactReferenceError(f"'{source}' is not a Helm chart archive: it has no valid Chart.yaml")


# --- HTTP with registry authentication --------------------------------------------------------------


@dataclass
class _Reply:
    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes

    def registry_error(self) -> str:
        """Return the registry's own words for a failure: its `errors` list, else the start of the body."""
        try:
            data = json.loads(self.body)
        except ValueError:
            data = None
        errors = data.get("errors") if isinstance(data, dict) else None
        if isinstance(errors, list) and errors:
            parts = []
            for error in errors:
                if not isinstance(error, dict):
                    continue
                text = f"{error.get('code', '')}: {error.get('message', '')}".strip(": ")
                detail = error.get("detail")
                if detail:
                    text += f" ({detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True)})"
                parts.append(text)
            if parts:
                return "; ".join(parts)[:ERROR_TEXT_LIMIT]
        text = self.body.decode(errors="replace").strip()
        summary = f"HTTP {self.status} {self.reason}".strip()
        return f"{summary}: {text[:ERROR_TEXT_LIMIT]}" if text else summary


@dataclass
class _Token:
    value: str
    expires: float


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split `Bearer realm="...",service="...",scope="..."` into the scheme and its parameters."""
    scheme, _, params = header.strip().partition(" ")
    found = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(params)
    }
    return scheme.lower(), found


class RegistryResolver:
    """Resolves image tags to digests and charts to archive digests, speaking the registry v2 API.

    One resolver serves a whole worker: it keeps one HTTP session and caches Bearer tokens per registry
    and scope until they expire. Use it as an async context manager, or call `close()`.

    Args:
        config: Credentials and insecure hosts; default: none, loopback registries over plain HTTP.
        session: An aiohttp session to use instead of the resolver's own (not closed by `close()`).
    """

    def __init__(
        self, config: RegistryConfig | None = None, *, session: aiohttp.ClientSession | None = None
    ) -> None:
        self._config = config if config is not None else RegistryConfig()
        self._session = session
        self._owns_session = session is None
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._basic_hosts: set[str] = set()
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> RegistryResolver:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session the resolver opened."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use: an aiohttp session must be made inside the running event loop.
        if self._session is None:
            # trust_env: behind a proxy, registries are reached through HTTPS_PROXY/NO_PROXY, as dockerd does.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._config.timeout), trust_env=True
            )
        return self._session

    # --- Public verbs -------------------------------------------------------------------------------

    async def resolve_image(self, ref: str) -> ResolvedImage:
        """Return the digest of the manifest the registry serves for `ref` now.

        Asks with HEAD for `Docker-Content-Digest`; registries that omit it on HEAD are asked with GET, and
        the digest is computed from the body. A reference that carries a digest is checked to exist.

        Raises:
            ArtifactNotFoundError: No such repository, tag or digest.
            ArtifactUnauthorizedError: The registry refused the credentials (or their absence).
            InvalidArtifactReferenceError: `ref` is not a valid image reference.
            RegistryUnavailableError: The registry answered 5xx or 429 (retryable).
        """
        image = parse_image_reference(ref)
        url = self._url(image.api_host, f"/v2/{image.repository}/manifests/{image.manifest_ref}")
        scope = f"repository:{image.repository}:pull"
        headers = {"Accept": MANIFEST_ACCEPT}
        reply = await self._request("HEAD", url, image.api_host, scope, headers, what=f"Image '{ref}'")
        digest = reply.headers.get("Docker-Content-Digest")
        media_type = reply.headers.get("Content-Type")
        if not digest:
            reply = await self._request("GET", url, image.api_host, scope, headers, what=f"Image '{ref}'")
            digest = reply.headers.get("Docker-Content-Digest") or _digest_of(reply.body)
            media_type = reply.headers.get("Content-Type")
        if image.digest and digest != image.digest:
            raise InvalidArtifactReferenceError(
                f"Image '{ref}': the registry served digest {digest} for digest {image.digest}"
            )
        return ResolvedImage(
            reference=ref,
            registry=image.registry,
            repository=image.repository,
            tag=None if image.digest else image.tag,
            digest=digest,
            mediaType=(media_type or "").split(";")[0].strip() or None,
        )

    async def resolve_chart(self, ref: str, version: str | None = None) -> ResolvedChart:
        """Check that a chart exists and return its digest.

        `ref` is one of:

        * a URL of a chart archive (`https://helm.ngc.nvidia.com/org/team/charts/name-1.0.0.tgz`, NVCF's
          `helmChart`): downloaded and hashed; `version`, when given, must match its Chart.yaml;
        * a chart in a chart repository, `<repository URL>/<chart name>`: looked up in the repository's
          `index.yaml` (`version`, or the newest stable version), then downloaded and checked against the
          index's digest;
        * `oci://host/repo/chart[:version]`: resolved through the registry v2 API (the tag, else `version`,
          else the newest semantic-version tag).

        Raises:
            ArtifactNotFoundError: No such chart, version or archive.
            ArtifactUnauthorizedError: The server refused the credentials (or their absence).
            InvalidArtifactReferenceError: The reference or the archive is not a chart.
            RegistryUnavailableError: The server answered 5xx or 429 (retryable).
        """
        if ref.startswith("oci://"):
            return await self._resolve_oci_chart(ref, version)
        parts = urlsplit(ref)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidArtifactReferenceError(
                f"Invalid chart reference '{ref}': expected an http(s) URL of a chart archive or repository, "
                f"or oci://host/repo/chart"
            )
        if parts.path.endswith(".tgz"):
            return await self._resolve_archive(ref, ref, version, expected=None)
        return await self._resolve_from_index(ref, version)

    async def fetch_chart(self, pinned: str, directory: Path) -> Path:
        """Download the chart a `ResolvedChart.pinned` reference names, verify its digest, and save it.

        Args:
            pinned: `oci://host/repo@sha256:...` or `<url>#sha256=<hex>`.
            directory: Where the archive is written.

        Returns:
            The path of the verified `.tgz`, ready for `helm install`.

        Raises:
            ArtifactNotFoundError: The chart is gone.
            InvalidArtifactReferenceError: `pinned` is not pinned, or the bytes do not match its digest.
        """
        if pinned.startswith("oci://"):
            location, _, digest = pinned.partition("@")
            if not _DIGEST.match(digest):
                raise InvalidArtifactReferenceError(f"'{pinned}' is not a pinned OCI chart reference")
            host, _, repository = location[len("oci://") :].partition("/")
            if not _REPOSITORY.match(repository):
                raise InvalidArtifactReferenceError(f"'{pinned}' is not a pinned OCI chart reference")
            manifest = await self._manifest_json(host, repository, digest, f"Chart '{pinned}'")
            layer = next(
                (d for d in manifest.get("layers", []) if d.get("mediaType") == HELM_CHART_LAYER), None
            )
            if layer is None:
                raise InvalidArtifactReferenceError(f"'{pinned}' is not a Helm chart: it has no chart layer")
            data = await self._blob(host, repository, str(layer.get("digest")), f"Chart '{pinned}'")
            name = f"{repository.rsplit('/', 1)[-1]}-{digest.split(':')[-1][:12]}.tgz"
        else:
            url, _, fragment = pinned.partition("#")
            algorithm, _, hexdigest = fragment.partition("=")
            if algorithm != "sha256" or not hexdigest:
                raise InvalidArtifactReferenceError(f"'{pinned}' is not a pinned chart reference")
            data = (await self._download(url, f"Chart '{url}'")).body
            if _digest_of(data) != f"sha256:{hexdigest}":
                raise InvalidArtifactReferenceError(
                    f"Chart '{url}' changed since it was pinned: {_digest_of(data)} is not sha256:{hexdigest}"
                )
            name = Path(urlsplit(url).path).name or "chart.tgz"
        path = directory / name
        await asyncio.to_thread(_write_file, path, data)
        return path

    async def resolve_artifacts(self, spec: FunctionVersionSpec) -> PrepareResult:
        """Resolve what a function version runs (its image, or its chart) and return the pins.

        This is what a backend's `prepare` calls, so that every backend pins the same way.
        """
        if spec.helmChart:
            chart = await self.resolve_chart(spec.helmChart)
            return PrepareResult(resolvedChart=chart.pinned)
        if spec.containerImage:
            image = await self.resolve_image(spec.containerImage)
            return PrepareResult(resolvedImage=image.pinned)
        return PrepareResult()

    # --- Charts -------------------------------------------------------------------------------------

    async def _resolve_archive(
        self, ref: str, url: str, version: str | None, expected: str | None
    ) -> ResolvedChart:
        reply = await self._download(url, f"Chart '{ref}'")
        digest = _digest_of(reply.body)
        if expected and digest != f"sha256:{expected.removeprefix('sha256:')}":
            raise InvalidArtifactReferenceError(
                f"Chart '{ref}': the archive at {url} has {digest}, but its repository index says {expected}"
            )
        name, chart_version = _chart_metadata(reply.body, url)
        if version and chart_version != version:
            raise ArtifactNotFoundError(
                f"Chart '{ref}' is version {chart_version}, not the version {version} asked for"
            )
        return ResolvedChart(reference=ref, name=name, version=chart_version, digest=digest, url=url)

    async def _resolve_from_index(self, ref: str, version: str | None) -> ResolvedChart:
        repository, _, chart = ref.rstrip("/").rpartition("/")
        index_url = f"{repository}/index.yaml"
        reply = await self._download(index_url, f"Chart repository of '{ref}'")
        try:
            index = yaml.safe_load(reply.body)
        except yaml.YAMLError as err:
            raise InvalidArtifactReferenceError(
                f"{index_url} is not a chart repository index: {err}"
            ) from err
        entries = (index.get("entries") or {}).get(chart) if isinstance(index, dict) else None
        if not entries:
            raise ArtifactNotFoundError(f"Chart '{chart}' is not in the chart repository {repository}")
        versions = {str(e.get("version")): e for e in entries if isinstance(e, dict)}
        wanted = version or _newest(list(versions))
        entry = versions.get(wanted or "")
        if entry is None or not entry.get("urls"):
            known = ", ".join(sorted(versions)) or "none"
            raise ArtifactNotFoundError(
                f"Chart '{chart}' has no version {version or '(newest)'} in {repository} (versions: {known})"
            )
        # Entry URLs may be relative to the repository.
        url = urljoin(f"{repository}/", str(entry["urls"][0]))
        return await self._resolve_archive(ref, url, wanted, expected=entry.get("digest"))

    async def _resolve_oci_chart(self, ref: str, version: str | None) -> ResolvedChart:
        location = ref[len("oci://") :]
        host, slash, path = location.partition("/")
        last_slash, colon = path.rfind("/"), path.rfind(":")
        tag = None
        if colon > last_slash:
            path, tag = path[:colon], path[colon + 1 :]
        if not slash or not _REPOSITORY.match(path):
            raise InvalidArtifactReferenceError(
                f"Invalid chart reference '{ref}': expected oci://host/repo/chart"
            )
        what = f"Chart '{ref}'"
        if tag is None and version:
            # Helm stores versions as tags, with `+` (not allowed in tags) written as `_`.
            tag = version.replace("+", "_")
        if tag is None:
            tags = await self._tags(host, path, what)
            tag = _newest([t.replace("_", "+") for t in tags])
            if tag is None:
                raise ArtifactNotFoundError(f"{what} has no version tags")
            tag = tag.replace("+", "_")
        what = f"Chart 'oci://{host}/{path}:{tag}'"
        url = self._url(host, f"/v2/{path}/manifests/{tag}")
        scope = f"repository:{path}:pull"
        reply = await self._request("GET", url, host, scope, {"Accept": OCI_MANIFEST}, what=what)
        digest = reply.headers.get("Docker-Content-Digest") or _digest_of(reply.body)
        manifest = self._json(reply, what)
        config = manifest.get("config") or {}
        if config.get("mediaType") != HELM_CONFIG:
            raise InvalidArtifactReferenceError(
                f"{what} is not a Helm chart (config {config.get('mediaType')})"
            )
        try:
            meta = json.loads(await self._blob(host, path, str(config.get("digest")), what))
        except ValueError as err:
            raise InvalidArtifactReferenceError(f"{what} has an unreadable chart config: {err}") from err
        if not isinstance(meta, dict):
            raise InvalidArtifactReferenceError(f"{what} has an unreadable chart config")
        return ResolvedChart(
            reference=ref,
            name=str(meta.get("name", path.rsplit("/", 1)[-1])),
            version=str(meta.get("version", tag.replace("_", "+"))),
            digest=digest,
            url=f"oci://{host}/{path}",
        )

    # --- Registry API pieces ------------------------------------------------------------------------

    async def _manifest_json(self, host: str, repository: str, reference: str, what: str) -> dict[str, Any]:
        url = self._url(host, f"/v2/{repository}/manifests/{reference}")
        reply = await self._request(
            "GET", url, host, f"repository:{repository}:pull", {"Accept": MANIFEST_ACCEPT}, what=what
        )
        if reference.startswith("sha256:") and _digest_of(reply.body) != reference:
            raise InvalidArtifactReferenceError(
                f"{what}: the registry served a manifest that is not {reference}"
            )
        return self._json(reply, what)

    async def _blob(self, host: str, repository: str, digest: str, what: str) -> bytes:
        url = self._url(host, f"/v2/{repository}/blobs/{digest}")
        reply = await self._request("GET", url, host, f"repository:{repository}:pull", {}, what=what)
        if digest.startswith("sha256:") and _digest_of(reply.body) != digest:
            raise InvalidArtifactReferenceError(f"{what}: blob {digest} does not match its digest")
        return reply.body

    async def _tags(self, host: str, repository: str, what: str) -> list[str]:
        url = self._url(host, f"/v2/{repository}/tags/list?n=1000")
        reply = await self._request("GET", url, host, f"repository:{repository}:pull", {}, what=what)
        tags = self._json(reply, what).get("tags") or []
        return [str(t) for t in tags]

    async def _download(self, url: str, what: str) -> _Reply:
        host = urlsplit(url).netloc
        return await self._request("GET", url, host, "", {}, what=what)

    def _url(self, host: str, path: str) -> str:
        return f"{self._config.scheme_for(host)}://{host}{path}"

    @staticmethod
    def _json(reply: _Reply, what: str) -> dict[str, Any]:
        try:
            data = json.loads(reply.body)
        except ValueError as err:
            raise InvalidArtifactReferenceError(f"{what}: the registry answered with invalid JSON") from err
        if not isinstance(data, dict):
            raise InvalidArtifactReferenceError(f"{what}: the registry answered with unexpected JSON")
        return data

    async def _request(
        self, method: str, url: str, host: str, scope: str, headers: dict[str, str], *, what: str
    ) -> _Reply:
        """Send a request, answering an authentication challenge once; classify the final answer.

        Raises:
            ArtifactNotFoundError: 404 (or 410).
            ArtifactUnauthorizedError: 401/403 after authenticating (or with nothing to authenticate with).
            InvalidArtifactReferenceError: Another 4xx.
            RegistryUnavailableError: 5xx or 429.
        """
        reply = await self._send(method, url, {**headers, **self._cached_auth(host, scope)})
        if reply.status == 401:
            # A cached token that is refused (revoked, or too narrow a scope) must not be offered again.
            self._tokens.pop((normalize_host(host), scope), None)
            challenge = reply.headers.get("WWW-Authenticate", "")
            auth = await self._answer_challenge(host, scope, challenge, what)
            reply = await self._send(method, url, {**headers, **auth})
        if method == "HEAD" and reply.status >= 400:
            # HEAD answers carry no body, and the registry's error text is in the body.
            reply = await self._send("GET", url, {**headers, **self._cached_auth(host, scope)})
        if reply.status < 400:
            return reply
        text = reply.registry_error()
        if reply.status in (404, 410):
            raise ArtifactNotFoundError(f"{what} not found: {text}")
        if reply.status in (401, 403):
            raise ArtifactUnauthorizedError(f"{what}: access denied by {host}: {text}")
        if reply.status == 429 or reply.status >= 500 or reply.status == 408:
            raise RegistryUnavailableError(f"{what}: {host} is unavailable: {text}")
        raise InvalidArtifactReferenceError(f"{what}: refused by {host}: {text}")

    async def _send(
        self, method: str, url: str, headers: dict[str, str], params: Mapping[str, str] | None = None
    ) -> _Reply:
        async with self._http().request(method, url, headers=headers, params=params) as response:
            body = b""
            if method != "HEAD":
                if (response.content_length or 0) > MAX_ARTIFACT_BYTES:
                    raise InvalidArtifactReferenceError(f"{url} is larger than {MAX_ARTIFACT_BYTES} bytes")
                body = await response.content.read(MAX_ARTIFACT_BYTES + 1)
                if len(body) > MAX_ARTIFACT_BYTES:
                    raise InvalidArtifactReferenceError(f"{url} is larger than {MAX_ARTIFACT_BYTES} bytes")
            # Header names are case-insensitive, and registries behind some proxies send them in lower case.
            return _Reply(response.status, response.reason or "", CIMultiDict(response.headers), body)

    def _basic(self, host: str) -> dict[str, str]:
        credential = self._config.credential_for(host)
        if credential is None:
            return {}
        token = base64.b64encode(f"{credential.username}:{credential.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def _cached_auth(self, host: str, scope: str) -> dict[str, str]:
        """Return the Authorization header that worked for this host and scope before, if any."""
        key = normalize_host(host)
        token = self._tokens.get((key, scope))
        if token is not None and token.expires > time.monotonic():
            return {"Authorization": f"Bearer {token.value}"}
        if key in self._basic_hosts:
            return self._basic(host)
        return {}

    async def _answer_challenge(self, host: str, scope: str, challenge: str, what: str) -> dict[str, str]:
        scheme, params = _parse_challenge(challenge)
        if scheme == "bearer" and params.get("realm"):
            return {"Authorization": f"Bearer {await self._token(host, scope, params, what)}"}
        basic = self._basic(host)
        if scheme == "basic" and basic:
            self._basic_hosts.add(normalize_host(host))
            return basic
        raise ArtifactUnauthorizedError(
            f"{what}: {host} requires authentication ({challenge or 'no challenge'}) and no credentials are "
            f"configured for it ({ENV_CREDENTIALS})"
        )

    async def _token(self, host: str, scope: str, params: Mapping[str, str], what: str) -> str:
        """Exchange the configured credentials (or none: anonymous pull) for a Bearer token for `scope`."""
        query = {
            k: v
            for k, v in (("service", params.get("service")), ("scope", params.get("scope") or scope))
            if v
        }
        async with self._lock:
            key = (normalize_host(host), scope)
            cached = self._tokens.get(key)
            if cached is not None and cached.expires > time.monotonic():
                return cached.value
            reply = await self._send("GET", params["realm"], self._basic(host), query)
            if reply.status in (401, 403):
                raise ArtifactUnauthorizedError(
                    f"{what}: the token service of {host} refused the credentials: {reply.registry_error()}"
                )
            if reply.status == 429 or reply.status >= 500:
                raise RegistryUnavailableError(
                    f"{what}: the token service of {host} is unavailable: {reply.registry_error()}"
                )
            if reply.status >= 400:
                raise ArtifactUnauthorizedError(
                    f"{what}: the token service of {host} answered {reply.registry_error()}"
                )
            data = self._json(reply, what)
            value = data.get("token") or data.get("access_token")
            if not isinstance(value, str) or not value:
                raise ArtifactUnauthorizedError(f"{what}: the token service of {host} returned no token")
            lifetime = data.get("expires_in")
            seconds = float(lifetime) if isinstance(lifetime, int | float) else DEFAULT_TOKEN_LIFETIME_SECONDS
            self._tokens[key] = _Token(
                value, time.monotonic() + max(0.0, seconds - TOKEN_EXPIRY_MARGIN_SECONDS)
            )
            return value


class PinningBackend:
    """A `Backend` that pins the version's image or chart in its registry when it prepares a deployment.

    The wrapped backend's own checks run first (they are cheaper and need no network); then the resolver
    pins the artifact, and the pins travel to `ensure_instances` in `request.prepared`, so every instance
    runs the same digest. Every other verb is the wrapped backend's.

    Args:
        backend: The backend that runs the instances.
        resolver: The worker's resolver.
    """

    def __init__(self, backend: Backend, resolver: RegistryResolver) -> None:
        self._backend = backend
        self._resolver = resolver

    async def prepare(self, request: PrepareInput) -> PrepareResult:
        """Run the backend's checks, then resolve the artifact; a missing one fails non-retryably."""
        checked = await self._backend.prepare(request)
        pinned = await self._resolver.resolve_artifacts(request.spec)
        return PrepareResult(
            resolvedImage=pinned.resolvedImage or checked.resolvedImage,
            resolvedChart=pinned.resolvedChart or checked.resolvedChart,
        )

    async def ensure_instances(self, request: EnsureInstancesInput) -> list[InstanceRecord]:
        """Delegate to the wrapped backend."""
        return await self._backend.ensure_instances(request)

    async def observe(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> list[InstanceRecord]:
        """Delegate to the wrapped backend."""
        return await self._backend.observe(ref, specs)

    async def wait_for_change(self, ref: VersionRef, max_wait: float) -> None:
        """Delegate to the wrapped backend."""
        await self._backend.wait_for_change(ref, max_wait)

    async def teardown(self, ref: VersionRef, specs: list[DeploymentSpecification]) -> None:
        """Delegate to the wrapped backend."""
        await self._backend.teardown(ref, specs)
