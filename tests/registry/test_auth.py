"""Registries that want credentials: Basic (htpasswd) and the Bearer token challenge flow."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from activities.registry import ArtifactNotFoundError, ArtifactUnauthorizedError, RegistryResolver
from tests.registry.conftest import PASSWORD, REPOSITORY, USER, push, resolver_for
from tests.registry.servers import SERVICE, RegistryServer, TokenService, skopeo_digest


@pytest.fixture(scope="module")
def basic_image(basic_registry: RegistryServer, image_layouts: dict[str, tuple[Path, str]]) -> str:
    return push(basic_registry, image_layouts["first"], "v1", (USER, PASSWORD))


@pytest.fixture(scope="module")
async def token_image(
    token_registry: tuple[RegistryServer, TokenService], image_layouts: dict[str, tuple[Path, str]]
) -> str:
    # In a thread: skopeo asks the token service, which answers on this event loop.
    return await asyncio.to_thread(push, token_registry[0], image_layouts["first"], "v1", (USER, PASSWORD))


async def test_basic_auth_with_credentials(basic_registry: RegistryServer, basic_image: str) -> None:
    async with resolver_for(basic_registry.host) as resolver:
        resolved = await resolver.resolve_image(basic_image)
        # A second call reuses the Basic credentials at once (no extra challenge round trip needed).
        again = await resolver.resolve_image(basic_image)
    assert resolved.digest == again.digest == skopeo_digest(basic_image, (USER, PASSWORD))


async def test_basic_auth_without_credentials(basic_image: str, resolver: RegistryResolver) -> None:
    with pytest.raises(ArtifactUnauthorizedError) as caught:
        await resolver.resolve_image(basic_image)
    assert caught.value.non_retryable and caught.value.type == "ArtifactUnauthorized"
    assert "no credentials are configured" in caught.value.message
    assert basic_image in caught.value.message


async def test_basic_auth_with_wrong_credentials(basic_registry: RegistryServer, basic_image: str) -> None:
    async with resolver_for(basic_registry.host, password="wrong") as resolver:
        with pytest.raises(ArtifactUnauthorizedError) as caught:
            await resolver.resolve_image(basic_image)
    assert "UNAUTHORIZED" in caught.value.message


async def test_basic_auth_unknown_tag_is_not_found(basic_registry: RegistryServer, basic_image: str) -> None:
    async with resolver_for(basic_registry.host) as resolver:
        with pytest.raises(ArtifactNotFoundError, match="manifest unknown"):
            await resolver.resolve_image(f"{basic_registry.host}/{REPOSITORY}:v9")


async def test_bearer_token_flow(
    token_registry: tuple[RegistryServer, TokenService], token_image: str
) -> None:
    server, tokens = token_registry
    tokens.requests.clear()
    async with resolver_for(server.host) as resolver:
        resolved = await resolver.resolve_image(token_image)
        await resolver.resolve_image(token_image)
    asked = list(tokens.requests)

    assert resolved.digest == await asyncio.to_thread(skopeo_digest, token_image, (USER, PASSWORD))
    # The challenge's service and scope were passed on, and the token was cached for the second call.
    assert asked == [{"scope": f"repository:{REPOSITORY}:pull", "service": SERVICE}]


async def test_bearer_anonymous_token_is_refused(token_image: str, resolver: RegistryResolver) -> None:
    with pytest.raises(ArtifactUnauthorizedError) as caught:
        await resolver.resolve_image(token_image)
    assert "access denied" in caught.value.message
    assert "UNAUTHORIZED" in caught.value.message


async def test_bearer_wrong_credentials_are_refused_by_the_token_service(
    token_registry: tuple[RegistryServer, TokenService], token_image: str
) -> None:
    async with resolver_for(token_registry[0].host, password="wrong") as resolver:
        with pytest.raises(ArtifactUnauthorizedError) as caught:
            await resolver.resolve_image(token_image)
    assert "incorrect username or password" in caught.value.message
