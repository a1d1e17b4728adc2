"""Image references parse the way Docker parses them, and pins name exactly one manifest."""

from __future__ import annotations

import json

import pytest

from activities.registry import (
    ENV_CREDENTIALS,
    ENV_INSECURE,
    ImageReference,
    InvalidArtifactReferenceError,
    RegistryConfig,
    RegistryCredential,
    ResolvedChart,
    parse_image_reference,
    pin_image,
)
from gpufn.settings import Settings

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("nginx", ImageReference("docker.io", "library/nginx", "latest", None)),
        ("nginx:1.27", ImageReference("docker.io", "library/nginx", "1.27", None)),
        ("bitnami/redis:7", ImageReference("docker.io", "bitnami/redis", "7", None)),
        ("index.docker.io/library/nginx", ImageReference("docker.io", "library/nginx", "latest", None)),
        (
            "nvcr.io/nvidia/tritonserver:24.05-py3",
            ImageReference("nvcr.io", "nvidia/tritonserver", "24.05-py3", None),
        ),
        ("localhost:5000/echo", ImageReference("localhost:5000", "echo", "latest", None)),
        ("127.0.0.1:5000/a/b/c:v1", ImageReference("127.0.0.1:5000", "a/b/c", "v1", None)),
        (f"ghcr.io/org/app@{DIGEST}", ImageReference("ghcr.io", "org/app", None, DIGEST)),
        (f"ghcr.io/org/app:v2@{DIGEST}", ImageReference("ghcr.io", "org/app", "v2", DIGEST)),
    ],
)
def test_parse_image_reference(ref: str, expected: ImageReference) -> None:
    assert parse_image_reference(ref) == expected


@pytest.mark.parametrize("ref", ["UPPER/case", "repo:bad tag", "repo@sha256:short", "host:5000/", ""])
def test_invalid_references_are_non_retryable(ref: str) -> None:
    with pytest.raises(InvalidArtifactReferenceError) as caught:
        parse_image_reference(ref)
    assert caught.value.non_retryable
    assert caught.value.type == "InvalidArtifactReference"


def test_docker_hub_api_host_differs_from_its_name() -> None:
    assert parse_image_reference("nginx").api_host == "registry-1.docker.io"
    assert parse_image_reference("nvcr.io/nvidia/x").api_host == "nvcr.io"


def test_pin_image_drops_the_tag_and_names_the_registry() -> None:
    assert pin_image("nginx:1.27", DIGEST) == f"docker.io/library/nginx@{DIGEST}"
    assert pin_image(f"127.0.0.1:5000/team/echo:v1@{DIGEST}", DIGEST) == f"127.0.0.1:5000/team/echo@{DIGEST}"
    with pytest.raises(InvalidArtifactReferenceError):
        pin_image("nginx", "latest")


def test_chart_pins() -> None:
    archive = ResolvedChart("r", "echo", "1.0.0", DIGEST, "https://charts.example.com/echo-1.0.0.tgz")
    assert archive.pinned == f"https://charts.example.com/echo-1.0.0.tgz#sha256={'ab' * 32}"
    oci = ResolvedChart("r", "echo", "1.0.0", DIGEST, "oci://registry.example.com/charts/echo")
    assert oci.pinned == f"oci://registry.example.com/charts/echo@{DIGEST}"


def test_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_CREDENTIALS, json.dumps({"index.docker.io": {"username": "u", "password": "p"}}))
    monkeypatch.setenv(ENV_INSECURE, json.dumps(["registry.lan:5000"]))
    config = RegistryConfig.from_settings(Settings())
    assert config.credential_for("docker.io") == RegistryCredential("u", "p")
    assert config.credential_for("registry-1.docker.io") == RegistryCredential("u", "p")
    assert config.credential_for("nvcr.io") is None
    assert config.scheme_for("registry.lan:5000") == "http"
    assert config.scheme_for("127.0.0.1:5000") == "http"
    assert config.scheme_for("localhost:5000") == "http"
    assert config.scheme_for("nvcr.io") == "https"


def test_config_rejects_malformed_credentials() -> None:
    with pytest.raises(ValueError, match=r"nvcr\.io"):
        RegistryConfig.from_settings(Settings(registry_credentials={"nvcr.io": {"username": "u"}}))
