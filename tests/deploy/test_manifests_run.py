"""The disaggregated overlay, run as local processes: what a cluster would start, minus the
cluster (this machine has none).

Every container of the rendered manifests runs with its own command and args, with only
what Kubernetes would fill in replaced: `$(VAR)`s from the downward API (pod IP 127.0.0.1,
pod name = the Deployment's name), Service names resolved through the Service objects to
the port the router listens on (a free one: other tests share this host), mount paths to
folders of this test. The init container's `install -m 0600` copies the key from a 0440
file, as the kubelet mounts a Secret under `fsGroup`; the router gets its keys from the
environment, as the Secret gives them. The router's HTTP and ZeroMQ interfaces are bound
to 127.0.0.1 instead of 0.0.0.0 (nothing on this host should listen wider); the workers
keep `--host 0.0.0.0` with `--advertise-host`, the path a pod takes, CURVE on.

Then the router's probe paths answer 200 (/ready once both workers registered), a
completion with the API key works and one without it gets 401, and each worker's exec
probe, run as the kubelet runs it, passes.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

from tests.deploy.manifests import API_KEY, containers, flag, of_kind, pod_spec
from tests.serving.server import free_port

FIELDS = {"status.podIP": "127.0.0.1"}


class Pod:
    """One Deployment's pod, its volumes as folders under `root`."""

    def __init__(self, deployment: dict, root: Path, secret: dict) -> None:
        self.name = deployment["metadata"]["name"]
        self.spec = pod_spec(deployment)
        self.root = root / self.name
        self.mounts: dict[str, Path] = {"/tmp": self.root / "tmp"}
        for volume in self.spec["volumes"]:
            folder = self.root / volume["name"]
            folder.mkdir(parents=True)
            for item in volume.get("secret", {}).get("items", []):
                path = folder / item["path"]
                path.write_bytes(base64.b64decode(secret["data"][item["key"]]))
                path.chmod(0o440)  # what the kubelet writes with fsGroup set
        self.mounts["/tmp"].mkdir(parents=True)

    def local(self, text: str, container: dict) -> str:
        """`text` with the container's mount paths mapped to this pod's folders (one pass:
        the folders are under /tmp themselves)."""
        folders = {m["mountPath"]: self.root / m["name"] for m in container.get("volumeMounts", [])}
        folders["/tmp"] = self.mounts["/tmp"]
        pattern = "|".join(re.escape(path) for path in sorted(folders, key=len, reverse=True))
        return re.sub(f"({pattern})(?=/)", lambda m: str(folders[m.group(1)]), text)

    def env(self, container: dict, secret: dict) -> dict[str, str]:
        values = {}
        for env in container.get("env", []):
            source = env["valueFrom"]
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                values[env["name"]] = self.name if path == "metadata.name" else FIELDS[path]
            else:
                ref = source["secretKeyRef"]
                values[env["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return values


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def set_flag(args: list[str], name: str, value: str) -> None:
    args[args.index(name) + 1] = value


def service_address(objects: list[dict], ports: dict[str, int], address: str) -> str:
    """tcp://SERVICE:PORT -> the local port behind it (Service port -> targetPort name)."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    service = of_kind(objects, "Service")[host]
    (target,) = [p["targetPort"] for p in service["spec"]["ports"] if p["port"] == int(port)]
    return f"tcp://127.0.0.1:{ports[target]}"


def start(pod: Pod, container: dict, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    args = [pod.local(a, container) for a in args]
    command = [sys.executable, "-m", "pdserve.cli", *args]
    return subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True)


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_disaggregated_overlay_serves_as_local_processes(rendered, tmp_path, builtin_model_dir):
    objects = rendered["disaggregated"]
    (secret,) = of_kind(objects, "Secret").values()
    ports = {"http": free_port(), "zmq": free_port()}
    pods = {n: Pod(d, tmp_path, secret) for n, d in of_kind(objects, "Deployment").items()}
    for pod in pods.values():
        for init in pod.spec["initContainers"]:
            command = [pod.local(part, init) for part in init["command"]]
            subprocess.run(command, check=True)
            assert Path(command[-1]).stat().st_mode & 0o777 == 0o600
    procs = []
    try:
        workers = {}
        for name, container in containers(objects):
            pod = pods[name.split("/")[0]]
            env = pod.env(container, secret)
            args = expand(container["args"], env)
            if args[0] == "router":
                for option in ("--host", "--worker-host"):
                    set_flag(args, option, "127.0.0.1")
                for option, port in (("--port", "http"), ("--router-port", "zmq")):
                    set_flag(args, option, str(ports[port]))
            else:
                set_flag(args, "--router", service_address(objects, ports, flag(args, "--router")))
                workers[pod.name] = (pod, container)
            procs.append(start(pod, container, args, env))
        url = f"http://127.0.0.1:{ports['http']}"
        wait_for(lambda: httpx.get(url + "/ready").status_code == 200, 240, "/ready")

        router = pod_spec(of_kind(objects, "Deployment")["pdserve-router"])["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert httpx.get(url + router[probe]["httpGet"]["path"]).status_code == 200
        ready = httpx.get(url + "/ready").json()
        assert {w["worker_id"] for w in ready["workers"]} == set(workers)
        body = {"prompt": "def fibonacci(n):", "max_tokens": 4, "temperature": 0}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        for pod, container in workers.values():
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = [pod.local(p, container) for p in container[probe]["exec"]["command"]]
                assert subprocess.run(command).returncode == 0, f"{pod.name} {probe}"
    finally:
        stop(procs[1:])  # workers first: the router does not stop workers it did not start
        stop(procs[:1])
