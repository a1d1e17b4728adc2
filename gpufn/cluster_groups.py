"""Cluster groups: where a deployment can run, with the GPUs and instance types each offers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class InvalidPlacementError(ValueError):
    """A deployment names a gpu, instanceType, backend or cluster that no cluster group offers."""


@dataclass
class ClusterGroups:
    """The cluster groups of this installation, in NVCF's `clusterGroups[]` shape."""

    groups: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """Return the body of `GET /v2/nvcf/clusterGroups`."""
        return {"clusterGroups": self.groups}

    def resolve(self, gpu: str, instance_type: str, backend: str | None, clusters: list[str] | None) -> str:
        """Return the name of the cluster group that serves the spec, or raise InvalidPlacementError."""
        candidates = self.groups
        if backend:
            candidates = [g for g in candidates if g["name"] == backend]
            if not candidates:
                raise InvalidPlacementError(f"Invalid backend '{backend}': no such cluster group")
        if clusters:
            wanted = set(clusters)
            candidates = [g for g in candidates if wanted <= {c["name"] for c in g.get("clusters", [])}]
            if not candidates:
                raise InvalidPlacementError(
                    f"Invalid clusters {sorted(wanted)}: not all in one cluster group"
                )
        with_gpu = [g for g in candidates if any(x["name"] == gpu for x in g.get("gpus", []))]
        if not with_gpu:
            raise InvalidPlacementError(
                f"Invalid GPU '{gpu}': not offered by the cluster groups of this account"
            )
        for group in with_gpu:
            for entry in group["gpus"]:
                if entry["name"] == gpu and any(
                    t["name"] == instance_type for t in entry.get("instanceTypes", [])
                ):
                    return str(group["name"])
        raise InvalidPlacementError(f"Invalid InstanceType '{instance_type}' for GPU '{gpu}'")
