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

from activities.registry.artifacts import (
    ENV_CREDENTIALS,
    ENV_INSECURE,
    ArtifactNotFoundError,
    ArtifactUnauthorizedError,
    ImageReference,
    InvalidArtifactReferenceError,
    RegistryConfig,
    RegistryCredential,
    RegistryUnavailableError,
    ResolvedChart,
    ResolvedImage,
    parse_image_reference,
    pin_image,
)
from activities.registry.pinning import PinningBackend
from activities.registry.resolver import RegistryResolver

__all__ = [
    "ENV_CREDENTIALS",
    "ENV_INSECURE",
    "ArtifactNotFoundError",
    "ArtifactUnauthorizedError",
    "ImageReference",
    "InvalidArtifactReferenceError",
    "PinningBackend",
    "RegistryConfig",
    "RegistryCredential",
    "RegistryResolver",
    "RegistryUnavailableError",
    "ResolvedChart",
    "ResolvedImage",
    "parse_image_reference",
    "pin_image",
]
