"""Kubernetes plumbing shared by the container backend (`activities/kubernetes.py`) and the Helm backend
(`activities/helm.py`).

* `config`: the backends' knobs (`KubeSettings`, `HelmSettings`).
* `names`: object names, labels and selectors.
* `cluster`: one cluster's API clients, threads, calls and the namespaces gpufn makes (hardened).
* `errors`: what a failed API call means to Temporal (retryable or not).
* `informer`: one list-then-watch loop that keeps objects of a cluster in memory.
* `wakeups`: the per-version events and deadlines that wake a version's watcher.
* `pods`: what a pod means to the workflow (its instance state and the reason).
* `placement`: the GPUs of an instance type, and the GPU products of the nodes that have them.
* `secrets`: a version's secrets, opened here, in the Secret its pods read.
* `manifests`: the container backend's Deployment, its pods' hardening, and the namespaces gpufn makes
  with their NetworkPolicy.
* `diagnosis`: a failed pod's warning events and last log lines.
* `releases`: Helm releases as the Helm backend names, configures and reads them.
"""
