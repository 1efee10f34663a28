"""The Kubernetes manifests (deploy/kubernetes), rendered the way `kubectl apply -k` renders
them (tests/deploy/manifests.py). Every object is validated
against Kubernetes' own schemas for one pinned version (kubernetes-validate, strict: an
unknown or misspelt field fails), and checked for what schemas cannot see: probes and
resources on every container, images pinned by tag, Secret references that resolve, the
ports the router listens on against the Services, and every flag in a container's args
against the real `pdserve router` / `pdserve worker` parsers, so the manifests cannot drift
from the CLI. What needs a cluster (scheduling, probes against a running image, whether the
CNI enforces NetworkPolicy) is not tested here: docs/deploy.md says so.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pdserve import cli
from pdserve.worker.liveness import LivenessFile
from tests.deploy.manifests import (
    ADMIN_KEY,
    API_KEY,
    OVERLAY_ROLES,
    ROOT,
    containers,
    flag,
    of_kind,
    pod_spec,
)

KUBERNETES_VERSION = "1.33.0"  # the oldest minor version the manifests promise (docs/deploy.md)
POD_SAFE = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def the_secret(objects: list[dict]) -> dict:
    (secret,) = of_kind(objects, "Secret").values()
    return secret


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[name]


def router_args(objects: list[dict]) -> list[str]:
    return pod_spec(of_kind(objects, "Deployment")["pdserve-router"])["containers"][0]["args"]


# ---- the tests ---------------------------------------------------------------------------

pytestmark = pytest.mark.parametrize("overlay", sorted(OVERLAY_ROLES))


def test_every_object_validates_against_the_kubernetes_schemas(rendered, overlay):
    for obj in rendered[overlay]:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message}")


def test_the_overlay_holds_the_router_and_one_deployment_per_role(rendered, overlay):
    objects = rendered[overlay]
    workers = {f"pdserve-worker-{role}" for role in OVERLAY_ROLES[overlay]}
    assert set(of_kind(objects, "Deployment")) == {"pdserve-router", *workers}
    assert set(of_kind(objects, "Service")) == {"pdserve-api", "pdserve-router"}
    assert set(of_kind(objects, "NetworkPolicy")) == {"pdserve-router", "pdserve-worker"}
    assert the_secret(objects)["metadata"]["name"].startswith("pdserve-secrets-")  # hashed
    for name in workers:
        role = name.rsplit("-", 1)[1]
        args = pod_spec(of_kind(objects, "Deployment")[name])["containers"][0]["args"]
        assert flag(args, "--role") == role
    assert flag(router_args(objects), "--mode") == overlay


def test_every_container_has_probes_resources_and_no_privileges(rendered, overlay):
    for name, container in containers(rendered[overlay]):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in container, f"{name} has no {probe}"
    for name, container in containers(rendered[overlay], init=True):
        resources = container["resources"]
        assert set(resources["requests"]) == {"cpu", "memory"}, name
        assert "memory" in resources["limits"], name
        assert container["securityContext"] == POD_SAFE, name
    for deployment in of_kind(rendered[overlay], "Deployment").values():
        assert pod_spec(deployment)["securityContext"]["runAsNonRoot"] is True
        assert pod_spec(deployment)["automountServiceAccountToken"] is False


def test_workers_have_guaranteed_whole_cores_matching_their_threads(rendered, overlay):
    for name, container in containers(rendered[overlay]):
        if container["name"] != "worker":
            continue
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], name  # Guaranteed QoS
        cpus = resources["limits"]["cpu"]
        assert cpus.isdigit() and flag(container["args"], "--threads") == cpus, name


def test_images_are_pinned_to_the_package_version(rendered, overlay):
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    expected = f"pdserve:{version.group(1)}"
    for name, container in containers(rendered[overlay], init=True):
        assert container["image"] == expected, name


def test_secret_references_resolve_to_the_generated_secret(rendered, overlay):
    secret = the_secret(rendered[overlay])
    name, keys = secret["metadata"]["name"], set(secret["data"])
    assert keys == {"api-key", "admin-key", "cluster.key"}
    for deployment in of_kind(rendered[overlay], "Deployment").values():
        for volume in pod_spec(deployment)["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["secretName"] == name
                assert {item["key"] for item in volume["secret"]["items"]} <= keys
    refs = [
        env["valueFrom"]["secretKeyRef"]
        for _, container in containers(rendered[overlay], init=True)
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    ]
    assert {(ref["name"], ref["key"]) for ref in refs} == {(name, "api-key"), (name, "admin-key")}


def test_keys_reach_the_router_through_the_environment_never_argv(rendered, overlay):
    router = pod_spec(of_kind(rendered[overlay], "Deployment")["pdserve-router"])["containers"][0]
    env = {e["name"]: e for e in router["env"]}
    assert env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "api-key"
    assert env["PDSERVE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "admin-key"
    for name, container in containers(rendered[overlay], init=True):
        text = yaml.safe_dump([container.get("args", []), container.get("env", [])])
        assert API_KEY not in text and ADMIN_KEY not in text, name
        assert "--api-key" not in container.get("args", []), name


def test_the_cluster_key_is_a_private_in_memory_copy(rendered, overlay):
    """The Secret's files are 0440 under fsGroup, which pdserve refuses: an init container
    copies the key, 0600, into a memory-backed emptyDir that the server reads."""
    for name, deployment in of_kind(rendered[overlay], "Deployment").items():
        spec = pod_spec(deployment)
        (init,) = spec["initContainers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
        key_path = flag(spec["containers"][0]["args"], "--cluster-key")
        assert init["command"][:3] == ["install", "-m", "0600"], name
        assert init["command"][-1] == key_path, name
        assert volumes[mounts[str(Path(key_path).parent)]]["emptyDir"]["medium"] == "Memory"
        source = Path(init["command"][3])
        secret_volume = volumes[mounts[str(source.parent)]]["secret"]
        assert secret_volume["defaultMode"] == 0o440, name  # octal survived the YAML round trip


def test_container_args_are_flags_the_cli_accepts(rendered, overlay):
    for name, container in containers(rendered[overlay]):
        command, *args = container["args"]
        parser = subcommand(command)
        given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
        unknown = given - set(parser._option_string_actions)  # no prefix abbreviations
        assert not unknown, f"{name}: pdserve {command} has no {sorted(unknown)}"
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{name}: `pdserve {command}` refuses {args}")
        defined = {env["name"] for env in container.get("env", [])}
        for var in re.findall(r"\$\((\w+)\)", " ".join(args)):
            assert var in defined, f"{name}: $({var}) is not in its env (left unexpanded)"


def test_the_router_listens_where_its_services_point(rendered, overlay):
    objects = rendered[overlay]
    router = pod_spec(of_kind(objects, "Deployment")["pdserve-router"])["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    args = router["args"]
    assert int(flag(args, "--port")) == ports["http"]
    assert int(flag(args, "--router-port")) == ports["zmq"]
    assert flag(args, "--host") == flag(args, "--worker-host") == "0.0.0.0"
    labels = of_kind(objects, "Deployment")["pdserve-router"]["spec"]["template"]["metadata"]
    services = of_kind(objects, "Service")
    for service_name, port_name in (("pdserve-api", "http"), ("pdserve-router", "zmq")):
        spec = services[service_name]["spec"]
        assert spec["type"] == "ClusterIP"
        assert spec["selector"].items() <= labels["labels"].items()
        ((port),) = spec["ports"]
        assert port["targetPort"] == port_name
    # /ready waits for workers, which reach the router through this Service: it must list
    # the router before it is ready, or neither would ever be.
    assert services["pdserve-router"]["spec"]["publishNotReadyAddresses"] is True
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert router[probe]["httpGet"]["port"] == "http"
    assert router["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert router["livenessProbe"]["httpGet"]["path"] == "/health"
    annotations = labels["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["http"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_workers_report_to_the_router_service_and_advertise_their_pod(rendered, overlay):
    objects = rendered[overlay]
    zmq_service = of_kind(objects, "Service")["pdserve-router"]
    for name, container in containers(objects):
        if container["name"] != "worker":
            continue
        args, env = container["args"], {e["name"]: e for e in container["env"]}
        assert flag(args, "--router") == (
            f"tcp://{zmq_service['metadata']['name']}:{zmq_service['spec']['ports'][0]['port']}"
        )
        assert flag(args, "--host") == "0.0.0.0"
        assert flag(args, "--advertise-host") == "$(POD_IP)"
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        # pid 1 in every container: the default id (role-pid) would collide.
        assert flag(args, "--worker-id") == "$(POD_NAME)"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert flag(args, "--kv-backends") == "tcp", name  # shm cannot cross pods
        health_file = flag(args, "--health-file")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert health_file in container[probe]["exec"]["command"][-1], name


def test_network_policies_keep_internal_ports_to_pdserve_pods(rendered, overlay):
    objects = rendered[overlay]
    policies = of_kind(objects, "NetworkPolicy")
    templates = {
        n: d["spec"]["template"]["metadata"]["labels"]
        for n, d in of_kind(objects, "Deployment").items()
    }
    pdserve_pods = {"app.kubernetes.io/name": "pdserve"}
    assert all(pdserve_pods.items() <= labels.items() for labels in templates.values())

    def selected(policy: dict) -> set[str]:
        wanted = policy["spec"]["podSelector"]["matchLabels"].items()
        return {name for name, labels in templates.items() if wanted <= labels.items()}

    router, worker = policies["pdserve-router"], policies["pdserve-worker"]
    assert selected(router) == {"pdserve-router"}
    assert selected(worker) == set(templates) - {"pdserve-router"}
    open_rule, zmq_rule = router["spec"]["ingress"]
    assert open_rule == {"ports": [{"port": 8000, "protocol": "TCP"}]}  # the HTTP API only
    assert zmq_rule["from"] == [{"podSelector": {"matchLabels": pdserve_pods}}]
    assert zmq_rule["ports"] == [{"port": 5557, "protocol": "TCP"}]
    # Worker ports are random: every port, from pdserve pods only.
    assert worker["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": pdserve_pods}}]}]
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_the_worker_probe_tells_a_running_loop_from_a_stuck_one(rendered, overlay, tmp_path):
    """The probe command itself, run by sh as the kubelet runs it, on a file the worker's
    `LivenessFile` stamps: a loop that passed just now is alive, one stuck for 2 minutes or
    not started yet (no file) is not."""
    for name, container in containers(rendered[overlay]):
        if container["name"] != "worker":
            continue
        health_file = flag(container["args"], "--health-file")
        stamped = tmp_path / "alive"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = [
                part.replace(health_file, str(stamped))
                for part in container[probe]["exec"]["command"]
            ]
            stamped.unlink(missing_ok=True)
            assert subprocess.run(command, capture_output=True).returncode != 0, name
            LivenessFile(stamped).stamp(time.monotonic())
            assert subprocess.run(command, capture_output=True).returncode == 0, name
            LivenessFile(stamped).stamp(time.monotonic() - 120)
            assert subprocess.run(command, capture_output=True).returncode != 0, name
