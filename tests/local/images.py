"""The container images of the local container backend's tests, in a real local registry.

`tests/local/build-images.sh` builds them once (with buildah, from the test cluster's Debian-based echo
image) into an OCI layout; `local_registry` starts a `docker-registry` on loopback and copies them in.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from activities.local.containers import podman_unavailable_reason
from tests.conftest import echo_function
from tests.registry.servers import REGISTRY_BINARY, RegistryServer, skopeo_copy

HERE = Path(__file__).resolve().parent
ECHO_LAYOUT = Path(os.environ.get("GPUFN_IMAGE_CACHE", Path.home() / ".cache/gpufn/images-r1")) / "oci"
LOCAL_LAYOUT = (
    Path(os.environ.get("GPUFN_LOCAL_IMAGE_CACHE", Path.home() / ".cache/gpufn/local-images-r2")) / "oci"
)
BUILD_TIMEOUT_SECONDS = 900
HOSTILE_TAG = (
    "hostile:" + hashlib.sha256((HERE.parent / "security" / "hostile.py").read_bytes()).hexdigest()[:12]
)
"""The tag build-images.sh gives the hostile image: it changes with hostile.py."""


def containers_unavailable() -> str | None:
    """Return why the container tests cannot run here (no podman, no root, no registry tools), or None."""
    missing = [tool for tool in (REGISTRY_BINARY, "skopeo", "buildah") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (make test-cluster installs them)"
    return podman_unavailable_reason()


@contextmanager
def local_registry(workdir: Path) -> Iterator[str]:
    """Build the images if needed, serve them from a registry on loopback; yield its host:port.

    The registry holds `echo:1` (the echo example) and `hostile:1` (tests/security/hostile.py on it).
    """
    subprocess.run(["bash", str(HERE / "build-images.sh")], check=True, timeout=BUILD_TIMEOUT_SECONDS)
    with RegistryServer(workdir) as registry:
        skopeo_copy(ECHO_LAYOUT, "echo:1", f"{registry.host}/echo:1")
        skopeo_copy(LOCAL_LAYOUT, HOSTILE_TAG, f"{registry.host}/hostile:1")
        yield registry.host


def container_function(registry: str, name: str, image: str = "echo:1", **overrides: Any) -> dict[str, Any]:
    """Return a create-function body that runs `image` from the test registry as it is (no containerArgs)."""
    body = echo_function(name, containerImage=f"{registry}/{image}")
    del body["containerArgs"]
    body.update(overrides)
    return body
