"""Container images of the test cluster: built here (never pulled), copied into the cluster's registry.

- ``pause:1``: the pod sandbox image, one static binary (``build.sh`` compiles ``images/pause.c``), written
  as an OCI layout by :func:`write_pause_layout` at cluster boot.
- ``gpufn-base:bookworm`` and ``echo:1``: built once by ``images/build.sh`` (debootstrap + buildah) into the
  OCI layout :func:`image_layout` names.

:func:`push` copies an image from an OCI layout into a registry with skopeo.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

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


def _blob(root: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def write_pause_layout(binary: Path, layout: Path) -> None:
    """Write the sandbox image (``binary`` as entrypoint ``/pause``) as an OCI layout, tag ``pause:1``."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("pause")
        data = binary.read_bytes()
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
    layer_tar = buffer.getvalue()
    layer, layer_size = _blob(layout, gzip.compress(layer_tar, mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
    }
    config_digest, config_size = _blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_size}
        ],
    }
    digest, size = _blob(layout, json.dumps(manifest).encode())
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": size,
                "annotations": {"org.opencontainers.image.ref.name": PAUSE_TAG},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


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
