"""A version's secrets in a cluster: opened from their sealed form in the worker (never in workflow data)
and kept in a Secret that the version's pods read.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from typing import Any

from cryptography.exceptions import InvalidTag
from temporalio.exceptions import ApplicationError

from activities.kube.cluster import Cluster
from activities.kube.errors import AlreadyExists
from activities.kube.names import MERGE_PATCH, version_labels
from gpufn.sealing import SecretBox, secret_context
from workflows.models import FunctionVersionSpec, VersionRef

log = logging.getLogger(__name__)

JSON = dict[str, Any]


def open_secrets(box: SecretBox, spec: FunctionVersionSpec) -> dict[str, str]:
    """Return the version's secret values, opened.

    Raises:
        ApplicationError: Non-retryable, when this worker's key cannot open one.
    """
    values = {}
    for secret, sealed in spec.encryptedSecrets.items():
        try:
            values[secret] = box.open(sealed, secret_context(spec.versionId, secret))
        except (InvalidTag, ValueError) as err:
            raise ApplicationError(
                f"Secret '{secret}' cannot be opened with this worker's secret key",
                type="SecretUnreadable",
                non_retryable=True,
            ) from err
    return values


def secret_manifest(name: str, namespace: str, ref: VersionRef, values: dict[str, str]) -> JSON:
    """Return the Secret holding a version's opened secret values."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": version_labels(ref)},
        "stringData": values,
    }


def ensure_secret(
    cluster: Cluster, namespace: str, name: str, ref: VersionRef, values: dict[str, str]
) -> None:
    """Create the version's Secret, or write the current values into it where they differ (one read)."""
    secret = cluster.call("read a Secret", cluster.core.read_namespaced_secret, name, namespace, ok=(404,))
    if secret is None:
        with contextlib.suppress(AlreadyExists):
            cluster.create(
                cluster.core.create_namespaced_secret,
                namespace,
                secret_manifest(name, namespace, ref, values),
            )
        return
    refresh_secret(cluster, namespace, secret, values)


def refresh_secret(cluster: Cluster, namespace: str, secret: JSON | None, values: dict[str, str]) -> None:
    """Write the version's current secret values into its Secret (as read) where they differ."""
    if secret is None:
        return
    stored = secret.get("data") or {}
    changed = {
        key: value
        for key, value in values.items()
        if stored.get(key) != base64.b64encode(value.encode()).decode()
    }
    if changed:
        name = secret["metadata"]["name"]
        cluster.call(
            "update a Secret",
            cluster.core.patch_namespaced_secret,
            name,
            namespace,
            {"stringData": changed},
            _content_type=MERGE_PATCH,
        )
        log.info("Secret %s/%s: %d value(s) updated", namespace, name, len(changed))
