"""Charts resolve to the digest of their archive (URL, repository) or OCI manifest; fetches are verified."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from activities.registry import (
    ArtifactNotFoundError,
    ArtifactUnauthorizedError,
    InvalidArtifactReferenceError,
    RegistryResolver,
)
from tests.registry.conftest import PASSWORD, USER, push, resolver_for
from tests.registry.servers import RegistryServer, StaticServer, chart_archive, chart_index, helm_push

ECHO_1 = chart_archive("echo", "1.0.0")
ECHO_2 = chart_archive("echo", "1.1.0")
ECHO_RC = chart_archive("echo", "2.0.0-rc.1")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
async def charts() -> AsyncIterator[StaticServer]:
    """A static chart repository: archives under /charts/ and their index.yaml."""
    archives = {"echo-1.0.0.tgz": ECHO_1, "echo-1.1.0.tgz": ECHO_2, "echo-2.0.0-rc.1.tgz": ECHO_RC}
    server = StaticServer({f"/charts/{name}": data for name, data in archives.items()})
    server.files["/charts/index.yaml"] = chart_index(server.url, archives).encode()
    server.files["/charts/broken-1.0.0.tgz"] = b"not a tarball"
    await server.start()
    yield server
    await server.stop()


async def test_archive_url_resolves_to_its_sha256(charts: StaticServer, resolver: RegistryResolver) -> None:
    url = f"{charts.url}/charts/echo-1.0.0.tgz"

    chart = await resolver.resolve_chart(url)

    assert (chart.name, chart.version, chart.digest, chart.url) == ("echo", "1.0.0", sha256(ECHO_1), url)
    assert chart.pinned == f"{url}#sha256={hashlib.sha256(ECHO_1).hexdigest()}"


async def test_missing_archive_fails(charts: StaticServer, resolver: RegistryResolver) -> None:
    url = f"{charts.url}/charts/echo-9.9.9.tgz"

    with pytest.raises(ArtifactNotFoundError) as caught:
        await resolver.resolve_chart(url)

    assert caught.value.non_retryable
    assert url in caught.value.message and "HTTP 404" in caught.value.message


async def test_archive_version_must_match(charts: StaticServer, resolver: RegistryResolver) -> None:
    with pytest.raises(ArtifactNotFoundError, match=r"is version 1\.0\.0, not the version 2\.0\.0"):
        await resolver.resolve_chart(f"{charts.url}/charts/echo-1.0.0.tgz", "2.0.0")


async def test_an_archive_that_is_no_chart_is_rejected(
    charts: StaticServer, resolver: RegistryResolver
) -> None:
    with pytest.raises(InvalidArtifactReferenceError, match="not a Helm chart archive"):
        await resolver.resolve_chart(f"{charts.url}/charts/broken-1.0.0.tgz")


async def test_repository_chart_resolves_through_the_index(
    charts: StaticServer, resolver: RegistryResolver
) -> None:
    exact = await resolver.resolve_chart(f"{charts.url}/charts/echo", "1.0.0")
    newest = await resolver.resolve_chart(f"{charts.url}/charts/echo")

    assert (exact.version, exact.digest, exact.url) == (
        "1.0.0",
        sha256(ECHO_1),
        f"{charts.url}/charts/echo-1.0.0.tgz",
    )
    # Like helm: the newest stable version, not the release candidate.
    assert (newest.version, newest.digest) == ("1.1.0", sha256(ECHO_2))


async def test_repository_unknown_version_or_chart_fails(
    charts: StaticServer, resolver: RegistryResolver
) -> None:
    with pytest.raises(ArtifactNotFoundError, match=r"no version 3.0.0 .*versions: 1.0.0, 1.1.0, 2.0.0-rc.1"):
        await resolver.resolve_chart(f"{charts.url}/charts/echo", "3.0.0")
    with pytest.raises(ArtifactNotFoundError, match="'nothing' is not in the chart repository"):
        await resolver.resolve_chart(f"{charts.url}/charts/nothing")


async def test_fetch_verifies_the_pinned_digest(
    charts: StaticServer, resolver: RegistryResolver, tmp_path: Path
) -> None:
    url = f"{charts.url}/charts/echo-1.1.0.tgz"
    pinned = (await resolver.resolve_chart(url)).pinned

    path = await resolver.fetch_chart(pinned, tmp_path)
    assert path.read_bytes() == ECHO_2

    # Republished under the same URL: the pin no longer matches, and nothing is written.
    charts.files["/charts/echo-1.1.0.tgz"] = chart_archive("echo", "1.1.0") + b"\0"
    try:
        with pytest.raises(InvalidArtifactReferenceError, match="changed since it was pinned"):
            await resolver.fetch_chart(pinned, tmp_path / "again")
    finally:
        charts.files["/charts/echo-1.1.0.tgz"] = ECHO_2
    assert not (tmp_path / "again").exists()


async def test_archive_behind_basic_auth() -> None:
    server = await StaticServer({"/echo-1.0.0.tgz": ECHO_1}, basic_auth=(USER, PASSWORD)).start()
    url = f"{server.url}/echo-1.0.0.tgz"
    try:
        async with resolver_for(f"127.0.0.1:{server.port}") as resolver:
            assert (await resolver.resolve_chart(url)).digest == sha256(ECHO_1)
        async with RegistryResolver() as anonymous:
            with pytest.raises(ArtifactUnauthorizedError, match="no credentials are configured"):
                await anonymous.resolve_chart(url)
    finally:
        await server.stop()


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The helm binary tests/cluster/build.sh caches, with private helm homes; skip when it is not built."""
    from tests.cluster.harness import cache_dir, helm_environment

    binary = cache_dir() / "bin" / "helm"
    if not os.access(binary, os.X_OK):
        pytest.skip(f"no helm at {binary}: run bash tests/cluster/build.sh")
    return binary, helm_environment(tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="module")
def oci_chart(
    open_registry: RegistryServer, helm: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> str:
    """`echo` 1.0.0 and 1.1.0 pushed with `helm push` to charts/echo; returns the digest of 1.0.0."""
    directory = tmp_path_factory.mktemp("oci-charts")
    digests = []
    for name, data in (("echo-1.0.0.tgz", ECHO_1), ("echo-1.1.0.tgz", ECHO_2)):
        (directory / name).write_bytes(data)
        digests.append(helm_push(helm[0], directory / name, f"{open_registry.host}/charts", helm[1]))
    return digests[0]


async def test_oci_chart_resolves_and_fetches(
    open_registry: RegistryServer, oci_chart: str, resolver: RegistryResolver, tmp_path: Path
) -> None:
    reference = f"oci://{open_registry.host}/charts/echo"

    exact = await resolver.resolve_chart(reference, "1.0.0")
    tagged = await resolver.resolve_chart(f"{reference}:1.0.0")
    newest = await resolver.resolve_chart(reference)

    assert exact.digest == tagged.digest == oci_chart
    assert (exact.name, exact.version) == ("echo", "1.0.0")
    assert newest.version == "1.1.0"
    assert exact.pinned == f"{reference}@{oci_chart}"
    assert (await resolver.fetch_chart(exact.pinned, tmp_path)).read_bytes() == ECHO_1


async def test_oci_chart_unknown_version_fails(
    open_registry: RegistryServer, oci_chart: str, resolver: RegistryResolver
) -> None:
    with pytest.raises(ArtifactNotFoundError) as caught:
        await resolver.resolve_chart(f"oci://{open_registry.host}/charts/echo", "9.0.0")
    assert "charts/echo:9.0.0" in caught.value.message and "manifest unknown" in caught.value.message


async def test_an_image_is_not_an_oci_chart(
    open_registry: RegistryServer, image_layouts: dict[str, tuple[Path, str]], resolver: RegistryResolver
) -> None:
    await asyncio.to_thread(push, open_registry, image_layouts["first"], "v1")
    with pytest.raises(InvalidArtifactReferenceError, match="is not a Helm chart"):
        await resolver.resolve_chart(f"oci://{open_registry.host}/team/echo:v1")
