"""Fixtures of the resolver tests: real registries on loopback (open, Basic auth, Bearer tokens) with a
small image pushed by skopeo, and a resolver configured for them."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from activities.registry import RegistryConfig, RegistryCredential, RegistryResolver
from tests.cluster.fixtures import real_cluster
from tests.registry.servers import (
    RegistryServer,
    TokenService,
    oci_image_layout,
    skopeo_copy,
    tools_missing,
)

__all__ = ["real_cluster"]

SETUP_SCRIPT = Path(__file__).resolve().parent / "setup.sh"
USER, PASSWORD = "gpufn", "s3cret-pull"
REPOSITORY = "team/echo"


@pytest.fixture(scope="session")
def registry_tools() -> None:
    """Install docker-registry, skopeo and htpasswd through setup.sh when missing; skip if that fails."""
    if tools_missing():
        subprocess.run(["bash", str(SETUP_SCRIPT)], check=False)
    missing = tools_missing()
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run bash tests/registry/setup.sh as root")


@pytest.fixture(scope="module")
def image_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Two different images (`v1` and `v2` content), as OCI layouts: name -> (layout, digest)."""
    root = tmp_path_factory.mktemp("layouts")
    return {
        name: (root / name, oci_image_layout(root / name, f"image {name}\n".encode(), "v1"))
        for name in ("first", "second")
    }


@pytest.fixture(scope="module")
def open_registry(registry_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry that needs no credentials."""
    with RegistryServer(tmp_path_factory.mktemp("registry-open")) as server:
        yield server


@pytest.fixture(scope="module")
def basic_registry(
    registry_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    """A registry behind htpasswd Basic auth, holding the `first` image as team/echo:v1."""
    with RegistryServer(
        tmp_path_factory.mktemp("registry-basic"), auth="htpasswd", users={USER: PASSWORD}
    ) as server:
        yield server


@pytest.fixture(scope="module")
async def token_registry(
    registry_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[RegistryServer, TokenService]]:
    """A registry behind Bearer token auth, and its token service."""
    workdir = tmp_path_factory.mktemp("registry-token")
    tokens = TokenService(workdir, {USER: PASSWORD})
    await tokens.start()
    try:
        with RegistryServer(workdir, auth="token", token_service=tokens) as server:
            yield server, tokens
    finally:
        await tokens.stop()


def push(
    server: RegistryServer, layout: tuple[Path, str], tag: str, creds: tuple[str, str] | None = None
) -> str:
    """Push an OCI layout's `v1` image as `team/echo:<tag>`; return the reference."""
    reference = f"{server.host}/{REPOSITORY}:{tag}"
    skopeo_copy(layout[0], "v1", reference, creds)
    return reference


@pytest.fixture
async def resolver() -> AsyncIterator[RegistryResolver]:
    """A resolver with no credentials (loopback registries are spoken to over HTTP)."""
    async with RegistryResolver(RegistryConfig()) as resolver:
        yield resolver


def resolver_for(host: str, username: str = USER, password: str = PASSWORD) -> RegistryResolver:
    """A resolver with credentials for one host."""
    return RegistryResolver(RegistryConfig(credentials={host: RegistryCredential(username, password)}))
