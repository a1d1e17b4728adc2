from .fixtures import kube_namespace, real_cluster

__all__ = ["kube_namespace", "real_cluster"]
