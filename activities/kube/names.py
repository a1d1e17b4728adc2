"""Names, labels and selectors of the objects gpufn makes in a cluster."""

from __future__ import annotations

import hashlib
import re

from workflows.models import VersionRef

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGER = "gpufn"
FUNCTION_LABEL = "gpufn.io/function-id"
VERSION_LABEL = "gpufn.io/version-id"
ACCOUNT_LABEL = "gpufn.io/account"
SPEC_LABEL = "gpufn.io/spec-index"
ROLE_LABEL = "gpufn.io/role"
ROLE_INSTANCE = "instance"
ROLE_RELEASED = "released"
"""A pod taken out of its ReplicaSet to be deleted (scale-down of exactly the drained pods)."""
CONTAINER = "function"
MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGER}"
MERGE_PATCH = "application/merge-patch+json"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def dns_label(text: str, max_length: int = 63) -> str:
    """Return `text` as a DNS label; a lossy conversion gets a hash suffix so two inputs never collide."""
    clean = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if clean == text and len(clean) <= max_length:
        return clean
    return f"{clean[: max_length - 9].rstrip('-')}-{_digest(text)}".lstrip("-")


def label_value(text: str) -> str:
    """Return `text` as a label value (63 characters of [A-Za-z0-9_.-], alphanumeric at both ends)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    if clean == text and len(clean) <= 63:
        return clean
    return f"{clean[:54].rstrip('-_.')}-{_digest(text)}".lstrip("-_.")


def namespace_name(prefix: str, account: str) -> str:
    """Return the namespace of an account's container functions."""
    return dns_label(prefix + account)


def deployment_name(version_id: str, spec_index: int) -> str:
    """Return the name of a spec's Deployment (and Secret): short enough that pod names stay under 63."""
    return dns_label(f"fn-{version_id}-{spec_index}", max_length=46)


def version_selector(version_id: str) -> str:
    """Return the label selector of every object of a version."""
    return f"{VERSION_LABEL}={label_value(version_id)}"


def version_labels(ref: VersionRef) -> dict[str, str]:
    """Return the labels every object of a version carries."""
    return {
        MANAGED_BY_LABEL: MANAGER,
        FUNCTION_LABEL: label_value(ref.functionId),
        VERSION_LABEL: label_value(ref.versionId),
        ACCOUNT_LABEL: label_value(ref.accountId),
    }
