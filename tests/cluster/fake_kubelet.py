"""A fake kubelet that registers GPU nodes and runs the pods bound to them as local processes.

The local test cluster has a real API server, controller-manager and scheduler but no container runtime.
This module stands in for the kubelets of a few GPU nodes:

* it registers the nodes (GPU capacity and the labels that GPU feature discovery writes), marks them
  Ready, lifts the ``node.kubernetes.io/not-ready`` taint that admission adds to new nodes, and keeps
  their status fresh;
* for every pod the scheduler binds to one of its nodes it runs the first container's ``command`` + ``args``
  as a local process in its own process group. Each pod gets a unique loopback address (``127.A.B.C``), which
  is reported as the pod IP and passed to the process as ``HOST``, so servers in different pods never clash;
* it reports container states the way a kubelet does (waiting / running / terminated, ``restartCount``,
  ``CrashLoopBackOff``, ``ErrImagePull`` / ``ImagePullBackOff`` for images matching a pattern,
  ``CreateContainerConfigError`` for a missing Secret), runs readiness and liveness probes for real, and
  sets the pod's ``Ready`` condition;
* it stops the process of a pod being deleted (SIGTERM, then SIGKILL after the capped grace period) and
  then removes the pod with grace period 0, which is what lets deletions finish.

Only the first container runs; any further containers are reported running and ready without running
anything. Init containers are reported as completed without running. The image is ignored, except to
simulate pull failures.

Run it as a script (the test harness does)::

    python fake_kubelet.py --kubeconfig KUBECONFIG --state-dir DIR [--config CONFIG.json]

Environment knobs (a value in ``--config`` under ``"settings"`` wins over the environment):

* ``FAKE_KUBELET_BAD_IMAGE_PATTERN``: comma-separated ``fnmatch`` patterns of images that "fail to pull"
  (default ``*does-not-exist*,*:missing``).
* ``FAKE_KUBELET_BACKOFF_BASE`` / ``FAKE_KUBELET_BACKOFF_MAX``: restart back-off in seconds, doubled on each
  crash (default 0.5 / 4).
* ``FAKE_KUBELET_MAX_PROBE_PERIOD``: cap in seconds on a probe's ``periodSeconds`` and
  ``initialDelaySeconds`` (default 0.5), so probes react fast.
* ``FAKE_KUBELET_MAX_GRACE``: cap in seconds on the termination grace period (default 3).
* ``FAKE_KUBELET_IP_PREFIX``: the first two octets of pod IPs (default ``127.77``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("fake-kubelet")

JSON = dict[str, Any]

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"

# GPU memory in MiB as GPU feature discovery reports it, for the label nvidia.com/gpu.memory.
GPU_MEMORY_MIB = {
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-H200": 143771,
    "NVIDIA-A100-SXM4-80GB": 81920,
    "NVIDIA-L40S": 46068,
    "NVIDIA-L4": 23034,
}

# Taints that the node lifecycle machinery would manage; the fake kubelet lifts them once a node is Ready.
NOT_READY_TAINTS = {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}


@dataclass
class NodeConfig:
    """One fake node.

    Attributes:
        name: Node name.
        gpu_product: Value of the ``nvidia.com/gpu.product`` label; None for a node without GPUs.
        gpu_count: Number of ``nvidia.com/gpu`` in capacity and allocatable.
        cpu: CPU capacity (a Kubernetes quantity).
        memory: Memory capacity (a Kubernetes quantity).
        pods: Pod capacity.
        labels: Extra node labels.
        taints: Extra node taints, as Kubernetes taint dicts (``key``, ``value``, ``effect``).
    """

    name: str
    gpu_product: str | None = "NVIDIA-H100-80GB-HBM3"
    gpu_count: int = 8
    cpu: str = "64"
    memory: str = "512Gi"
    pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: JSON) -> NodeConfig:
        """Build a node from its JSON form (the dataclass fields)."""
        return cls(**data)

    def node_labels(self) -> dict[str, str]:
        """Labels of the node: the well-known ones, the GPU discovery ones, then the extra ones."""
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        if self.gpu_product and self.gpu_count > 0:
            labels["nvidia.com/gpu.present"] = "true"
            labels["nvidia.com/gpu.product"] = self.gpu_product
            labels["nvidia.com/gpu.count"] = str(self.gpu_count)
            if self.gpu_product in GPU_MEMORY_MIB:
                labels["nvidia.com/gpu.memory"] = str(GPU_MEMORY_MIB[self.gpu_product])
        labels.update(self.labels)
        return labels

    def capacity(self) -> dict[str, str]:
        """Capacity (and allocatable) of the node."""
        cap = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods), "ephemeral-storage": "1Ti"}
        if self.gpu_product and self.gpu_count > 0:
            cap["nvidia.com/gpu"] = str(self.gpu_count)
        return cap


DEFAULT_NODES = [NodeConfig("gpu-node-1"), NodeConfig("gpu-node-2")]


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass
class KubeletSettings:
    """Behaviour knobs; defaults come from the ``FAKE_KUBELET_*`` environment variables.

    Attributes:
        bad_image_patterns: ``fnmatch`` patterns of images whose pull fails.
        backoff_base: First restart delay of a crashed container, in seconds.
        backoff_max: Largest restart delay, in seconds.
        max_probe_period: Cap on probe ``periodSeconds`` and ``initialDelaySeconds``, in seconds.
        max_grace: Cap on the termination grace period, in seconds.
        ip_prefix: First two octets of the pod IPs, e.g. ``127.77``.
        heartbeat: Seconds between node status refreshes.
    """

    bad_image_patterns: list[str] = field(
        default_factory=lambda: [
            p.strip()
            for p in os.environ.get("FAKE_KUBELET_BAD_IMAGE_PATTERN", "*does-not-exist*,*:missing").split(",")
            if p.strip()
        ]
    )
    backoff_base: float = field(default_factory=lambda: _env_float("FAKE_KUBELET_BACKOFF_BASE", 0.5))
    backoff_max: float = field(default_factory=lambda: _env_float("FAKE_KUBELET_BACKOFF_MAX", 4.0))
    max_probe_period: float = field(default_factory=lambda: _env_float("FAKE_KUBELET_MAX_PROBE_PERIOD", 0.5))
    max_grace: float = field(default_factory=lambda: _env_float("FAKE_KUBELET_MAX_GRACE", 3.0))
    ip_prefix: str = field(default_factory=lambda: os.environ.get("FAKE_KUBELET_IP_PREFIX", "127.77"))
    heartbeat: float = 10.0

    @classmethod
    def from_dict(cls, data: JSON) -> KubeletSettings:
        """Settings from the environment, overridden by the given keys."""
        return cls(**data)


def now_iso() -> str:
    """The current time in the RFC 3339 form the API server expects (second precision)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class IpAllocator:
    """Hands out unique loopback addresses ``<prefix>.B.C`` (all of 127.0.0.0/8 is local on Linux)."""

    def __init__(self, prefix: str) -> None:
        octets = prefix.split(".")
        if len(octets) != 2 or octets[0] != "127" or not 0 <= int(octets[1]) <= 255:
            raise ValueError(f"pod IP prefix must look like 127.N, got {prefix!r}")
        self._prefix = prefix
        self._next = 0
        self._lock = threading.Lock()

    def allocate(self) -> str:
        """Return the next unused address; addresses are not reused, so a dying pod never shares one."""
        with self._lock:
            while True:
                self._next += 1
                b, c = divmod(self._next % 65536, 256)
                # Skip .0 and .255 so every address looks like an ordinary host address.
                if 1 <= c <= 254:
                    return f"{self._prefix}.{b}.{c}"


class ContainerConfigError(Exception):
    """The container's environment references something missing (kubelet: CreateContainerConfigError)."""


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Expand ``$(VAR)`` references the way Kubernetes does for command, args and env values.

    Unknown references stay as written and ``$$`` escapes a literal ``$``.
    """

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR_REF.sub(repl, text)


class PodRunner(threading.Thread):
    """Runs one pod: its process, restarts, probes, status reports and deletion.

    All writes to the pod's status come from this thread, so they never race each other.
    """

    TICK = 0.1

    def __init__(self, kubelet: FakeKubelet, pod: JSON) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.kubelet = kubelet
        self.api = kubelet.api
        self.settings = kubelet.settings
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.node: str = pod["spec"]["nodeName"]
        self._pod = pod
        self._pod_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_now = threading.Event()
        self._proc_lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None

        self.ip = kubelet.ips.allocate()
        self.start_time = now_iso()
        self.dir = kubelet.state_dir / "pods" / self.namespace / f"{self.pod_name}-{self.uid[:8]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pidfile = kubelet.state_dir / "pids" / f"{self.uid}.pid"

        spec = pod["spec"]
        self.container: JSON = spec["containers"][0]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.log_path = self.dir / f"{self.container['name']}.log"

        # Container state machine.
        self.env: dict[str, str] = {}
        self.waiting: tuple[str, str] | None = ("ContainerCreating", "")
        self.started_at: str | None = None
        self.started_mono = 0.0
        self.last_terminated: JSON | None = None
        self.terminated: JSON | None = None  # final state, for restartPolicy Never/OnFailure
        self.restart_count = 0
        self.starts = 0
        self.next_start = 0.0
        self.backoff = 0.0
        self.image_failed_at: float | None = None
        self.ready = False
        self.probe_state: dict[str, JSON] = {}
        self.container_id = ""
        self.conditions: dict[str, tuple[str, str]] = {}
        self._published: str | None = None
        self._events_sent: set[str] = set()
        self._event_counts: dict[str, int] = {}

    # --- interface for the kubelet ---------------------------------------------------------------------

    def update(self, pod: JSON) -> None:
        """Hand the runner the newest version of its pod."""
        with self._pod_lock:
            self._pod = pod
        self._wake.set()

    def stop_and_kill(self, grace: float = 1.0) -> None:
        """Stop the runner and its process without touching the API (the pod is gone, or we shut down)."""
        self._stop_now.set()
        self._wake.set()
        self.kill_process(grace)

    # --- thread body -----------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stop_now.is_set():
                with self._pod_lock:
                    pod = self._pod
                if pod["metadata"].get("deletionTimestamp"):
                    self._finish_deletion(pod)
                    return
                self._step(time.monotonic())
                if not self._publish():
                    return
                self._wake.wait(self.TICK)
                self._wake.clear()
        except Exception:
            log.exception("runner of %s/%s failed", self.namespace, self.pod_name)
        finally:
            self.kill_process(0.5)
            self.kubelet.forget(self.uid)

    # --- the state machine -----------------------------------------------------------------------------

    def _step(self, now: float) -> None:
        if self.terminated is not None:
            return
        image = self.container.get("image", "")
        if any(fnmatch.fnmatchcase(image, p) for p in self.settings.bad_image_patterns):
            self._image_pull_failure(image, now)
            return
        if not self.container.get("command"):
            # The image (and so its entrypoint) is not known here: only an explicit command can run.
            self.waiting = (
                "CreateContainerError",
                "fake kubelet: the container has no command; images are not run, so the command must be set",
            )
            self._event_once("nocommand", "Warning", "Failed", f"Error: {self.waiting[1]}")
            return
        with self._proc_lock:
            proc = self.proc
        if proc is None:
            if now >= self.next_start:
                self._start(now)
            return
        code = proc.poll()
        if code is None:
            self._probe("readinessProbe", now)
            self._probe("livenessProbe", now)
            return
        self._on_exit(code, now)

    def _image_pull_failure(self, image: str, now: float) -> None:
        # Like the real kubelet: one ErrImagePull, then ImagePullBackOff between retries.
        if self.image_failed_at is None:
            self.image_failed_at = now
            message = (
                f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": '
                f"{image}: not found"
            )
            self.waiting = ("ErrImagePull", message)
            self._event("Normal", "Pulling", f'Pulling image "{image}"')
            self._event("Warning", "Failed", f'Failed to pull image "{image}": {message}')
            self._event("Warning", "Failed", "Error: ErrImagePull")
        elif now - self.image_failed_at > 1.0 and self.waiting and self.waiting[0] == "ErrImagePull":
            self.waiting = ("ImagePullBackOff", f'Back-off pulling image "{image}"')
            self._event("Normal", "BackOff", f'Back-off pulling image "{image}"')
            self._event("Warning", "Failed", "Error: ImagePullBackOff")

    def _start(self, now: float) -> None:
        try:
            self.env = self._build_env()
        except (ContainerConfigError, ApiException) as exc:
            # ApiException: e.g. the Secret cannot be read (RBAC, API hiccup); retried like a missing one.
            self.waiting = ("CreateContainerConfigError", str(exc))
            self._event_once(f"config:{exc}", "Warning", "Failed", f"Error: {exc}")
            self.next_start = now + 1.0
            return
        argv = [expand_vars(a, self.env) for a in (self.container.get("command") or [])]
        argv += [expand_vars(a, self.env) for a in (self.container.get("args") or [])]
        workdir = self.container.get("workingDir")
        cwd = workdir if workdir and os.path.isdir(workdir) else str(self.dir)
        if self.starts > 0:
            self.restart_count += 1
        self.starts += 1
        self.container_id = f"fake://{uuid.uuid4().hex}"
        self.probe_state = {}
        self.ready = False
        with open(self.log_path, "ab") as logf:
            try:
                with self._proc_lock:
                    if self._stop_now.is_set():
                        return
                    # Own process group, so a whole process tree can be signalled at once.
                    self.proc = subprocess.Popen(
                        argv,
                        env=self.env,
                        cwd=cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=logf,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                    self.pidfile.write_text(str(self.proc.pid))
            except OSError as exc:
                # Exec failure: the real kubelet reports it as a terminated container with exit code 128.
                logf.write(f"fake-kubelet: cannot start {argv!r}: {exc}\n".encode())
                self.started_at = now_iso()
                self._record_exit(128, "StartError", f"failed to start container: {exc}", now)
                return
        self.started_at = now_iso()
        self.started_mono = now
        self.waiting = None
        log.info(
            "started %s/%s pid %s on %s: %s", self.namespace, self.pod_name, self.proc.pid, self.ip, argv
        )
        self._event("Normal", "Started", f"Started container {self.container['name']}")

    def _on_exit(self, code: int, now: float) -> None:
        with self._proc_lock:
            proc = self.proc
            self.proc = None
        if proc is not None:
            # The leader is gone; whatever it left behind in its group goes too.
            _signal_group(proc.pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        reason = "Completed" if code == 0 else "Error"
        if code < 0:
            reason, code = "Error", 128 - code  # killed by a signal: shells report 128 + signal number
        self._record_exit(code, reason, "", now)

    def _record_exit(self, code: int, reason: str, message: str, now: float) -> None:
        state: JSON = {
            "exitCode": code,
            "reason": reason,
            "startedAt": self.started_at,
            "finishedAt": now_iso(),
            "containerID": self.container_id,
        }
        if message:
            state["message"] = message
        self.ready = False
        log.info("%s/%s exited with %s (%s)", self.namespace, self.pod_name, code, reason)
        restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0)
        if not restart:
            self.terminated = state
            self.waiting = None
            return
        self.last_terminated = state
        # Back-off doubles on each crash; a container that ran for a while starts from scratch again.
        ran = now - self.started_mono if self.started_mono else 0.0
        if ran > 2 * self.settings.backoff_max:
            self.backoff = 0.0
        self.backoff = (
            self.settings.backoff_base
            if self.backoff == 0
            else min(self.backoff * 2, self.settings.backoff_max)
        )
        self.next_start = now + self.backoff
        msg = (
            f"back-off {self.backoff:g}s restarting failed container={self.container['name']} "
            f"pod={self.pod_name}_{self.namespace}({self.uid})"
        )
        self.waiting = ("CrashLoopBackOff", msg)
        self._event("Warning", "BackOff", "Back-off restarting failed container")

    # --- probes ----------------------------------------------------------------------------------------

    def _probe(self, kind: str, now: float) -> None:
        probe = self.container.get(kind)
        if not probe:
            if kind == "readinessProbe":
                self.ready = True
            return
        cap = self.settings.max_probe_period
        st = self.probe_state.setdefault(kind, {"next": 0.0, "ok": 0, "fail": 0})
        if now - self.started_mono < min(float(probe.get("initialDelaySeconds") or 0), cap):
            return
        if now < st["next"]:
            return
        st["next"] = now + min(float(probe.get("periodSeconds") or 10), cap)
        ok, detail = self._run_probe(probe)
        if ok:
            st["ok"] += 1
            st["fail"] = 0
        else:
            st["fail"] += 1
            st["ok"] = 0
        success_needed = int(probe.get("successThreshold") or 1)
        failures_allowed = int(probe.get("failureThreshold") or 3)
        if kind == "readinessProbe":
            if ok and st["ok"] >= success_needed:
                self.ready = True
            elif not ok and st["fail"] >= failures_allowed:
                if self.ready:
                    self._event("Warning", "Unhealthy", f"Readiness probe failed: {detail}")
                self.ready = False
        elif not ok and st["fail"] >= failures_allowed:
            self._event("Warning", "Unhealthy", f"Liveness probe failed: {detail}")
            self._event("Normal", "Killing", "Container failed liveness probe, will be restarted")
            self.kill_process(self._grace())

    def _run_probe(self, probe: JSON) -> tuple[bool, str]:
        timeout = float(probe.get("timeoutSeconds") or 1)
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                host = get.get("host") or self.ip
                port = self._port(get.get("port"))
                conn: http.client.HTTPConnection
                if str(get.get("scheme", "HTTP")).upper() == "HTTPS":
                    conn = http.client.HTTPSConnection(
                        host, port, timeout=timeout, context=ssl._create_unverified_context()
                    )
                else:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                try:
                    headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                    headers.setdefault("User-Agent", "kube-probe/1.20")
                    conn.request("GET", get.get("path") or "/", headers=headers)
                    status = conn.getresponse().status
                finally:
                    conn.close()
                return 200 <= status < 400, f"HTTP probe failed with statuscode: {status}"
            if "tcpSocket" in probe:
                tcp = probe["tcpSocket"]
                port = self._port(tcp.get("port"))
                with socket.create_connection((tcp.get("host") or self.ip, port), timeout=timeout):
                    return True, ""
            if "exec" in probe:
                argv = probe["exec"].get("command") or []
                done = subprocess.run(
                    argv, env=self.env, cwd=str(self.dir), capture_output=True, timeout=timeout
                )
                out = (done.stdout + done.stderr).decode(errors="replace").strip()
                return done.returncode == 0, out
        except (OSError, subprocess.SubprocessError, http.client.HTTPException, ValueError) as exc:
            return False, str(exc)
        return True, ""

    def _port(self, port: Any) -> int:
        """Resolve a probe port: a number or the name of one of the container's ports."""
        if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
            return int(port)
        for p in self.container.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"unknown port {port!r}")

    # --- environment -----------------------------------------------------------------------------------

    def _build_env(self) -> dict[str, str]:
        """The process environment: the kubelet's own, then envFrom, then env, then HOST/POD_IP forced."""
        env = dict(self.kubelet.base_env)
        env["HOSTNAME"] = self.pod_name
        with self._pod_lock:
            pod = self._pod
        cache: dict[tuple[str, str], JSON | None] = {}
        for src in self.container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind in ("secretRef", "configMapRef"):
                ref = src.get(kind)
                if not ref:
                    continue
                data = self._source(kind, ref["name"], cache)
                if data is None:
                    if ref.get("optional"):
                        continue
                    raise ContainerConfigError(f'{_kind_word(kind)} "{ref["name"]}" not found')
                for key, value in data.items():
                    env[prefix + key] = value
        for item in self.container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand_vars(item.get("value", ""), env)
                continue
            value = self._value_from(item["valueFrom"], pod, cache)
            if value is not None:
                env[name] = value
        # The contract of this fake: a server binds to HOST, the pod's own loopback address. It is forced
        # even if the pod sets HOST (e.g. 0.0.0.0), since pods sharing one address would clash on ports.
        env["HOST"] = self.ip
        env["POD_IP"] = self.ip
        return env

    def _source(self, kind: str, name: str, cache: dict[tuple[str, str], JSON | None]) -> JSON | None:
        """Decoded data of a Secret or ConfigMap in the pod's namespace, None when it does not exist."""
        key = (kind, name)
        if key not in cache:
            try:
                if kind.startswith("secret"):
                    secret = self.api.read_namespaced_secret(name, self.namespace)
                    cache[key] = {
                        k: base64.b64decode(v).decode(errors="replace")
                        for k, v in (secret.data or {}).items()
                    }
                else:
                    cm = self.api.read_namespaced_config_map(name, self.namespace)
                    cache[key] = dict(cm.data or {})
            except ApiException as exc:
                if exc.status != 404:
                    raise
                cache[key] = None
        return cache[key]

    def _value_from(self, src: JSON, pod: JSON, cache: dict[tuple[str, str], JSON | None]) -> str | None:
        for kind in ("secretKeyRef", "configMapKeyRef"):
            ref = src.get(kind)
            if not ref:
                continue
            data = self._source(kind, ref["name"], cache)
            word = _kind_word(kind)
            if data is None:
                if ref.get("optional"):
                    return None
                raise ContainerConfigError(f'{word} "{ref["name"]}" not found')
            if ref["key"] not in data:
                if ref.get("optional"):
                    return None
                raise ContainerConfigError(
                    f"couldn't find key {ref['key']} in {word} {self.namespace}/{ref['name']}"
                )
            return str(data[ref["key"]])
        if "fieldRef" in src:
            return self._field(src["fieldRef"]["fieldPath"], pod)
        if "resourceFieldRef" in src:
            res = src["resourceFieldRef"]["resource"]
            group, _, name = res.partition(".")
            return str((self.container.get("resources") or {}).get(group, {}).get(name, "0"))
        return None

    def _field(self, path: str, pod: JSON) -> str:
        meta = pod["metadata"]
        simple = {
            "metadata.name": meta.get("name"),
            "metadata.namespace": meta.get("namespace"),
            "metadata.uid": meta.get("uid"),
            "spec.nodeName": pod["spec"].get("nodeName"),
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName"),
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "status.hostIP": "127.0.0.1",
        }
        if path in simple:
            return str(simple[path] or "")
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        return ""

    # --- status ----------------------------------------------------------------------------------------

    def _container_status(self) -> JSON:
        c = self.container
        status: JSON = {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": "",
            "restartCount": self.restart_count,
            "ready": False,
            "started": False,
        }
        if self.terminated is not None:
            status["state"] = {"terminated": self.terminated}
            status["containerID"] = self.terminated["containerID"]
        elif self.waiting is not None:
            waiting = {"reason": self.waiting[0]}
            if self.waiting[1]:
                waiting["message"] = self.waiting[1]
            status["state"] = {"waiting": waiting}
        else:
            status["state"] = {"running": {"startedAt": self.started_at}}
            status["ready"] = self.ready
            status["started"] = True
            status["containerID"] = self.container_id
            status["imageID"] = f"fake-image://{c.get('image', '')}"
        if self.last_terminated is not None:
            status["lastState"] = {"terminated": self.last_terminated}
        return status

    def _condition(self, ctype: str, ok: bool, reason: str = "", message: str = "") -> JSON:
        value = "True" if ok else "False"
        prev = self.conditions.get(ctype)
        if prev is None or prev[0] != value:
            self.conditions[ctype] = (value, now_iso())
        # Explicit nulls: the status is sent as a strategic merge patch, which merges a condition with the
        # old one of its type, so a stale reason/message would otherwise outlive the state it explained.
        cond: JSON = {
            "type": ctype,
            "status": value,
            "lastTransitionTime": self.conditions[ctype][1],
            "reason": reason if not ok and reason else None,
            "message": message if not ok and message else None,
        }
        return cond

    def _status(self) -> JSON:
        with self._pod_lock:
            spec = self._pod["spec"]
        main = self._container_status()
        statuses = [main]
        # Only the first container runs; the others are reported as running and ready.
        for c in spec["containers"][1:]:
            statuses.append(
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": f"fake-image://{c.get('image', '')}",
                    "containerID": f"fake://{self.uid}-{c['name']}",
                    "restartCount": 0,
                    "ready": True,
                    "started": True,
                    "state": {"running": {"startedAt": self.start_time}},
                }
            )
        init_statuses = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": f"fake-image://{c.get('image', '')}",
                "containerID": f"fake://{self.uid}-{c['name']}",
                "restartCount": 0,
                "ready": True,
                "state": {
                    "terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "startedAt": self.start_time,
                        "finishedAt": self.start_time,
                    }
                },
            }
            for c in spec.get("initContainers") or []
        ]
        if self.terminated is not None:
            phase = "Succeeded" if self.terminated["exitCode"] == 0 else "Failed"
        elif self.starts > 0:
            phase = "Running"
        else:
            phase = "Pending"
        ready = bool(main["ready"])
        unready = f"containers with unready status: [{main['name']}]"
        not_ready_reason = "PodCompleted" if self.terminated is not None else "ContainersNotReady"
        if self.terminated is not None:
            unready = ""
        status: JSON = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("Initialized", True),
                self._condition("ContainersReady", ready, not_ready_reason, unready),
                self._condition("Ready", ready, not_ready_reason, unready),
            ],
            "containerStatuses": statuses,
        }
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        return status

    def _publish(self) -> bool:
        """Send the status if it changed; False when the pod no longer exists."""
        status = self._status()
        encoded = json.dumps(status, sort_keys=True)
        if encoded == self._published:
            return True
        try:
            self.api.patch_namespaced_pod_status(
                self.pod_name, self.namespace, {"status": status}, _content_type=STRATEGIC
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            log.warning("status of %s/%s: %s %s", self.namespace, self.pod_name, exc.status, exc.reason)
            return True
        self._published = encoded
        return True

    # --- events ----------------------------------------------------------------------------------------

    def _event(self, type_: str, reason: str, message: str) -> None:
        """Record a core/v1 Event about the pod, as the kubelet does (best effort).

        A repeated event (a container crashing for minutes) is sent the first three times and then at
        powers of two only: the real kubelet aggregates repeats, and the API server need not store them all.
        """
        key = f"{reason}\0{message}"
        count = self._event_counts[key] = self._event_counts.get(key, 0) + 1
        if count > 3 and count & (count - 1):
            return
        stamp = now_iso()
        body: Any = {
            "metadata": {"generateName": f"{self.pod_name}.", "namespace": self.namespace},
            "involvedObject": {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": self.pod_name,
                "namespace": self.namespace,
                "uid": self.uid,
                "fieldPath": f"spec.containers{{{self.container['name']}}}",
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": "kubelet", "host": self.node},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.api.create_namespaced_event(self.namespace, body)
        except ApiException as exc:
            log.debug("event for %s/%s: %s", self.namespace, self.pod_name, exc.status)

    def _event_once(self, key: str, type_: str, reason: str, message: str) -> None:
        if key not in self._events_sent:
            self._events_sent.add(key)
            self._event(type_, reason, message)

    # --- termination -----------------------------------------------------------------------------------

    def _grace(self) -> float:
        with self._pod_lock:
            pod = self._pod
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        return min(float(grace), self.settings.max_grace)

    def kill_process(self, grace: float) -> None:
        """SIGTERM the process group and SIGKILL it after ``grace`` seconds (the next step sees the exit)."""
        with self._proc_lock:
            proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=max(grace, 0.0))
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def _finish_deletion(self, pod: JSON) -> None:
        with self._proc_lock:
            running = self.proc is not None
        if running:
            self._event("Normal", "Killing", f"Stopping container {self.container['name']}")
        self.kill_process(self._grace())
        with self._proc_lock:
            self.proc = None
        self.pidfile.unlink(missing_ok=True)
        log.info("deleting %s/%s", self.namespace, self.pod_name)
        try:
            options: Any = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
            self.api.delete_namespaced_pod(
                self.pod_name, self.namespace, grace_period_seconds=0, body=options
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("delete %s/%s: %s %s", self.namespace, self.pod_name, exc.status, exc.reason)


def get_json(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> JSON:
    """Call a ``kubernetes`` client read/list method and return the raw JSON object.

    Raw JSON keeps the API's camelCase field names (the same shape watch events have) and skips building
    model objects.
    """
    resp = fn(*args, _preload_content=False, **kwargs)
    try:
        data: JSON = json.loads(resp.data)
    finally:
        resp.release_conn()
    return data


def _kind_word(kind: str) -> str:
    return "secret" if kind.startswith("secret") else "configmap"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class FakeKubelet:
    """Registers the nodes, watches their pods and runs one PodRunner per live pod.

    Args:
        api: Core v1 API of the cluster.
        nodes: The nodes to impersonate.
        settings: Behaviour knobs.
        state_dir: Where pod logs (``pods/<ns>/<name>-<uid8>/<container>.log``) and pid files
            (``pids/<uid>.pid``, one process-group id each) are written.
        kubeconfig: Given to pod processes as ``KUBECONFIG`` (they have no in-cluster service account
            mount), so code in a pod can reach the cluster with ``load_kube_config()``.
    """

    def __init__(
        self,
        api: client.CoreV1Api,
        nodes: list[NodeConfig],
        settings: KubeletSettings,
        state_dir: Path,
        kubeconfig: str | None = None,
    ) -> None:
        self.api = api
        self.nodes = nodes
        self.node_names = {n.name for n in nodes}
        self.settings = settings
        self.state_dir = state_dir
        (state_dir / "pids").mkdir(parents=True, exist_ok=True)
        self.ips = IpAllocator(settings.ip_prefix)
        self.runners: dict[str, PodRunner] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._boot = now_iso()
        # Pods see the environment of the kubelet, with the Python running it first on PATH, so `python`
        # in a pod command is the test environment's interpreter.
        self.base_env = dict(os.environ)
        py_dir = os.path.dirname(sys.executable)
        self.base_env["PATH"] = py_dir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
        self.base_env.pop("KUBECONFIG", None)
        if kubeconfig:
            self.base_env["KUBECONFIG"] = str(Path(kubeconfig).resolve())

    # --- nodes -----------------------------------------------------------------------------------------

    def register_nodes(self) -> None:
        """Create (or adopt) every node, set it Ready and lift the not-ready taint."""
        for node in self.nodes:
            body: Any = {
                "metadata": {"name": node.name, "labels": node.node_labels()},
                "spec": {"taints": node.taints} if node.taints else {},
            }
            try:
                self.api.create_node(body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                self.api.patch_node(
                    node.name, {"metadata": {"labels": node.node_labels()}}, _content_type=MERGE
                )
            self._node_status(node)
            current = get_json(self.api.read_node, node.name)
            taints = [t for t in current["spec"].get("taints") or [] if t["key"] not in NOT_READY_TAINTS]
            self.api.patch_node(node.name, {"spec": {"taints": taints or None}}, _content_type=MERGE)
            log.info("node %s registered: %s", node.name, node.capacity())

    def _node_status(self, node: NodeConfig) -> None:
        stamp = now_iso()

        def cond(ctype: str, value: str, reason: str, message: str) -> JSON:
            return {
                "type": ctype,
                "status": value,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": self._boot,
            }

        status = {
            "capacity": node.capacity(),
            "allocatable": node.capacity(),
            "conditions": [
                cond(
                    "MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory"
                ),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond(
                    "PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"
                ),
                cond("Ready", "True", "KubeletReady", "fake kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": node.name},
            ],
            "nodeInfo": {
                "machineID": node.name,
                "systemUUID": node.name,
                "bootID": self._boot,
                "kernelVersion": os.uname().release,
                "osImage": "gpufn fake node",
                "containerRuntimeVersion": "fake://1.0",
                "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.api.patch_node_status(node.name, {"status": status}, _content_type=STRATEGIC)

    def heartbeat_forever(self) -> None:
        """Refresh every node's status periodically (a deleted node is not re-created)."""
        while not self.stopping.wait(self.settings.heartbeat):
            for node in self.nodes:
                try:
                    self._node_status(node)
                except ApiException as exc:
                    if exc.status != 404:
                        log.warning("heartbeat of %s: %s %s", node.name, exc.status, exc.reason)
                except Exception as exc:
                    log.warning("heartbeat of %s: %s", node.name, exc)

    # --- pods ------------------------------------------------------------------------------------------

    def forget(self, uid: str) -> None:
        """Called by a runner whose pod is gone."""
        with self._lock:
            self.runners.pop(uid, None)

    def handle(self, kind: str, pod: JSON) -> None:
        """React to one watch event (or listed pod) about a pod."""
        node = (pod.get("spec") or {}).get("nodeName")
        if node not in self.node_names:
            return
        uid = pod["metadata"]["uid"]
        with self._lock:
            runner = self.runners.get(uid)
            if kind == "DELETED":
                self.runners.pop(uid, None)
            elif runner is None and not self.stopping.is_set():
                # A pod that finished before this kubelet saw it (e.g. a restart of the kubelet) stays done,
                # unless it is being deleted: only a kubelet can finish that.
                finished = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
                if finished and not pod["metadata"].get("deletionTimestamp"):
                    return
                runner = PodRunner(self, pod)
                self.runners[uid] = runner
                runner.start()
                return
        if runner is None:
            return
        if kind == "DELETED":
            # Deleted behind our back (e.g. a forced delete): the process must not outlive the pod.
            threading.Thread(target=runner.stop_and_kill, daemon=True).start()
        else:
            runner.update(pod)

    def watch_forever(self) -> None:
        """List then watch all pods, re-listing after any watch failure."""
        while not self.stopping.is_set():
            try:
                listed = get_json(self.api.list_pod_for_all_namespaces)
                seen = set()
                for pod in listed["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self.handle("ADDED", pod)
                # Pods that vanished while no watch was open.
                with self._lock:
                    gone = [r for uid, r in self.runners.items() if uid not in seen]
                for runner in gone:
                    self.handle(
                        "DELETED", {"metadata": {"uid": runner.uid}, "spec": {"nodeName": runner.node}}
                    )
                w = watch.Watch()
                for event in w.stream(
                    self.api.list_pod_for_all_namespaces,
                    resource_version=listed["metadata"]["resourceVersion"],
                    timeout_seconds=300,
                    deserialize=False,
                ):
                    if self.stopping.is_set():
                        w.stop()
                        break
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self.handle(event["type"], event["object"])
            except Exception as exc:
                if self.stopping.is_set():
                    return
                log.warning("pod watch: %s; re-listing", exc)
                time.sleep(0.5)

    def shutdown(self) -> None:
        """Stop every pod process (in parallel, briefly graceful); pods are left as they are in the API."""
        self.stopping.set()
        with self._lock:
            runners = list(self.runners.values())
        threads = [threading.Thread(target=r.stop_and_kill, args=(1.0,)) for r in runners]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)


def teardown_cluster(cluster_dir: Path) -> None:
    """Kill the process groups listed in ``components.pgids`` (SIGTERM, then SIGKILL) and remove the dir."""
    pgids: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        pgids = [int(x) for x in (cluster_dir / "components.pgids").read_text().split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in pgids:
            _signal_group(pgid, sig)
        time.sleep(1.0)
    shutil.rmtree(cluster_dir, ignore_errors=True)


def load_config(path: str | None) -> tuple[list[NodeConfig], KubeletSettings]:
    """Nodes and settings from a JSON file ``{"nodes": [...], "settings": {...}}`` (both optional)."""
    data: JSON = json.loads(Path(path).read_text()) if path else {}
    nodes = [NodeConfig.from_dict(n) for n in data.get("nodes") or []] or list(DEFAULT_NODES)
    settings = KubeletSettings.from_dict(data.get("settings") or {})
    return nodes, settings


def dump_config(nodes: list[NodeConfig], settings: JSON | None = None) -> str:
    """The JSON text of a config file for ``--config``."""
    return json.dumps({"nodes": [asdict(n) for n in nodes], "settings": settings or {}}, indent=2)


def main(argv: list[str] | None = None) -> int:
    """Run the fake kubelet until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--config", help="JSON file with nodes and settings")
    parser.add_argument(
        "--parent-pid",
        type=int,
        help="tear the whole cluster down if this process (the test run) dies without stopping it",
    )
    parser.add_argument(
        "--cluster-dir",
        type=Path,
        help="cluster state dir: components.pgids lists process groups to kill on teardown; then removed",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(threadName)s %(message)s",
    )
    # The kubernetes client logs every urllib3 retry loudly; the kubelet reports what matters itself.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    # The test cluster's kubeconfig skips TLS verification on purpose (loopback only).
    warnings.filterwarnings("ignore", message="Unverified HTTPS request")

    nodes, settings = load_config(args.config)
    cfg = client.Configuration()
    config.load_kube_config(config_file=args.kubeconfig, client_configuration=cfg)
    # One connection per busy pod runner, plus the watch: the default pool (cpu_count * 5) is too small.
    cfg.connection_pool_maxsize = 64
    api = client.CoreV1Api(client.ApiClient(cfg))
    kubelet = FakeKubelet(api, nodes, settings, args.state_dir, args.kubeconfig)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    orphaned = threading.Event()
    if args.parent_pid:

        def guard() -> None:
            # A test run killed with SIGKILL runs no clean-up; the kubelet, in its own session, outlives it
            # and is reparented, which is how it notices.
            while not stop.wait(1.0):
                if os.getppid() != args.parent_pid:
                    orphaned.set()
                    stop.set()

        threading.Thread(target=guard, name="orphan-guard", daemon=True).start()

    # The harness starts the kubelet together with the API server, to overlap their start-up: retry until
    # the API server answers.
    deadline = time.monotonic() + 120
    while True:
        try:
            kubelet.register_nodes()
            break
        except Exception as exc:
            if stop.is_set() or time.monotonic() > deadline:
                raise
            log.debug("registering nodes: %s", exc)
            time.sleep(0.2)
    threading.Thread(target=kubelet.heartbeat_forever, name="heartbeat", daemon=True).start()
    threading.Thread(target=kubelet.watch_forever, name="watch", daemon=True).start()
    log.info("fake kubelet running for %s", ", ".join(sorted(kubelet.node_names)))
    stop.wait()
    log.info("shutting down")
    kubelet.shutdown()
    if orphaned.is_set() and args.cluster_dir:
        log.warning("process %s that started the cluster is gone: tearing the cluster down", args.parent_pid)
        teardown_cluster(args.cluster_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
