"""Image tags resolve to the digest a real registry serves; missing images fail at once, with its words."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from activities.registry import (
    ArtifactNotFoundError,
    InvalidArtifactReferenceError,
    RegistryResolver,
    RegistryUnavailableError,
)
from tests.registry.conftest import REPOSITORY, push
from tests.registry.servers import RegistryServer, StaticServer, free_port, skopeo_digest


async def test_tag_resolves_to_the_digest_skopeo_sees(
    open_registry: RegistryServer, image_layouts: dict[str, tuple[Path, str]], resolver: RegistryResolver
) -> None:
    reference = push(open_registry, image_layouts["first"], "v1")

    resolved = await resolver.resolve_image(reference)

    assert resolved.digest == skopeo_digest(reference) == image_layouts["first"][1]
    assert resolved.tag == "v1"
    assert resolved.mediaType == "application/vnd.oci.image.manifest.v1+json"
    assert resolved.pinned == f"{open_registry.host}/{REPOSITORY}@{resolved.digest}"


async def test_unknown_tag_fails_with_the_registry_message(
    open_registry: RegistryServer, image_layouts: dict[str, tuple[Path, str]], resolver: RegistryResolver
) -> None:
    push(open_registry, image_layouts["first"], "v1")
    reference = f"{open_registry.host}/{REPOSITORY}:v9"

    with pytest.raises(ArtifactNotFoundError) as caught:
        await resolver.resolve_image(reference)

    error = caught.value
    assert error.non_retryable and error.type == "ArtifactNotFound"
    assert reference in error.message
    # The registry's own error text, from the body of its 404 (HEAD answers have none).
    assert "MANIFEST_UNKNOWN: manifest unknown" in error.message
    assert '"Tag": "v9"' in error.message


async def test_unknown_repository_fails(open_registry: RegistryServer, resolver: RegistryResolver) -> None:
    reference = f"{open_registry.host}/nobody/nothing:v1"

    with pytest.raises(ArtifactNotFoundError) as caught:
        await resolver.resolve_image(reference)

    assert reference in caught.value.message
    assert "unknown" in caught.value.message


async def test_pinned_digest_survives_a_retag(
    open_registry: RegistryServer, image_layouts: dict[str, tuple[Path, str]], resolver: RegistryResolver
) -> None:
    reference = push(open_registry, image_layouts["first"], "moving")
    pinned = (await resolver.resolve_image(reference)).pinned

    # The tag now names a different image.
    push(open_registry, image_layouts["second"], "moving")

    assert (await resolver.resolve_image(reference)).digest == image_layouts["second"][1]
    still = await resolver.resolve_image(pinned)
    assert still.digest == image_layouts["first"][1]
    assert still.pinned == pinned


async def test_unknown_digest_fails(open_registry: RegistryServer, resolver: RegistryResolver) -> None:
    reference = f"{open_registry.host}/{REPOSITORY}@sha256:{'0' * 64}"

    with pytest.raises(ArtifactNotFoundError, match="manifest unknown"):
        await resolver.resolve_image(reference)


async def test_invalid_reference_fails_before_any_request(resolver: RegistryResolver) -> None:
    with pytest.raises(InvalidArtifactReferenceError):
        await resolver.resolve_image("127.0.0.1:1/Bad_Repo:v1")


@pytest.mark.parametrize("status", [503, 429])
async def test_server_errors_and_throttling_are_retryable(status: int, resolver: RegistryResolver) -> None:
    server = await StaticServer({}).start()
    server.status_override = status
    try:
        with pytest.raises(RegistryUnavailableError) as caught:
            await resolver.resolve_image(f"127.0.0.1:{server.port}/team/echo:v1")
    finally:
        await server.stop()
    assert not caught.value.non_retryable
    assert "try again later" in caught.value.message


async def test_connection_errors_propagate_as_retryable(resolver: RegistryResolver) -> None:
    with pytest.raises(aiohttp.ClientConnectionError):
        await resolver.resolve_image(f"127.0.0.1:{free_port()}/team/echo:v1")
