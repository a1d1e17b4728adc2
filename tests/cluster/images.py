"""Container images of the test cluster: built here (never pulled), copied into the cluster's registry.

- ``pause:1``: the pod sandbox image, one static binary (``build.sh`` compiles ``images/pause.c``), written
  as an OCI layout by :func:`write_pause_layout` at cluster boot.
- ``gpufn-base:bookworm`` and ``echo:1``: built once by ``images/build.sh`` (debootstrap + buildah) into the
  OCI layout :func:`image_layout` names.

:func:`push` copies an image from an OCI layout into a registry with skopeo.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.registry.servers import write_oci_layout

HERE = Path(__file__).resolve().parent
IMAGE_BUILD_SCRIPT = HERE / "images" / "build.sh"
# Tags images/build.sh puts into the layout.
BUILT_IMAGES = ("gpufn-base:bookworm", "echo:1")
PAUSE_TAG = "pause:1"


class ImageError(RuntimeError):
    """An image could not be built or copied."""


def image_cache_dir() -> Path:
    """The OCI layout cache of ``images/build.sh``: ``$GPUFN_IMAGE_CACHE`` or ``~/.cache/gpufn/images-r1``."""
    env = os.environ.get("GPUFN_IMAGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gpufn" / "images-r1"


def image_layout() -> Path:
    return image_cache_dir() / "oci"


def layout_tags(layout: Path) -> set[str]:
    """The tags an OCI layout holds (empty when there is none)."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError):
        return set()
    return {
        m.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
        for m in index.get("manifests", [])
    }


def ensure_images() -> Path:
    """Run ``images/build.sh`` when an image is missing (minutes, once per machine); return the layout.

    Raises:
        ImageError: The build failed.
    """
    layout = image_layout()
    if not set(BUILT_IMAGES) <= layout_tags(layout):
        done = subprocess.run(["bash", str(IMAGE_BUILD_SCRIPT)], check=False)
        if done.returncode != 0 or not set(BUILT_IMAGES) <= layout_tags(layout):
            raise ImageError(f"{IMAGE_BUILD_SCRIPT} failed (exit {done.returncode})")
    return layout


def write_pause_layout(binary: Path, layout: Path) -> None:
    """Write the sandbox image (``binary`` as entrypoint ``/pause``) as an OCI layout, tag ``pause:1``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("pause")
        data = binary.read_bytes()
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
    write_oci_layout(layout, buffer.getvalue(), PAUSE_TAG, {"Entrypoint": ["/pause"]})


def push(layout: Path, tag: str, destination: str) -> None:
    """Copy the image tagged ``tag`` in an OCI layout to ``docker://destination`` (plain HTTP)."""
    done = subprocess.run(
        # --insecure-policy: no /etc/containers/policy.json is needed; nothing here is verified by signature.
        ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
         f"oci:{layout}:{tag}", f"docker://{destination}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise ImageError(f"skopeo copy of {tag} to {destination} failed: {done.stderr.strip()}")


GPUFN_IMAGE_BUILD_SCRIPT = HERE / "images" / "build-gpufn.sh"
REPO_ROOT = HERE.parent.parent
# What deploy/Dockerfile copies, plus the Dockerfile: any change to them is a new image.
GPUFN_IMAGE_INPUTS = (
    "deploy/Dockerfile",
    "pyproject.toml",
    "README.md",
    "workflows",
    "activities",
    "api",
    "gpufn",
    "worker.py",
    "examples",
)


def gpufn_image_cache_dir() -> Path:
    """The OCI layout cache of ``images/build-gpufn.sh``, next to ``image_cache_dir()``."""
    env = os.environ.get("GPUFN_GPUFN_IMAGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gpufn" / "gpufn-image-r1"


def gpufn_image_tag() -> str:
    """A hash of the gpufn image's inputs (paths and contents, caches left out): its tag in the cache."""
    digest = hashlib.sha256()
    for name in GPUFN_IMAGE_INPUTS:
        root = REPO_ROOT / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def ensure_gpufn_image() -> tuple[Path, str]:
    """Build gpufn's image from ``deploy/Dockerfile`` unless the current inputs' one is cached (minutes per
    code change, seconds otherwise); return (OCI layout, tag).

    Raises:
        ImageError: The build failed.
    """
    tag = gpufn_image_tag()
    layout = gpufn_image_cache_dir() / "oci"
    if tag not in layout_tags(layout):
        # The running Python (the test venv's) downloads the wheels, unless GPUFN_KUBE_PYTHON says otherwise.
        env = {**os.environ, "GPUFN_KUBE_PYTHON": os.environ.get("GPUFN_KUBE_PYTHON", sys.executable)}
        done = subprocess.run(["bash", str(GPUFN_IMAGE_BUILD_SCRIPT), tag], env=env, check=False)
        if done.returncode != 0 or tag not in layout_tags(layout):
            raise ImageError(f"{GPUFN_IMAGE_BUILD_SCRIPT} failed (exit {done.returncode})")
    return layout, tag
