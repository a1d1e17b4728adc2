"""What the registry code works with: its errors, its configuration (credentials, insecure hosts), image
references and what resolving an image or a chart yields.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from temporalio.exceptions import ApplicationError

from gpufn.settings import Settings

ENV_CREDENTIALS = "GPUFN_REGISTRY_CREDENTIALS"
ENV_INSECURE = "GPUFN_INSECURE_REGISTRIES"

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
LOOPBACK_HOSTS = frozenset({"localhost", "::1", "[::1]"})

REQUEST_TIMEOUT_SECONDS = 30.0
ERROR_TEXT_LIMIT = 500

# The grammar of docker/distribution's `reference` package, minus the host part (split off first).
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_PATTERN = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST_PATTERN = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


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
    if not REPOSITORY_PATTERN.match(path):
        raise InvalidArtifactReferenceError(f"Invalid image reference '{ref}': bad repository name '{path}'")
    if tag is not None and not _TAG.match(tag):
        raise InvalidArtifactReferenceError(f"Invalid image reference '{ref}': bad tag '{tag}'")
    if digest and not DIGEST_PATTERN.match(digest):
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
    if not DIGEST_PATTERN.match(digest):
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


def newest_version(versions: list[str]) -> str | None:
    """Return the newest stable semantic version, else the newest pre-release (what helm picks)."""
    keyed = [(key, v) for v in versions if (key := _semver_key(v)) is not None]
    stable = [item for item in keyed if item[0][3] == 1]
    pool = stable or keyed
    return max(pool)[1] if pool else None


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path`, making its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def digest_of(data: bytes) -> str:
    """Return the sha256 digest of `data`, as registries write it."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chart_metadata(archive: bytes, source: str) -> tuple[str, str]:
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
