"""Local Kubernetes 1.20 test cluster: real control plane, fake GPU kubelet (see README.md)."""
