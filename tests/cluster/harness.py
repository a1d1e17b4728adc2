"""A throw-away Kubernetes 1.20 cluster on loopback: etcd, the control plane, and a real node.

``TestCluster`` boots etcd, kube-apiserver, kube-controller-manager and kube-scheduler from the binaries that
``build.sh`` caches, and a real node (``RealNodeConfig``, see ``node.py``): containerd and a kubelet running
real containers, pulling images from a local registry (``docker-registry`` on loopback) that the cluster
starts and fills with images built on this machine (``images.py``).

Every port is picked free at start, every file lives in one temporary directory, and ``stop()`` kills every
process the cluster started (pods included), removes the real node's cgroups and bridge and the directory.

Usage::

    with TestCluster() as cluster:
        v1 = kubernetes.client.CoreV1Api(cluster.api_client())
        ...

Run ``python -m tests.cluster.harness`` from the repository root to boot one by hand; it prints the
kubeconfig path and waits for Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from kubernetes import client

from gpufn.kube_inventory import read_json
from tests.registry.servers import RegistryServer

from .device_plugin import FakeGpuDevicePlugin
from .images import PAUSE_TAG, ensure_images, push, write_pause_layout
from .node import RealNode, RealNodeConfig, pick_subnet, reap_stale_nodes
from .relay import Target, TcpRelay

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
REQUIRED_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
    "pause",
    "helm",
)


class ClusterError(RuntimeError):
    """The cluster could not be built, booted or reached."""


def cache_dir() -> Path:
    """Where ``build.sh`` keeps the binaries: ``$GPUFN_KUBE_CACHE`` or ``~/.cache/gpufn/kube-1.20.2-r2``.

    The ``-rN`` suffix versions the cache (bump it with ``build.sh``'s when the build changes).
    """
    env = os.environ.get("GPUFN_KUBE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gpufn" / "kube-1.20.2-r2"


def helm_environment(home: Path) -> dict[str, str]:
    """Return this process's environment with helm's cache, config and data homes under ``home``."""
    env = dict(os.environ)
    env.update(
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
    )
    return env


def binaries_present(bin_dir: Path | None = None) -> bool:
    """Whether every binary the cluster needs is in ``bin_dir`` (default: the cache's ``bin/``)."""
    bin_dir = bin_dir or cache_dir() / "bin"
    return all(os.access(bin_dir / name, os.X_OK) for name in REQUIRED_BINARIES)


def ensure_binaries() -> Path:
    """Run ``build.sh`` when a binary is missing (minutes, once per machine) and return the bin directory.

    Raises:
        ClusterError: The build failed.
    """
    bin_dir = cache_dir() / "bin"
    if not binaries_present(bin_dir) or shutil.which("openssl") is None:
        done = subprocess.run(["bash", str(BUILD_SCRIPT)], check=False)
        if done.returncode != 0 or not binaries_present(bin_dir):
            raise ClusterError(f"{BUILD_SCRIPT} failed (exit {done.returncode})")
    return bin_dir


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now.

    The kernel picks them, so parallel clusters do not collide; all are held open together so that the
    kernel cannot hand out one port twice.
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


class TestCluster:
    """A local Kubernetes 1.20 cluster with one real GPU node; a context manager.

    Args:
        real_node: What the real node (containerd + kubelet, with a local registry) advertises; default
            ``RealNodeConfig()``. See ``node.py``.
        bin_dir: Directory of the binaries; default the ``build.sh`` cache.
        keep: Keep the state directory after ``stop()`` for post-mortems; default from ``GPUFN_KUBE_KEEP=1``.
        boot_timeout: Seconds allowed for the whole boot.

    Attributes:
        workdir: Temporary directory holding all state and logs (``logs/<component>.log``).
        kubeconfig_path: Kubeconfig with the admin token (``insecure-skip-tls-verify``, so helm and kubectl
            work without the CA); set once started.
        api_url: ``https://127.0.0.1:<port>`` of the API server.
        token: Static bearer token of an admin in ``system:masters``.
        ca_cert_path: Certificate of the API server (self-signed; also the cluster's root CA).
        helm_path: The helm v3 binary.
        registry_host: ``127.0.0.1:<port>`` of the local registry.
        node: The real node, once started.
    """

    # Keep pytest from collecting this class when a test module imports it.
    __test__ = False

    def __init__(
        self,
        *,
        real_node: RealNodeConfig | None = None,
        bin_dir: Path | None = None,
        keep: bool | None = None,
        boot_timeout: float = 90.0,
    ) -> None:
        self.real_node = real_node or RealNodeConfig()
        self.node: RealNode | None = None
        self.device_plugin: FakeGpuDevicePlugin | None = None
        self.registry: RegistryServer | None = None
        self.registry_host = ""
        self._pushed: set[str] = set()
        self.bin_dir = bin_dir or cache_dir() / "bin"
        self.keep = keep if keep is not None else os.environ.get("GPUFN_KUBE_KEEP") == "1"
        self.boot_timeout = boot_timeout
        self.workdir = Path()
        self.kubeconfig_path = Path()
        self.ca_cert_path = Path()
        self.api_url = ""
        self.token = secrets.token_hex(16)
        self.helm_path = self.bin_dir / "helm"
        self.boot_seconds = 0.0
        # (what was waited for, seconds since start) for each boot milestone: shows where a slow boot went.
        self.boot_phases: list[tuple[str, float]] = []
        self._t0 = 0.0
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._started = False
        self._subnet: ipaddress.IPv4Network | None = None
        self._relays: list[TcpRelay] = []
        self._pod_api_url = ""

    # --- lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> TestCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> TestCluster:
        """Boot every component and wait until pods can be scheduled and run.

        Returns:
            The cluster itself.

        Raises:
            ClusterError: A binary is missing, a component died, or the boot timed out. Whatever had
                started is stopped again before raising.
        """
        if self._started:
            return self
        missing = [b for b in REQUIRED_BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        if missing:
            raise ClusterError(f"missing {', '.join(missing)} in {self.bin_dir}: run bash {BUILD_SCRIPT}")
        t0 = self._t0 = time.monotonic()
        # Real nodes of test processes that were killed before they could clean up.
        reap_stale_nodes()
        self.workdir = Path(tempfile.mkdtemp(prefix="gpufn-kube-"))
        self._started = True
        # Whatever happens to the test process, do not leave a control plane (or pod processes) behind.
        atexit.register(self.stop)
        try:
            self._boot(t0 + self.boot_timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - t0
        return self

    def _boot(self, deadline: float) -> None:
        wd = self.workdir
        (wd / "logs").mkdir()
        pki = wd / "pki"
        pki.mkdir()

        etcd_port, peer_port, api_port = _free_ports(3)
        # The real node's pod network is chosen now: its node IP is in the API server's certificate, so pods
        # can verify it when they reach it through ``pod_api_url``.
        self._subnet = pick_subnet()
        names = "IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc"
        names += f",IP:{self._subnet.network_address + 1}"
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=gpufn",
                f"--data-dir={wd / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=gpufn={peer_url}",
                # A test cluster's data is thrown away: fsync only costs time.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

        # Keys while etcd starts. One self-signed certificate serves the API and is the root CA that the
        # controller-manager puts into service-account token Secrets.
        self._openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
        self._openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
        self._openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-keyout", str(pki / "tls.key"), "-out", str(pki / "tls.crt"),
            "-subj", "/CN=gpufn-test-cluster",
            "-addext", f"subjectAltName={names}",
        )  # fmt: skip
        self.ca_cert_path = pki / "tls.crt"
        (pki / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')

        self.api_url = f"https://127.0.0.1:{api_port}"
        self.kubeconfig_path = wd / "kubeconfig"
        self._write_kubeconfig()

        self._wait(lambda: _tcp_open(etcd_port), deadline, "etcd to listen")
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                "--insecure-port=0",
                f"--cert-dir={wd / 'apiserver'}",
                f"--tls-cert-file={pki / 'tls.crt'}",
                f"--tls-private-key-file={pki / 'tls.key'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16",
                # No kubelets or kube-proxy exist: nothing may try to reach node or master addresses.
                "--endpoint-reconciler-type=none",
                "--kubelet-preferred-address-types=InternalIP",
                "--enable-priority-and-fairness=false",
                "--allow-privileged=true",
                "--profiling=false",
            ],
        )
        # The kubelet starts while the API server does; it retries until it answers.
        self._start_real_node(self.real_node)

        # The controller-manager and scheduler wait (a bounded time) for the API server's health themselves:
        # starting them once it serves HTTPS, rather than once it is ready, overlaps their start-up with its
        # post-start hooks. (Its port accepts connections long before it serves, so that is no signal.)
        self._wait(lambda: self._apiserver_ready(any_answer=True), deadline, "kube-apiserver to serve")
        self._start_controllers(pki)
        self._wait(self._apiserver_ready, deadline, "kube-apiserver /readyz")

        with self.api_client() as api_client:
            api = client.CoreV1Api(api_client)
            self._wait(lambda: self._nodes_ready(api), deadline, "nodes to be Ready and untainted")
            # Pods are refused until the ServiceAccount controller has made the default token Secret.
            self._wait(
                lambda: self._sa_token_ready(api, "default"), deadline, "the default service account token"
            )

    def _start_real_node(self, config: RealNodeConfig) -> None:
        """Start the local registry (with the sandbox image in it), containerd and the kubelet."""
        wd = self.workdir
        self.registry = RegistryServer(wd / "registry").start()
        self.registry_host = self.registry.host
        write_pause_layout(self.bin_dir / "pause", wd / "pause-image")
        sandbox_image = f"{self.registry_host}/{PAUSE_TAG}"
        push(wd / "pause-image", PAUSE_TAG, sandbox_image)
        self._pushed.add(PAUSE_TAG)
        self.node = RealNode(
            wd / "node",
            bin_dir=self.bin_dir,
            kubeconfig=self.kubeconfig_path,
            registry_host=self.registry_host,
            sandbox_image=sandbox_image,
            config=config,
            spawn=self._spawn,
            subnet=self._subnet,
        )
        kubelet_port, healthz_port, stream_port = _free_ports(3)
        self.node.start((kubelet_port, healthz_port, stream_port))
        if config.device_plugin:
            self.device_plugin = FakeGpuDevicePlugin(self.node.device_plugin_dir, config.name, config.gpus)
            self.device_plugin.start()

    def image(self, tag: str) -> str:
        """The registry reference of a built image (``echo:1``...), copying it into the registry on first use.

        Raises:
            ClusterError: The cluster has no registry (no real node).
        """
        if self.registry is None:
            raise ClusterError("images need a real node: TestCluster(real_node=RealNodeConfig())")
        reference = f"{self.registry_host}/{tag}"
        if tag not in self._pushed:
            push(ensure_images(), tag, reference)
            self._pushed.add(tag)
        return reference

    def image_without_layers(self, tag: str, repository: str) -> str:
        """Make ``repository:<tag's tag>`` in the registry: a built image given a config of its own (so no
        node has it yet), then take its blobs away.

        The registry still serves the manifest (so the reference resolves to a digest), but the config and
        every layer are unknown to that repository: a real pull fails, as it does when a registry lost an
        image's blobs.

        Raises:
            ClusterError: The cluster has no registry (no real node).
        """
        self.image(tag)
        assert self.registry is not None
        source, version = tag.rsplit(":", 1)
        base = f"http://{self.registry_host}/v2"
        oci = "application/vnd.oci.image.manifest.v1+json"

        def call(method: str, path: str, body: bytes | None = None, content_type: str = "") -> Any:
            url = path if path.startswith("http") else f"{base}/{path}"
            request = urllib.request.Request(url, data=body, method=method)
            request.add_header("Accept", oci)
            if content_type:
                request.add_header("Content-Type", content_type)
            with urllib.request.urlopen(request, timeout=30) as response:
                location = response.headers.get("Location") or ""
                data = response.read()
            return location if method == "POST" else data

        manifest = json.loads(call("GET", f"{source}/manifests/{version}"))
        config = json.loads(call("GET", f"{source}/blobs/{manifest['config']['digest']}"))
        config.setdefault("config", {}).setdefault("Labels", {})["gpufn.test/unique"] = secrets.token_hex(8)
        config_bytes = json.dumps(config).encode()
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        for layer in manifest["layers"]:
            call("POST", f"{repository}/blobs/uploads/?mount={layer['digest']}&from={source}", b"")
        upload = call("POST", f"{repository}/blobs/uploads/", b"")
        if upload.startswith("/"):
            upload = f"http://{self.registry_host}{upload}"
        separator = "&" if "?" in upload else "?"
        call("PUT", f"{upload}{separator}digest={config_digest}", config_bytes, "application/octet-stream")
        manifest["config"] = {**manifest["config"], "digest": config_digest, "size": len(config_bytes)}
        call("PUT", f"{repository}/manifests/{version}", json.dumps(manifest).encode(), oci)
        links = self.registry.workdir / "storage/docker/registry/v2/repositories" / repository / "_layers"
        shutil.rmtree(links)
        return f"{self.registry_host}/{repository}:{version}"

    def _start_controllers(self, pki: Path) -> None:
        wd = self.workdir
        controller_manager = [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig_path}",
            "--leader-elect=false",
            # Off: the harness lifts the not-ready taint itself (see _adopt_real_node).
            "--controllers=*,-nodelifecycle",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'tls.crt'}",
            "--port=0",
            "--secure-port=0",
            "--profiling=false",
            # Else it creates a directory under /usr/libexec; nothing may live outside the state dir.
            f"--flex-volume-plugin-dir={wd / 'flexvolume'}",
        ]
        scheduler = [
            str(self.bin_dir / "kube-scheduler"),
            f"--kubeconfig={self.kubeconfig_path}",
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
        ]
        self._spawn("kube-controller-manager", controller_manager)
        self._spawn("kube-scheduler", scheduler)

    def stop(self) -> None:
        """Kill every process started (kubelets and their pods first), then remove the state directory.

        Raises:
            NodeError: The real node left processes or cgroups that could not be removed (after the rest
                was stopped).
        """
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        node_error: Exception | None = None
        for relay in self._relays:
            relay.stop()
        self._relays.clear()
        if self.device_plugin is not None:
            self.device_plugin.stop()
            self.device_plugin = None
        if self.node is not None:
            try:
                self.node.stop()
            except Exception as exc:
                node_error = exc
        if self.registry is not None:
            self.registry.stop()
        for _name, proc in reversed(self._procs):
            _stop_group(proc, timeout=5)
        self._procs.clear()
        if self.keep:
            print(f"test cluster state kept in {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if node_error is not None:
            raise node_error

    # --- clients and helpers ---------------------------------------------------------------------------

    def relay(self, target: Target, port: int = 0) -> str:
        """Make ``target()`` (a ``(host, port)`` looked up per connection) reachable from pods: a relay on
        the node IP (``port``, 0 for any), stopped with the cluster. Returns its ``node_ip:port``.

        Raises:
            ClusterError: The cluster has no real node.
        """
        if self.node is None:
            raise ClusterError("relays need a real node: TestCluster(real_node=RealNodeConfig())")
        relay = TcpRelay(self.node.node_ip, target, port).start()
        self._relays.append(relay)
        return relay.address

    def pod_api_url(self) -> str:
        """The API server's URL for pods: ``https://<node IP>:<port>``, a relay to 127.0.0.1, where it listens
        (there is no kube-proxy to route the ``kubernetes`` Service). Its certificate names the node IP, so
        pods verify it with their service account's ``ca.crt``. The relay's port is not the API server's:
        tests/kubernetes/test_isolation.py checks that a function pod cannot reach that one on the node IP."""
        if not self._pod_api_url:
            port = int(self.api_url.rsplit(":", 1)[1])
            self._pod_api_url = f"https://{self.relay(lambda: ('127.0.0.1', port))}"
        return self._pod_api_url

    def client_configuration(self) -> client.Configuration:
        """A ``kubernetes`` client configuration for the admin token, verifying the server certificate."""
        cfg = client.Configuration(
            host=self.api_url,
            api_key={"BearerToken": self.token},
            api_key_prefix={"BearerToken": "Bearer"},
            ssl_ca_cert=str(self.ca_cert_path),
        )
        cfg.connection_pool_maxsize = 32
        return cfg

    def api_client(self) -> client.ApiClient:
        """A new synchronous ``kubernetes.client.ApiClient`` for the cluster (close it when done)."""
        return client.ApiClient(self.client_configuration())

    def helm_env(self) -> dict[str, str]:
        """Environment for running helm against the cluster, with helm's homes inside the state dir."""
        env = helm_environment(self.workdir / "helm")
        env["KUBECONFIG"] = str(self.kubeconfig_path)
        return env

    def create_namespace(self, name: str, timeout: float = 30.0) -> None:
        """Create a namespace and wait until pods can be created in it (its default token exists)."""
        with self.api_client() as api_client:
            api = client.CoreV1Api(api_client)
            namespace: Any = {"metadata": {"name": name}}
            api.create_namespace(namespace)
            self._wait(
                lambda: self._sa_token_ready(api, name), time.monotonic() + timeout, f"token in {name}"
            )

    def pod_log(self, namespace: str, pod: str, container: str | None = None) -> str:
        """A pod container's output, through ``kubectl logs`` (empty when it never started)."""
        which = ["-c", container] if container else []
        with contextlib.suppress(ClusterError):
            return self.kubectl("logs", "-n", namespace, pod, *which)
        return ""

    def kubectl(self, *args: str, timeout: float = 30.0) -> str:
        """Run the cluster's kubectl (logs and exec dial the node's kubelet) and return its output.

        Raises:
            ClusterError: kubectl failed.
        """
        done = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig_path}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def pod_environ(self, namespace: str, pod: str, container: str | None = None) -> list[str]:
        """The environment of a real pod's main process (its ``/proc/1/environ``, through kubectl exec)."""
        which = ["-c", container] if container else []
        text = self.kubectl("exec", "-n", namespace, pod, *which, "--", "cat", "/proc/1/environ")
        return [entry for entry in text.split("\0") if entry]

    def component_log(self, name: str) -> str:
        """Log of a component: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd..."""
        path = self.workdir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- internals -------------------------------------------------------------------------------------

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(self.workdir / "logs" / f"{name}.log", "wb") as log:
            # Own session and process group: stop() can signal a component and everything it forked.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._procs.append((name, proc))
        # reap_stale_nodes() kills these groups should the test process die without stop().
        pgids = " ".join(str(p.pid) for _, p in self._procs)
        (self.workdir / "components.pgids").write_text(pgids + "\n")
        return proc

    def _openssl(self, *args: str) -> None:
        done = subprocess.run(["openssl", *args], capture_output=True, check=False)
        if done.returncode != 0:
            raise ClusterError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace')}")

    def _write_kubeconfig(self) -> None:
        # JSON is valid YAML, so no YAML library is needed.
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "gpufn-test", "cluster": {"server": self.api_url, "insecure-skip-tls-verify": True}}
            ],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "gpufn-test",
                    "context": {"cluster": "gpufn-test", "user": "admin", "namespace": "default"},
                }
            ],
            "current-context": "gpufn-test",
        }
        self.kubeconfig_path.write_text(json.dumps(kubeconfig, indent=2))
        self.kubeconfig_path.chmod(0o600)

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        """Poll ``ready`` until true; fail fast when a component died, or at ``deadline``."""
        while True:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise ClusterError(
                        f"{name} exited with {proc.returncode} while waiting for {what}:\n{self._tail(name)}"
                    )
            try:
                if ready():
                    self.boot_phases.append((what, round(time.monotonic() - self._t0, 2)))
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}:\n{self._tail(n)}" for n, _ in self._procs)
                raise ClusterError(f"timed out waiting for {what}\n{tails}")
            time.sleep(0.1)

    def _tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.component_log(name).splitlines()[-lines:])

    def _apiserver_ready(self, any_answer: bool = False) -> bool:
        """Whether ``/readyz`` says ready; with ``any_answer``, whether the server answers HTTPS at all."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert_path))
        req = urllib.request.Request(
            f"{self.api_url}/readyz", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError:
            return any_answer
        except (urllib.error.URLError, OSError):
            return False

    def _nodes_ready(self, api: client.CoreV1Api) -> bool:
        wanted = {self.real_node.name}
        for node in read_json(api.list_node)["items"]:
            if node["metadata"]["name"] == self.real_node.name:
                if not self._adopt_real_node(api, node):
                    continue
            conditions = node.get("status", {}).get("conditions") or []
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            tainted = any(
                t["key"] == "node.kubernetes.io/not-ready" for t in node["spec"].get("taints") or []
            )
            if ready and not tainted:
                wanted.discard(node["metadata"]["name"])
        return not wanted

    def _adopt_real_node(self, api: client.CoreV1Api, node: dict[str, Any]) -> bool:
        """Once the real node is Ready: see to its GPUs and lift the not-ready taint.

        Returns whether the node advertises its GPUs. With the device plugin (the default) the kubelet puts
        them into the node's capacity itself, as on a GPU node; without it (``device_plugin=False``, the
        fallback) the capacity is patched into the node status. The taint is what the nodelifecycle
        controller would lift; it is off in this cluster.
        """
        conditions = node.get("status", {}).get("conditions") or []
        if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return False
        name = node["metadata"]["name"]
        gpus = str(self.real_node.gpus)
        advertised = node["status"].get("capacity", {}).get("nvidia.com/gpu") == gpus
        if not advertised and not self.real_node.device_plugin:
            body: Any = {
                "status": {"capacity": {"nvidia.com/gpu": gpus}, "allocatable": {"nvidia.com/gpu": gpus}}
            }
            api.patch_node_status(name, body)
            advertised = True
        taints = node["spec"].get("taints") or []
        kept = [t for t in taints if t["key"] != "node.kubernetes.io/not-ready"]
        if len(kept) != len(taints):
            api.patch_node(name, {"spec": {"taints": kept}})
        return advertised

    @staticmethod
    def _sa_token_ready(api: client.CoreV1Api, namespace: str) -> bool:
        return any(
            s.get("type") == "kubernetes.io/service-account-token"
            and (s["metadata"].get("annotations") or {}).get("kubernetes.io/service-account.name")
            == "default"
            for s in read_json(api.list_namespaced_secret, namespace)["items"]
        )


def _tcp_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a process group, SIGKILL it after ``timeout`` seconds, and reap the leader."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        break
    # The leader is gone; anything else left in its group is not wanted either.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    """Boot a cluster, print how to reach it, and keep it up until Ctrl-C."""
    ensure_binaries()
    with TestCluster() as cluster:
        print(f"cluster up in {cluster.boot_seconds:.1f} s")
        print(f"export KUBECONFIG={cluster.kubeconfig_path}")
        print(f"helm: {cluster.helm_path}")
        print(f"state and logs: {cluster.workdir}")
        print("Ctrl-C to stop")
        # Blocked only now: children inherit the signal mask, and they must stay killable.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
