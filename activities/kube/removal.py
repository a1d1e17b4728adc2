"""Taking a container function's objects away: releasing pods from their ReplicaSet, deleting a version's
controllers and Secrets, and forcing out pods stuck terminating on a node that is gone.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from activities.kube.cluster import Cluster
from activities.kube.names import MERGE_PATCH, ROLE_LABEL, ROLE_RELEASED, VERSION_LABEL, label_value
from activities.kube.pods import parse_time

log = logging.getLogger(__name__)

JSON = dict[str, Any]

FORCE_DELETE_AFTER_SECONDS = 60.0
"""A pod still terminating this long after its grace period ended has lost its node: delete it by force."""


def release_pods(cluster: Cluster, namespace: str, version_id: str, names: list[str]) -> list[str]:
    """Take the named pods of the version out of their ReplicaSet; return those that exist."""
    released = []
    for pod_name in names:
        pod = cluster.call("read a pod", cluster.core.read_namespaced_pod, pod_name, namespace, ok=(404,))
        if pod is None:
            continue
        labels = pod["metadata"].get("labels") or {}
        if labels.get(VERSION_LABEL) != label_value(version_id):
            log.warning("Not removing pod %s/%s: not of version %s", namespace, pod_name, version_id)
            continue
        if labels.get(ROLE_LABEL) != ROLE_RELEASED:
            patched = cluster.call(
                "release a pod",
                cluster.core.patch_namespaced_pod,
                pod_name,
                namespace,
                {"metadata": {"labels": {ROLE_LABEL: ROLE_RELEASED}}},
                _content_type=MERGE_PATCH,
                ok=(404,),
            )
            if patched is None:
                continue
        released.append(pod_name)
    return released


def force_delete_stuck(cluster: Cluster, namespace: str, pods: list[JSON]) -> None:
    """Force the deletion of pods terminating long past their grace period (their node is gone)."""
    now = datetime.now(UTC)
    for pod in pods:
        meta = pod["metadata"]
        due = parse_time(meta.get("deletionTimestamp"))
        if due is not None and now > due + timedelta(seconds=FORCE_DELETE_AFTER_SECONDS):
            log.warning("Pod %s/%s is stuck terminating: deleting it by force", namespace, meta["name"])
            cluster.call(
                "force the deletion of a pod",
                cluster.core.delete_namespaced_pod,
                meta["name"],
                namespace,
                grace_period_seconds=0,
                ok=(404,),
            )


def delete_version_objects(cluster: Cluster, namespace: str, selector: str) -> None:
    """Delete the version's Deployments, ReplicaSets and Secrets; their pods go with them."""
    for action, fn in (
        ("delete Deployments", cluster.apps.delete_collection_namespaced_deployment),
        ("delete ReplicaSets", cluster.apps.delete_collection_namespaced_replica_set),
    ):
        cluster.call(
            action, fn, namespace, label_selector=selector, propagation_policy="Background", ok=(404,)
        )
    cluster.call(
        "delete Secrets",
        cluster.core.delete_collection_namespaced_secret,
        namespace,
        label_selector=selector,
        ok=(404,),
    )
