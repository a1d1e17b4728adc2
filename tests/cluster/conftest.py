from .fixtures import kube_cluster, kube_namespace, real_cluster

__all__ = ["kube_cluster", "kube_namespace", "real_cluster"]
