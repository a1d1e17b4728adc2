from .fixtures import kube_cluster, kube_namespace

__all__ = ["kube_cluster", "kube_namespace"]
