"""The objects gpufn makes in a cluster: a container function's Deployment, its pods' hardening, and the
namespaces (with their NetworkPolicy) that hold functions.

Function pods are hardened (docs/kubernetes.md, "Isolation"): no service-account token, no privilege
escalation, every capability dropped, the runtime's default seccomp profile, and a non-root uid unless the
operator allows root (`GPUFN_KUBE_RUN_AS_USER=0`). Every namespace gpufn makes gets a NetworkPolicy: its pods
take traffic only from their own namespace and gpufn's gateways, and reach only their own namespace, the
cluster's DNS and addresses outside the platform's networks.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from activities.kube.config import KubeSettings
from activities.kube.names import (
    CONTAINER,
    MANAGED_BY_LABEL,
    MANAGER,
    ROLE_INSTANCE,
    ROLE_LABEL,
    SPEC_LABEL,
    VERSION_LABEL,
    version_labels,
)
from gpufn.durations import parse_iso_duration
from gpufn.kube_inventory import GPU_PRODUCT_LABEL, GPU_RESOURCE
from workflows.models import (
    DeploymentSpecification,
    EnsureInstancesInput,
    FunctionVersionSpec,
    Health,
    VersionRef,
)

JSON = dict[str, Any]

PROBE_PERIOD_SECONDS = 5
PROBE_FAILURES = 3
NETWORK_POLICY_NAME = "gpufn-isolation"
GATEWAY_POD_LABELS = {"app.kubernetes.io/component": "api"}
"""Labels of gpufn's API pods (deploy/helm/gpufn), whose gateways call function pods."""
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""Set on every namespace by Kubernetes 1.21 and later; on 1.20 the operator labels the gateway namespace."""
DNS_POD_LABELS = {"k8s-app": "kube-dns"}
"""Labels of the cluster DNS pods (kube-dns and CoreDNS both carry them)."""
POD_SECURITY_LABELS = {
    "pod-security.kubernetes.io/enforce": "baseline",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/audit": "restricted",
}
"""Pod Security admission (Kubernetes 1.23 and later; older clusters ignore the labels): no pod of a gpufn
namespace, a Helm chart's included, may be privileged or use the host's namespaces, paths or ports."""


def _escape(text: str) -> str:
    """Keep Kubernetes from expanding `$(VAR)` in a command word or an environment value."""
    return text.replace("$", "$$")


CONTAINER_SECURITY: JSON = {
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
}
"""The function container's securityContext: no setuid gains, no capabilities, not privileged."""


def pod_security(run_as_user: int) -> JSON:
    """Return the function pod's securityContext: the runtime's seccomp profile, and a non-root user.

    Args:
        run_as_user: The uid (and gid) the containers run as, whatever the image says; 0 keeps the image's
            own user, root included (the way out for images that cannot run as anyone else).
    """
    security: JSON = {"seccompProfile": {"type": "RuntimeDefault"}}
    if run_as_user > 0:
        security.update(
            {
                "runAsNonRoot": True,
                "runAsUser": run_as_user,
                "runAsGroup": run_as_user,
                "fsGroup": run_as_user,
            }
        )
    return security


def readiness_probe(health: Health, serving_port: int) -> JSON:
    """Return the readiness probe of the version's health check.

    Kubernetes 1.20 has no gRPC probe, so a gRPC health check becomes a TCP check of its port; an HTTP
    probe accepts any status from 200 to 399.
    """
    port = health.port or serving_port
    try:
        timeout = parse_iso_duration(health.timeout, default=10.0)
    except ValueError:
        timeout = 10.0
    action: JSON
    if health.protocol.upper() == "GRPC":
        action = {"tcpSocket": {"port": port}}
    else:
        action = {"httpGet": {"path": health.uri, "port": port, "scheme": "HTTP"}}
    return {
        **action,
        "periodSeconds": PROBE_PERIOD_SECONDS,
        "timeoutSeconds": max(1, math.ceil(timeout)),
        "failureThreshold": PROBE_FAILURES,
        "successThreshold": 1,
    }


def container_environment(
    ref: VersionRef,
    spec: FunctionVersionSpec,
    dspec: DeploymentSpecification,
    secret_name: str | None,
    cluster_group: str,
) -> list[JSON]:
    """Return the container's `env`: the version's environment, its secrets (by reference), then NVCF's."""
    env: dict[str, JSON] = {}
    for entry in spec.containerEnvironment or []:
        env[entry.key] = {"name": entry.key, "value": _escape(entry.value)}
    if secret_name is not None:
        for name in sorted(spec.encryptedSecrets):
            env[name] = {"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": name}}}
    fixed = {
        # Servers bind $HOST:$PORT; in a pod that is every interface.
        "HOST": "0.0.0.0",
        "PORT": str(spec.serving_port),
        "NVCF_BACKEND": dspec.backend or dspec.clusterGroup,
        "NVCF_ENV": "kubernetes",
        "NVCF_FUNCTION_ID": ref.functionId,
        "NVCF_FUNCTION_NAME": spec.name,
        "NVCF_FUNCTION_VERSION_ID": ref.versionId,
        "NVCF_INSTANCETYPE": dspec.instanceType,
        "NVCF_NCA_ID": ref.accountId,
        "NVCF_REGION": cluster_group,
    }
    for key, value in fixed.items():
        env[key] = {"name": key, "value": _escape(value)}
    env["NVCF_INSTANCE_ID"] = {
        "name": "NVCF_INSTANCE_ID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    return list(env.values())


def deployment_manifest(
    *,
    request: EnsureInstancesInput,
    name: str,
    namespace: str,
    gpus: int,
    products: Sequence[str],
    secret_name: str | None,
    cluster_group: str,
    settings: KubeSettings,
) -> JSON:
    """Return the Deployment of one deployment spec of a version, with `request.count` replicas."""
    ref, spec, dspec = request.ref, request.spec, request.deploymentSpec
    labels = version_labels(ref)
    selector = {
        VERSION_LABEL: labels[VERSION_LABEL],
        SPEC_LABEL: str(request.specIndex),
        ROLE_LABEL: ROLE_INSTANCE,
    }
    annotations = {
        "gpufn.io/function-name": spec.name,
        "gpufn.io/instance-type": dspec.instanceType,
        "gpufn.io/cluster-group": cluster_group,
    }
    gpu_quantity = {GPU_RESOURCE: str(gpus)}
    container: JSON = {
        "name": CONTAINER,
        "image": request.prepared.resolvedImage or spec.containerImage,
        "ports": [{"name": "http", "containerPort": spec.serving_port, "protocol": "TCP"}],
        "env": container_environment(ref, spec, dspec, secret_name, cluster_group),
        "resources": {"limits": gpu_quantity, "requests": gpu_quantity},
        "readinessProbe": readiness_probe(spec.health, spec.serving_port),
        "securityContext": CONTAINER_SECURITY,
    }
    if spec.containerArgs:
        container["command"] = [_escape(word) for word in shlex.split(spec.containerArgs)]
    pod_spec: JSON = {
        "containers": [container],
        # Functions have no business with the cluster's API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security(settings.run_as_user),
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(products)}
                            ]
                        }
                    ]
                }
            }
        },
        # GPU nodes are often tainted so that only pods asking for GPUs land there.
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
    }
    if settings.runtime_class:
        pod_spec["runtimeClassName"] = settings.runtime_class
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**labels, SPEC_LABEL: str(request.specIndex)},
            "annotations": annotations,
        },
        "spec": {
            "replicas": request.count,
            "selector": {"matchLabels": selector},
            # The template never changes (versions are immutable); should it, never hold twice the GPUs.
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 1,
            "template": {
                "metadata": {"labels": {**labels, **selector}, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def namespace_manifest(
    name: str, labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None
) -> JSON:
    """Return a namespace gpufn makes: marked as gpufn's, under Pod Security admission's baseline."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {**POD_SECURITY_LABELS, MANAGED_BY_LABEL: MANAGER, **(labels or {})},
            "annotations": dict(annotations or {}),
        },
    }


def network_policy_manifest(namespace: str, settings: KubeSettings) -> JSON:
    """Return the NetworkPolicy that isolates the pods of a namespace gpufn makes.

    Ingress: from the namespace's own pods (a chart's parts; an account's functions) and from gpufn's
    gateways (the API pods of `settings.gateway_namespace`, and `settings.gateway_cidrs`). Egress: to the
    namespace's own pods, to the cluster's DNS, and to any address but `settings.egress_denied_cidrs` (the
    platform's networks: the Temporal frontend, the API's internal ports, other accounts' pods, the cloud's
    metadata service). Enforced only where the cluster's network plugin enforces NetworkPolicy.
    """
    same_namespace: JSON = {"podSelector": {}}
    sources: list[JSON] = [same_namespace]
    if settings.gateway_namespace:
        sources.append(
            {
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: settings.gateway_namespace}},
                "podSelector": {"matchLabels": dict(GATEWAY_POD_LABELS)},
            }
        )
    sources.extend({"ipBlock": {"cidr": cidr}} for cidr in settings.gateway_cidrs)
    outside: list[JSON] = []
    for everything in ("0.0.0.0/0", "::/0"):
        family = ":" in everything
        denied = [c for c in settings.egress_denied_cidrs if (":" in c) == family]
        outside.append({"ipBlock": {"cidr": everything, **({"except": denied} if denied else {})}})
    dns_ports = [{"protocol": protocol, "port": 53} for protocol in ("UDP", "TCP")]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": NETWORK_POLICY_NAME,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGER},
        },
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": sources}],
            "egress": [
                {"to": [same_namespace]},
                {
                    "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": dict(DNS_POD_LABELS)}}],
                    "ports": dns_ports,
                },
                {"to": outside},
            ],
        },
    }
