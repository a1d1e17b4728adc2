"""Kubernetes plumbing shared by the container backend (`activities/kubernetes.py`) and the Helm backend
(`activities/helm.py`).

* `config`: the backends' knobs (`KubeSettings`).
* `names`: object names, labels and selectors.
* `cluster`: one cluster's API clients, threads, calls and the namespaces gpufn makes (hardened).
* `errors`: what a failed API call means to Temporal (retryable or not).
* `informer`: one list-then-watch loop that keeps objects of a cluster in memory.
* `wakeups`: the per-version events and deadlines that wake a version's watcher.
* `pods`: what a pod means to the workflow (its instance state and the reason).
* `manifests`: the objects the container backend creates (Deployment, Secret), their pod hardening, and
  the NetworkPolicy of every namespace gpufn makes.
* `diagnosis`: a failed pod's warning events and last log lines.
* `releases`: Helm releases as the Helm backend names, configures and reads them.
"""
