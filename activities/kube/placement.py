"""Where a function's instances may run in a cluster: the GPUs its instance type asks for, and the GPU
products of the nodes that have them.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from activities.kube.errors import invalid_spec
from gpufn.kube_inventory import GPU_PRODUCT_LABEL, GpuNode, parse_instance_type, products_of
from workflows.models import DeploymentSpecification


def instance_gpus(cluster_group: str, dspec: DeploymentSpecification) -> tuple[str, int]:
    """Return (GPU, GPUs per instance) of the deployment's instance type in a cluster group.

    Raises:
        ApplicationError: Non-retryable, when the instance type is not one of the group's for the GPU.
    """
    parsed = parse_instance_type(cluster_group, dspec.instanceType)
    if parsed is None or parsed[0] != dspec.gpu:
        raise invalid_spec(
            f"Invalid InstanceType '{dspec.instanceType}' for GPU '{dspec.gpu}' in cluster group "
            f"'{cluster_group}'"
        )
    return parsed


def gpu_products(
    cluster_group: str, nodes: list[GpuNode], gpu: str, count: int, permanent: bool
) -> list[str]:
    """Return the GPU products a pod of `count` `gpu`s may run on.

    Args:
        cluster_group: The cluster's group name (for the messages).
        nodes: The cluster's GPU nodes now.
        gpu: The short GPU name.
        count: GPUs per instance.
        permanent: Whether a missing GPU is final (at prepare), or may come back (nodes replaced between
            prepare and a later scale-up: retried).
    """
    products = products_of(nodes, gpu)
    if not products:
        raise ApplicationError(
            f"Cluster '{cluster_group}' has no node with {gpu} GPUs (label {GPU_PRODUCT_LABEL})",
            type="NoSuchGpu",
            non_retryable=permanent,
        )
    largest = max(n.gpus for n in nodes if n.gpu == gpu)
    if largest < count:
        raise ApplicationError(
            f"No node of cluster '{cluster_group}' has {count} {gpu} GPUs (the largest has {largest})",
            type="InstanceTypeTooLarge",
            non_retryable=permanent,
        )
    return products
