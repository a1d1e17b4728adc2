"""The chart lints, renders the objects gpufn needs, and its settings are what `Settings` reads."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from activities.registry import RegistryConfig, RegistryCredential
from gpufn.sealing import SecretBox
from gpufn.settings import Settings
from tests.platform_chart.conftest import CHART, REQUIRED, Helm, container, env_of, find, write_values


def test_lint(helm: Helm, tmp_path: Path) -> None:
    done = helm.run("lint", "--strict", str(CHART), "-f", str(write_values(tmp_path, REQUIRED)))
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image": {"repository": "r"}}, "temporal.address is required"),
        ({"temporal": {"address": "t:7233"}}, "image.repository is required"),
    ],
)
def test_required_values(helm: Helm, tmp_path: Path, values: dict[str, Any], message: str) -> None:
    done = helm.run("template", "g", str(CHART), "-f", str(write_values(tmp_path, values)), check=False)
    assert done.returncode != 0
    assert message in done.stderr


def test_default_objects(helm: Helm, tmp_path: Path) -> None:
    objects = helm.template({}, tmp_path)

    assert sorted((o["kind"], o["metadata"]["name"]) for o in objects) == [
        ("ClusterRole", "gpufn-gpufn"),
        ("ClusterRoleBinding", "gpufn-gpufn"),
        ("ConfigMap", "gpufn-config"),
        ("ConfigMap", "gpufn-in-cluster-kubeconfig"),
        ("Deployment", "gpufn-worker"),
        ("Secret", "gpufn-secrets"),
        ("Service", "gpufn-api"),
        ("Service", "gpufn-api-headless"),
        ("ServiceAccount", "gpufn"),
        ("StatefulSet", "gpufn-api"),
    ]
    api, worker = find(objects, "StatefulSet"), find(objects, "Deployment")
    assert container(api)["image"] == container(worker)["image"] == "registry.example.com/gpufn:1.2.3"
    assert container(api)["command"] == ["python", "-m", "api"]
    assert container(worker)["command"] == ["python", "-m", "worker"]
    assert api["spec"]["serviceName"] == "gpufn-api-headless"
    assert find(objects, "Service", "gpufn-api-headless")["spec"]["clusterIP"] == "None"


def test_settings_the_processes_read(helm: Helm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = helm.template(
        {
            "temporal": {
                "address": "temporal-frontend.temporal:7233",
                "namespace": "gpufn",
                "taskQueue": "q",
            },
            "config": {"GPUFN_DEPLOY_TIMEOUT": 1800},
            "registry": {
                "credentials": {"nvcr.io": {"username": "$oauthtoken", "password": "nvapi-x"}},
                "insecure": ["registry.lan:5000"],
            },
        },
        tmp_path,
    )
    config = find(objects, "ConfigMap", "gpufn-config")["data"]
    secret = {k: base64.b64decode(v).decode() for k, v in find(objects, "Secret")["data"].items()}
    for name, value in {**config, **secret, **env_of(find(objects, "Deployment"))}.items():
        monkeypatch.setenv(name, value)

    settings = Settings()
    assert settings.temporal_target == "temporal-frontend.temporal:7233"
    assert (settings.temporal_namespace, settings.task_queue) == ("gpufn", "q")
    assert settings.deploy_timeout == 1800
    assert settings.kubeconfigs == [Path("/etc/gpufn/in-cluster/kubeconfig")]
    assert settings.gateway_urls == [
        "http://gpufn-api-0.gpufn-api-headless.gpufn.svc:8080",
        "http://gpufn-api-1.gpufn-api-headless.gpufn.svc:8080",
    ]
    assert settings.resolved_admin_key().startswith("nvapi-")
    SecretBox(settings.resolved_secret_key())  # a valid 32-byte key
    registries = RegistryConfig.from_settings(settings)
    assert registries.credential_for("nvcr.io") == RegistryCredential("$oauthtoken", "nvapi-x")
    assert registries.scheme_for("registry.lan:5000") == "http"


def test_gateway_urls_follow_api_replicas_and_tls(helm: Helm, tmp_path: Path) -> None:
    objects = helm.template(
        {"api": {"replicas": 3, "port": 9000, "tls": {"secretName": "gpufn-tls"}}}, tmp_path, "ns"
    )

    urls = json.loads(env_of(find(objects, "Deployment"))["GPUFN_GATEWAY_URLS"])
    assert urls == [f"https://gpufn-api-{i}.gpufn-api-headless.ns.svc:9000" for i in range(3)]
    api = find(objects, "StatefulSet")
    assert api["spec"]["replicas"] == 3
    # The replicas know each other too: status polls are forwarded, rate limits shared.
    assert json.loads(env_of(api)["GPUFN_GATEWAY_URLS"]) == urls
    assert env_of(api)["GPUFN_TLS_CERT"] == "/etc/gpufn/tls/tls.crt"
    assert {"name": "tls", "secret": {"secretName": "gpufn-tls"}} in api["spec"]["template"]["spec"][
        "volumes"
    ]
    # Scaling the API changes the workers' pod template, so they roll onto the new replica list.
    assert (
        find(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]["gpufn.io/api-replicas"]
        == "3"
    )


def test_existing_secret_replaces_the_chart_secret(helm: Helm, tmp_path: Path) -> None:
    objects = helm.template({"secrets": {"existingSecret": "mine"}}, tmp_path)

    assert not [o for o in objects if o["kind"] == "Secret"]
    for workload in (find(objects, "StatefulSet"), find(objects, "Deployment")):
        assert {"secretRef": {"name": "mine"}} in container(workload)["envFrom"]


def test_given_keys_are_used_and_the_secret_is_kept_on_uninstall(helm: Helm, tmp_path: Path) -> None:
    key = base64.urlsafe_b64encode(bytes(range(32))).decode()
    secret = find(
        helm.template({"secrets": {"adminKey": "nvapi-given", "secretKey": key}}, tmp_path), "Secret"
    )

    assert base64.b64decode(secret["data"]["GPUFN_ADMIN_KEY"]).decode() == "nvapi-given"
    assert base64.b64decode(secret["data"]["GPUFN_SECRET_KEY"]).decode() == key
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_commands_and_working_dirs_can_be_overridden(helm: Helm, tmp_path: Path) -> None:
    objects = helm.template(
        {
            "api": {"command": ["/venv/bin/python", "-m", "api"], "workingDir": "/src", "host": "$(POD_IP)"},
            "worker": {
                "command": ["/venv/bin/python", "-m", "worker"],
                "args": ["-X", "dev"],
                "workingDir": "/src",
            },
        },
        tmp_path,
    )
    api, worker = container(find(objects, "StatefulSet")), container(find(objects, "Deployment"))
    assert (api["command"], api["workingDir"]) == (["/venv/bin/python", "-m", "api"], "/src")
    assert (worker["command"], worker["args"]) == (["/venv/bin/python", "-m", "worker"], ["-X", "dev"])
    # POD_IP is declared before GPUFN_API_HOST, so Kubernetes expands $(POD_IP) in it.
    names = [e["name"] for e in api["env"]]
    assert names.index("POD_IP") < names.index("GPUFN_API_HOST")


def test_kubeconfigs_and_in_cluster(helm: Helm, tmp_path: Path) -> None:
    objects = helm.template(
        {
            "inCluster": {"enabled": False},
            "kubeconfigs": {"secretName": "gpu-clusters", "files": ["east.yaml", "west.yaml"]},
        },
        tmp_path,
    )

    config = find(objects, "ConfigMap", "gpufn-config")["data"]
    assert json.loads(config["GPUFN_KUBECONFIGS"]) == [
        "/etc/gpufn/kubeconfigs/east.yaml",
        "/etc/gpufn/kubeconfigs/west.yaml",
    ]
    assert not [o for o in objects if o["metadata"]["name"] == "gpufn-in-cluster-kubeconfig"]
    for workload in (find(objects, "StatefulSet"), find(objects, "Deployment")):
        pod = workload["spec"]["template"]["spec"]
        # Without the in-cluster backend nothing in the pods talks to this cluster's API.
        assert pod["automountServiceAccountToken"] is False
        assert {"name": "kubeconfigs", "secret": {"secretName": "gpu-clusters"}} in pod["volumes"]


def test_cluster_role_covers_function_objects(helm: Helm, tmp_path: Path) -> None:
    objects = helm.template(
        {"rbac": {"extraRules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]}]}},
        tmp_path,
    )
    rules = find(objects, "ClusterRole")["rules"]
    granted = {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }

    needed = {
        ("", "namespaces", "create"),
        ("", "nodes", "list"),
        ("", "serviceaccounts", "get"),
        ("", "serviceaccounts", "patch"),
        ("networking.k8s.io", "networkpolicies", "create"),
        ("", "pods", "watch"),
        ("", "pods", "deletecollection"),
        ("", "pods/log", "get"),
        ("", "secrets", "create"),
        ("", "secrets", "patch"),
        ("", "secrets", "deletecollection"),
        ("", "services", "create"),
        ("", "events", "list"),
        ("", "endpoints", "list"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("apps", "deployments", "patch"),
        ("apps", "deployments", "deletecollection"),
        ("apps", "replicasets", "deletecollection"),
        ("batch", "jobs", "get"),
    }
    assert needed <= granted
    binding = find(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gpufn", "namespace": "gpufn"}]


def test_rbac_can_be_left_out(helm: Helm, tmp_path: Path) -> None:
    objects = helm.template({"rbac": {"create": False}, "serviceAccount": {"create": False}}, tmp_path)
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "ServiceAccount")]
    assert find(objects, "StatefulSet")["spec"]["template"]["spec"]["serviceAccountName"] == "default"
