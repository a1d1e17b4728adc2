"""Function pods are hardened and their namespaces isolated: what gpufn creates in a real API server.

The test cluster's network (the CNI bridge plugin of its real node) does not enforce NetworkPolicy, so these
tests assert the objects that a cluster whose network plugin enforces it acts on (docs/kubernetes.md,
"Isolation"); the API server validates them (a malformed policy is refused). What the node itself enforces is
checked from inside a running function pod: no token, not root, no privilege escalation, no way to the
host's loopback services. The pure tests at the end check the policy for
every combination of settings without a cluster.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from activities.kube.config import KubeSettings
from activities.kube.manifests import network_policy_manifest, pod_security
from activities.kube.names import deployment_name, namespace_name
from gpufn.kube_inventory import read_json
from tests.cluster.harness import TestCluster
from tests.conftest import ADMIN_KEY, Stack, echo_function, running_stack
from tests.kubernetes.conftest import START_TIMEOUT, gpu_spec, stack_settings
from tests.lifecycle.helpers import create, deploy, deployment_path, undeploy, wait_running

GATEWAY_NAMESPACE = "gpufn-platform"
GATEWAY_CIDR = "192.0.2.0/24"


@pytest.fixture(scope="module")
async def isolated_stack(
    temporal_address: str, kube_cluster: TestCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """A gpufn stack on the test cluster, told that its gateways run in GATEWAY_NAMESPACE and GATEWAY_CIDR."""
    async with running_stack(
        temporal_address,
        tmp_path_factory.mktemp("gpufn-isolation-home"),
        kubeconfigs=[Path(kube_cluster.kubeconfig_path)],
        instance_start_timeout=START_TIMEOUT,
        kube_gateway_namespace=GATEWAY_NAMESPACE,
        kube_gateway_cidrs=[GATEWAY_CIDR],
        **stack_settings(kube_cluster),
    ) as stack:
        yield stack


def peers_allow_other_namespaces(peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the peers of a policy rule that admit pods of namespaces other than the policy's own (and of
    the gateway's namespace)."""
    leaks = []
    for peer in peers:
        if "ipBlock" in peer:
            continue
        selector = peer.get("namespaceSelector")
        if selector is None:
            continue  # podSelector alone: the policy's own namespace
        if selector.get("matchLabels") == {"kubernetes.io/metadata.name": GATEWAY_NAMESPACE}:
            continue
        if peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"}:
            continue  # DNS, checked with its ports below
        leaks.append(peer)
    return leaks


async def test_function_pods_run_hardened_in_isolated_account_namespaces(
    echo_fields: dict[str, Any], isolated_stack: Stack, kube_api: client.ApiClient, group: str
) -> None:
    core, networking = client.CoreV1Api(kube_api), client.NetworkingV1Api(kube_api)
    function = await create(isolated_stack, echo_function("k8s-hardened", **echo_fields))
    await deploy(isolated_stack, function, gpu_spec(group))
    try:
        [instance] = (await wait_running(isolated_stack, function, 1, timeout=60))["instances"]
        namespace = namespace_name("gpufn-", function["ncaId"])

        # The pod as the API server admitted it: no token mounted (the ServiceAccount admission plugin adds a
        # token volume to every pod that does not refuse it), no privilege, a non-root user, seccomp.
        pod = read_json(core.read_namespaced_pod, instance["instanceId"], namespace)
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert not [v for v in spec.get("volumes") or [] if "secret" in v or "projected" in v]
        assert spec["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        [container] = spec["containers"]
        assert not container.get("volumeMounts")
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
        }

        # The namespace: Pod Security admission's baseline, a default account that mounts no token, and the
        # NetworkPolicy that isolates its pods.
        labels = read_json(core.read_namespace, namespace)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
        assert (
            read_json(core.read_namespaced_service_account, "default", namespace)[
                "automountServiceAccountToken"
            ]
            is False
        )
        policy = read_json(networking.read_namespaced_network_policy, "gpufn-isolation", namespace)["spec"]
        assert policy["podSelector"] == {} and policy["policyTypes"] == ["Ingress", "Egress"]
        [ingress] = policy["ingress"]
        assert "ports" not in ingress
        assert ingress["from"] == [
            {"podSelector": {}},
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": GATEWAY_NAMESPACE}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/component": "api"}},
            },
            {"ipBlock": {"cidr": GATEWAY_CIDR}},
        ]
        own, dns, outside = policy["egress"]
        assert own == {"to": [{"podSelector": {}}]}
        assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
        assert not peers_allow_other_namespaces(ingress["from"] + dns["to"] + outside["to"])
        blocks = {peer["ipBlock"]["cidr"]: set(peer["ipBlock"]["except"]) for peer in outside["to"]}
        # Cluster and private networks (where the Temporal frontend, the API's internal ports and the other
        # accounts' pods live) and the cloud's metadata service are out of reach.
        assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= blocks["0.0.0.0/0"]
        assert {"fc00::/7", "fe80::/10"} <= blocks["::/0"]

        # The Deployment's template carries the same hardening (every pod it makes is hardened).
        apps = client.AppsV1Api(kube_api)
        template = read_json(
            apps.read_namespaced_deployment, deployment_name(function["versionId"], 0), namespace
        )["spec"]["template"]["spec"]
        assert template["automountServiceAccountToken"] is False
        assert template["securityContext"]["runAsNonRoot"] is True
    finally:
        await undeploy(isolated_stack, function)


async def test_each_account_gets_its_own_isolated_namespace(
    echo_fields: dict[str, Any], isolated_stack: Stack, kube_api: client.ApiClient, group: str
) -> None:
    core, networking = client.CoreV1Api(kube_api), client.NetworkingV1Api(kube_api)
    token = await isolated_stack.create_key("other-account", ["register_function", "deploy_function"])
    other_http = isolated_stack.http
    headers = isolated_stack.headers(token)
    response = await other_http.post(
        "/v2/nvcf/functions",
        json=echo_function("k8s-other-account", **echo_fields),
        headers=headers,
    )
    assert response.status_code == 200, response.text
    other = response.json()["function"]
    mine = await create(isolated_stack, echo_function("k8s-my-account", **echo_fields))
    assert other["ncaId"] != mine["ncaId"]
    response = await other_http.post(deployment_path(other), json=gpu_spec(group), headers=headers)
    assert response.status_code == 200, response.text
    try:
        await deploy(isolated_stack, mine, gpu_spec(group))
        await wait_running(isolated_stack, mine, 1, timeout=60)
        namespaces = {namespace_name("gpufn-", f["ncaId"]) for f in (other, mine)}
        assert len(namespaces) == 2
        for namespace in namespaces:
            # Each namespace's policy admits only its own pods and the gateways: the other account is out.
            spec = read_json(networking.read_namespaced_network_policy, "gpufn-isolation", namespace)["spec"]
            assert not peers_allow_other_namespaces(spec["ingress"][0]["from"])
            assert spec["egress"][0] == {"to": [{"podSelector": {}}]}
            labels = read_json(core.read_namespace, namespace)["metadata"]["labels"]
            assert labels["app.kubernetes.io/managed-by"] == "gpufn"
    finally:
        # Pods outlive this module's stack: give their GPUs back to the other tests.
        response = await other_http.delete(deployment_path(other), headers=headers)
        assert response.status_code == 200, response.text
        await undeploy(isolated_stack, mine)


HOSTILE_PROBE = """
import json, os, socket, sys
found = {"uid": os.getuid(), "gid": os.getgid()}
found["token"] = [p for p in ("/var/run/secrets/kubernetes.io/serviceaccount/token",
                              "/run/secrets/kubernetes.io/serviceaccount/token") if os.path.exists(p)]
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
found["no_new_privs"] = status["NoNewPrivs"].strip()
found["cap_eff"] = status["CapEff"].strip()
found["environ"] = dict(os.environ)
commands = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            commands.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
        except OSError:
            pass
found["processes"] = commands
reached = []
for host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), timeout=2).close()
        reached.append(f"{host}:{port}")
    except OSError:
        pass
found["reached"] = reached
print(json.dumps(found))
"""
"""What a hostile function would try from inside its pod: the account token, its environment, /proc, and
the platform's ports (Temporal's, the API's, the cluster's registry and API server) on the node's address and
on loopback. Run in the function's own container (kubectl exec: same user, same security context)."""


async def test_a_hostile_function_finds_no_token_and_reaches_no_platform_port(
    echo_fields: dict[str, Any],
    isolated_stack: Stack,
    kube_cluster: TestCluster,
    temporal_address: str,
    group: str,
) -> None:
    function = await create(isolated_stack, echo_function("k8s-hostile", **echo_fields))
    await deploy(isolated_stack, function, gpu_spec(group))
    try:
        [instance] = (await wait_running(isolated_stack, function, 1, timeout=60))["instances"]
        namespace = namespace_name("gpufn-", function["ncaId"])
        assert kube_cluster.node is not None
        node_ip = kube_cluster.node.node_ip
        platform_ports = {
            "temporal": int(temporal_address.rsplit(":", 1)[1]),
            "api": int(isolated_stack.api_url.rsplit(":", 1)[1]),
            "registry": int(kube_cluster.registry_host.rsplit(":", 1)[1]),
            "kube-apiserver": int(kube_cluster.api_url.rsplit(":", 1)[1]),
        }
        # Each port really listens on the host (so "not reached" means the pod cannot get there).
        for port in platform_ports.values():
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        targets = [[host, port] for host in (node_ip, "127.0.0.1") for port in platform_ports.values()]
        output = await asyncio.to_thread(
            kube_cluster.kubectl,
            "exec", "-n", namespace, instance["instanceId"], "--",
            "python3", "-c", HOSTILE_PROBE, json.dumps(targets),
        )  # fmt: skip
        found = json.loads(output)
        assert found["token"] == []
        assert (found["uid"], found["gid"]) == (1000, 1000)
        assert found["no_new_privs"] == "1"
        assert int(found["cap_eff"], 16) == 0
        assert found["reached"] == [], f"the function reached {found['reached']} of {platform_ports}"
        # Its environment holds nothing of the platform: no key, no address of Temporal or the API.
        leaked = [
            f"{name}={value}"
            for name, value in found["environ"].items()
            if ADMIN_KEY in value or temporal_address in value or isolated_stack.api_url in value
        ]
        assert leaked == []
        # /proc shows its own processes only (its own PID namespace): no kubelet, containerd or platform.
        assert found["processes"] and all(
            "kubelet" not in c and "containerd" not in c and "temporal" not in c and "worker" not in c
            for c in found["processes"]
        ), found["processes"]
    finally:
        await undeploy(isolated_stack, function)


# --- No cluster needed ------------------------------------------------------------------------------


def test_root_is_allowed_only_when_the_operator_says_so() -> None:
    assert pod_security(0) == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert pod_security(4242)["runAsUser"] == 4242 and pod_security(4242)["runAsNonRoot"] is True


def test_policy_without_gateway_settings_admits_only_the_namespace_itself() -> None:
    policy = network_policy_manifest("gpufn-acct", KubeSettings(egress_denied_cidrs=("10.0.0.0/8",)))
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]
    outside = policy["spec"]["egress"][2]["to"]
    # An address family with nothing denied is open as a whole.
    assert outside == [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}},
        {"ipBlock": {"cidr": "::/0"}},
    ]
