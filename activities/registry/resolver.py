"""The registry v2 API client: resolves image tags to digests and charts to archive digests, with the
registries' Basic and Bearer authentication, and downloads pinned charts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import yaml
from multidict import CIMultiDict

from activities.registry.artifacts import (
    DIGEST_PATTERN,
    ENV_CREDENTIALS,
    ERROR_TEXT_LIMIT,
    REPOSITORY_PATTERN,
    ArtifactNotFoundError,
    ArtifactUnauthorizedError,
    InvalidArtifactReferenceError,
    RegistryConfig,
    RegistryUnavailableError,
    ResolvedChart,
    ResolvedImage,
    chart_metadata,
    digest_of,
    newest_version,
    normalize_host,
    parse_image_reference,
    write_file,
)
from workflows.models import (
    FunctionVersionSpec,
    PrepareResult,
)

# --- HTTP with registry authentication --------------------------------------------------------------


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
"""Lists first: a multi-platform image is pinned by its index, and each node picks its platform."""
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_CHART_LAYER = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
"""Manifests, chart archives and index files are read into memory; nothing legitimate comes near this."""
TOKEN_EXPIRY_MARGIN_SECONDS = 10.0
DEFAULT_TOKEN_LIFETIME_SECONDS = 60.0
"""What the distribution token spec says to assume when a token response has no `expires_in`."""
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


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
            digest = reply.headers.get("Docker-Content-Digest") or digest_of(reply.body)
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
            if not DIGEST_PATTERN.match(digest):
                raise InvalidArtifactReferenceError(f"'{pinned}' is not a pinned OCI chart reference")
            host, _, repository = location[len("oci://") :].partition("/")
            if not REPOSITORY_PATTERN.match(repository):
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
            if digest_of(data) != f"sha256:{hexdigest}":
                raise InvalidArtifactReferenceError(
                    f"Chart '{url}' changed since it was pinned: {digest_of(data)} is not sha256:{hexdigest}"
                )
            name = Path(urlsplit(url).path).name or "chart.tgz"
        path = directory / name
        await asyncio.to_thread(write_file, path, data)
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
        digest = digest_of(reply.body)
        if expected and digest != f"sha256:{expected.removeprefix('sha256:')}":
            raise InvalidArtifactReferenceError(
                f"Chart '{ref}': the archive at {url} has {digest}, but its repository index says {expected}"
            )
        name, chart_version = chart_metadata(reply.body, url)
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
        wanted = version or newest_version(list(versions))
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
        if not slash or not REPOSITORY_PATTERN.match(path):
            raise InvalidArtifactReferenceError(
                f"Invalid chart reference '{ref}': expected oci://host/repo/chart"
            )
        what = f"Chart '{ref}'"
        if tag is None and version:
            # Helm stores versions as tags, with `+` (not allowed in tags) written as `_`.
            tag = version.replace("+", "_")
        if tag is None:
            tags = await self._tags(host, path, what)
            tag = newest_version([t.replace("_", "+") for t in tags])
            if tag is None:
                raise ArtifactNotFoundError(f"{what} has no version tags")
            tag = tag.replace("+", "_")
        what = f"Chart 'oci://{host}/{path}:{tag}'"
        url = self._url(host, f"/v2/{path}/manifests/{tag}")
        scope = f"repository:{path}:pull"
        reply = await self._request("GET", url, host, scope, {"Accept": OCI_MANIFEST}, what=what)
        digest = reply.headers.get("Docker-Content-Digest") or digest_of(reply.body)
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
        if reference.startswith("sha256:") and digest_of(reply.body) != reference:
            raise InvalidArtifactReferenceError(
                f"{what}: the registry served a manifest that is not {reference}"
            )
        return self._json(reply, what)

    async def _blob(self, host: str, repository: str, digest: str, what: str) -> bytes:
        url = self._url(host, f"/v2/{repository}/blobs/{digest}")
        reply = await self._request("GET", url, host, f"repository:{repository}:pull", {}, what=what)
        if digest.startswith("sha256:") and digest_of(reply.body) != digest:
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
