"""`pdserve serve --launcher ray` on a real multi-node Ray cluster on this machine.

One `ray.cluster_utils.Cluster` for the module: a head node with the custom resource
`prefill_node` and a second node with `decode_node`; `worker_resources` sends each role to
the node its resource names. One `pdserve serve` drives it through the CLI (flags + YAML),
and this test process joins the cluster as a second driver to find, inspect and kill the
actors. First the router in a Ray actor (`router_on_ray`, its own `pdserve serve`s): where
it lands, exact outputs through its URL, its death and restart, a clean stop, and a death
Ray does not repair. Then the other tests run in order and share one server (router in
the driver): placement, exact outputs and the key's privacy first, then scale out/in through the admin API, an actor killed under load,
a lost node (its worker moves to a node with room), and a worker that no node has room
for (pending until a node joins).

Greedy outputs are compared with the offline engine's in batch-invariant mode, so they
are exact by construction on every CPU, migrations included.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from pdserve.config import EngineConfig
from pdserve.control.worker_spec import WorkerSpec, read_spec
from pdserve.ipc.security import load_key_file
from pdserve.llm import LLM
from pdserve.sampling_params import SamplingParams
from tests.serving.faults import (
    admin,
    counter,
    freeze_busiest,
    prompts,
    run_streams,
    wait_for,
    workers,
)
from tests.serving.ray_helpers import (
    MAX_TOKENS,
    PLACED_BY_RESOURCE,
    actor_of,
    assert_exact,
    decoding,
    finish,
    is_alive,
    live_actors,
    node_of,
    ray,
    router_runs,
    run_exact,
    serving,
    shm_pools,
    start_server,
)

# Faster node-death detection for the lost-node tests (Ray's defaults take ~15 s): a
# removed node's raylet refuses at once, so 3 checks a second apart; a live raylet on an
# overloaded host still has each check's full timeout to answer. Ray's memory monitor
# would kill actors when the whole (shared) host runs short of memory; each worker here
# preallocates a small KV pool instead.
SYSTEM_CONFIG = {
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
    "memory_monitor_refresh_ms": 0,
}


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"prefill_node": 2},  # room for a second prefill worker
            "include_dashboard": False,
            "_system_config": SYSTEM_CONFIG,
        },
    )
    try:
        cluster.decode_node = cluster.add_node(
            num_cpus=2,
            resources={"decode_node": 1, "router_node": 1},
            labels={"pdserve-test": "decode"},
        )
        ray.init(address=cluster.address, namespace="pdserve", logging_level="WARNING")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    settings = {"worker_resources": PLACED_BY_RESOURCE}
    s = start_server(
        ray_cluster, folder, settings, "--mode", "disaggregated", "--migration-wait-s", "120"
    )
    try:
        yield s
    finally:
        assert s.stop() == 0


@pytest.fixture(scope="module")
def expected(builtin_model_dir) -> dict[str, str]:
    """The offline engine's greedy text for each test prompt."""
    llm = LLM(str(builtin_model_dir), num_threads=1, num_kv_blocks=256, batch_invariant=True)
    texts = prompts(6, words=30)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return {t: o.outputs[0].text for t, o in zip(texts, llm.generate(texts, params), strict=True)}


ROUTER_ON_RAY = {
    "router_on_ray": True,
    "router_resources": {"num_cpus": 0.5, "resources": {"router_node": 1}},
}


@pytest.fixture(scope="module")
def router_server(ray_cluster, tmp_path_factory):
    """The router in an actor on the node with `router_node` (not the driver's), its HTTP
    server on that node's IP (`host: node-ip`); Ray may restart it once."""
    folder = tmp_path_factory.mktemp("ray-router")
    settings = {**ROUTER_ON_RAY, "router_max_restarts": 1, "worker_resources": PLACED_BY_RESOURCE}
    s = start_server(ray_cluster, folder, settings, "--mode", "disaggregated", "--host", "node-ip")
    s.url = router_runs(s)[-1][0]
    try:
        yield s
    finally:
        s.stop()  # the SIGTERM test stopped it already


def router_of(server) -> dict:
    """The router actor's handle and what it says about itself (URL, node, pid)."""
    handle = ray.get_actor(router_runs(server)[-1][1], namespace="pdserve")
    return {"handle": handle, **ray.get(handle.ready.remote(), timeout=60)}


def worker_infos() -> list[dict]:
    return [ray.get(actor_of(w).info.remote(), timeout=60) for w in ("prefill-0", "decode-0")]


def test_the_router_actor_lands_on_the_node_its_resources_name(
    ray_cluster, router_server, expected
):
    router = router_of(router_server)
    assert router["node_id"] == ray_cluster.decode_node.node_id  # not the driver's node
    assert router_server.url == f"http://{router['node_ip']}:{router_server.port}"
    # The router actor owns the worker actors (they end with it), and workers report to
    # the address of its node.
    actors = live_actors()
    address = next(a["Address"] for a in actors.values() if a["Pid"] == router["pid"])
    hosts = [a for a in actors.values() if a["ActorClassName"] == "WorkerHost"]
    assert len(hosts) == 2 and all(a["OwnerAddress"] == address for a in hosts)
    info = ray.get(actor_of("decode-0").info.remote(), timeout=60)
    spec = read_spec(Path(info["folder"]) / "decode-0.json")
    assert spec.router_addr == f"tcp://{router['node_ip']}:{router_server.router_port}"
    # The key the router actor got hidden reaches its workers; Ray's actor table shows none.
    secret = load_key_file(Path(info["folder"]) / "cluster.key").secret
    assert secret.decode() not in repr(ray._private.state.actors())
    assert_exact(run_exact(router_server, expected), expected)


def test_a_killed_router_actor_comes_back_with_fresh_workers(router_server, expected):
    before, old = router_of(router_server), worker_infos()
    ray.kill(before["handle"], no_restart=False)
    wait_for(lambda: len(router_runs(router_server)) == 2, 240, "the router serving again")
    restarted = "Ray restarts it with fresh workers (restart 1 of at most 1)"
    assert any(restarted in line for line in router_server.lines)
    after = router_of(router_server)
    assert after["pid"] != before["pid"] and after["node_id"] == before["node_id"]
    assert router_server.url == router_runs(router_server)[-1][0]
    # Its old workers ended with it; what they left on their nodes is swept.
    assert router_server.wait_gone([w["pid"] for w in old], 30) == []
    wait_for(lambda: not any(shm_pools(w["pid"]) for w in old), 30, "old pools swept")
    wait_for(lambda: not any(Path(w["folder"]).exists() for w in old), 30, "old folders swept")
    assert_exact(run_exact(router_server, expected), expected)


def test_sigterm_to_the_supervisor_leaves_no_actor_and_no_process(router_server):
    router, infos = router_of(router_server), worker_infos()
    assert router_server.stop() == 0
    assert router_server.wait_gone([router["pid"], *(w["pid"] for w in infos)], 30) == []
    wait_for(lambda: live_actors() == {}, 30, "no actor left")
    left = [(shm_pools(w["pid"]), Path(w["folder"]).exists()) for w in infos]
    assert left == [([], False)] * 2


def test_a_router_actor_ray_does_not_restart_ends_the_supervisor(ray_cluster, tmp_path):
    settings = {**ROUTER_ON_RAY, "router_max_restarts": 0}
    s = start_server(ray_cluster, tmp_path, settings, "--mode", "aggregated")
    try:
        worker = ray.get(actor_of("mixed-0").info.remote(), timeout=60)
        ray.kill(router_of(s)["handle"])  # no restart
        assert s.proc.wait(60) == 1
        died = "error: the router actor died and Ray will not restart it"
        wait_for(lambda: any(died in line for line in s.lines), 10, "the supervisor's error")
        assert s.wait_gone([worker["pid"]], 30) == []
        wait_for(lambda: live_actors() == {}, 30, "no actor left")
    finally:
        s.stop()


def test_a_router_actor_no_node_has_room_for_is_named_and_stops_cleanly(ray_cluster, tmp_path):
    settings = {"router_on_ray": True, "router_resources": {"resources": {"nowhere": 1}}}
    s = start_server(ray_cluster, tmp_path, settings, "--mode", "aggregated", wait=False)
    try:
        waits = "the router actor waits for a node with num_cpus 1, resources {'nowhere': 1.0}"
        wait_for(lambda: any(waits in line for line in s.lines), 60, "the pending hint")
        assert s.stop() == 0
        wait_for(lambda: live_actors() == {}, 30, "no actor left")
    finally:
        s.stop()


def test_workers_land_on_the_nodes_their_resources_name(ray_cluster, server, expected):
    assert node_of("prefill-0") == ray_cluster.head_node.node_id
    assert node_of("decode-0") == ray_cluster.decode_node.node_id
    for worker_id in ("prefill-0", "decode-0"):
        info = ray.get(actor_of(worker_id).info.remote(), timeout=60)
        spec = read_spec(Path(info["folder"]) / f"{worker_id}.json")
        assert spec.host == info["node_ip"]  # its node's address, not a wildcard
        assert spec.router_addr == f"tcp://{ray.util.get_node_ip_address()}:{server.router_port}"
    listed = workers(server)
    assert {w: i["state"] for w, i in listed.items()} == {
        "prefill-0": "serving",
        "decode-0": "serving",
    }
    assert_exact(run_exact(server, expected), expected)


def test_the_cluster_key_reaches_actors_privately(ray_cluster, server):
    info = ray.get(actor_of("decode-0").info.remote(), timeout=60)
    folder = Path(info["folder"])
    key_file = folder / "cluster.key"
    spec_file = folder / "decode-0.json"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(spec_file.stat().st_mode) == 0o600
    assert read_spec(spec_file).cluster_key_file == str(key_file)
    secret = load_key_file(key_file).secret
    assert secret not in spec_file.read_bytes()
    for name in ("cmdline", "environ"):
        assert secret not in Path(f"/proc/{info['pid']}/{name}").read_bytes()
    # What Ray shows about its actors (the GCS actor table) and every log it wrote.
    shown = repr(ray.util.list_named_actors(all_namespaces=True))
    shown += repr(ray._private.state.actors())
    assert info["folder"] not in shown and secret.decode() not in shown
    logs = Path(ray_cluster.head_node.get_session_dir_path()) / "logs"
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaked == []


def test_pack_places_a_prefill_decode_pair_on_one_node(ray_cluster, tmp_path):
    """The launcher alone (this process is a Ray driver too): a `pack` pair shares one
    STRICT_PACK placement group. Its workers point at a missing model folder, so each
    exits at once: that exit reaches `exited()` with its code, like a local one. After a
    role switch (`set_role`) the restarted worker's spec and resources are its new role's."""
    from pdserve.control.ray_config import parse_worker_resources
    from pdserve.control.ray_launcher import RayLauncher

    specs = []

    def spec(role: str, worker_id: str) -> WorkerSpec:
        specs.append((worker_id, role))
        missing = str(tmp_path / "no-model")
        return WorkerSpec(worker_id, role, missing, "tcp://127.0.0.1:9", EngineConfig())

    pack = {"num_cpus": 0.5, "placement": "pack"}
    mixed = {"num_cpus": 0, "label_selector": {"pdserve-test": "decode"}}
    resources = parse_worker_resources({"prefill": pack, "decode": pack, "mixed": mixed})
    launcher = RayLauncher(spec, lambda role: 1, resources, key_file=None)
    try:
        launcher.start({"prefill": 1, "decode": 1})
        wait_for(lambda: not launcher.pending(), 60, "the pair placed")
        prefill, decode = launcher.location("prefill-0"), launcher.location("decode-0")
        assert prefill["node_id"] == decode["node_id"]
        exits = []
        wait_for(lambda: exits.extend(launcher.exited()) or len(exits) == 2, 60, "both exits")
        assert sorted(exits) == [
            ("decode-0", "exited with code 2"),
            ("prefill-0", "exited with code 2"),
        ]
        launcher.set_role("decode-0", "mixed")
        launcher.restart("decode-0")
        assert specs[-1] == ("decode-0", "mixed")
        wait_for(lambda: not launcher.pending(), 60, "the mixed worker placed")
        assert launcher.location("decode-0")["node_id"] == ray_cluster.decode_node.node_id
    finally:
        launcher.stop()


def test_a_worker_killed_before_placement_is_created_again(ray_cluster, tmp_path):
    """A worker that needs a resource no node has stays pending; killed (fenced) there,
    it is reported dead and restarted, pending again; `stop` copes with unplaced actors."""
    from pdserve.control.ray_config import parse_worker_resources
    from pdserve.control.ray_launcher import RayLauncher

    def spec(role: str, worker_id: str) -> WorkerSpec:
        return WorkerSpec(worker_id, role, str(tmp_path), "tcp://127.0.0.1:9", EngineConfig())

    resources = parse_worker_resources({"decode": {"num_cpus": 0, "resources": {"gpu_node": 1}}})
    launcher = RayLauncher(spec, lambda role: 1, resources, key_file=None)
    try:
        launcher.start({"decode": 1})
        time.sleep(1)
        assert launcher.pending() == {"decode-0": "decode"}
        launcher.kill("decode-0")
        exits = []
        wait_for(lambda: exits.extend(launcher.exited()) or exits, 60, "the death reported")
        assert exits[0][0] == "decode-0" and "lost its Ray actor" in exits[0][1]
        assert launcher.pending() == {}  # dead, not pending, until the watchdog restarts it
        launcher.restart("decode-0")
        assert launcher.pending() == {"decode-0": "decode"}
    finally:
        launcher.stop()


def test_scale_out_and_in_go_through_the_ray_launcher(ray_cluster, server):
    r = admin(server, "POST", "/admin/workers", json={"role": "prefill"})
    assert r.status_code == 201, r.text
    assert r.json()["worker_id"] == "prefill-1"
    assert node_of("prefill-1") == ray_cluster.head_node.node_id  # the node with room
    pid = ray.get(actor_of("prefill-1").info.remote(), timeout=60)["pid"]
    r = admin(server, "DELETE", "/admin/workers/prefill-1")
    assert r.status_code == 200, r.text
    assert "prefill-1" not in workers(server)
    wait_for(lambda: not shm_pools(pid), 30, "the removed worker's pool to go")


def frozen(server, worker_id: str, pid: int) -> None:
    """Stop the worker's process while it holds requests, so the death that follows must
    move some (a kill that lands after the last stream finished moves none)."""
    assert freeze_busiest(server, {worker_id: pid}) == worker_id, f"{worker_id} finished first"


def test_a_killed_worker_actor_loses_no_request_and_comes_back(ray_cluster, server, expected):
    before = counter(server, "pdserve:request_migrations_total")
    old = ray.get(actor_of("decode-0").info.remote(), timeout=60)
    streams, threads = run_streams(server.url, list(expected), MAX_TOKENS)
    wait_for(lambda: decoding(streams), 120, "every stream decoding")
    frozen(server, "decode-0", old["pid"])
    ray.kill(actor_of("decode-0"))
    finish(threads)
    assert_exact(streams, expected)
    assert counter(server, "pdserve:request_migrations_total") > before
    wait_for(lambda: serving(server, "decode-0"), 120, "decode-0 back")
    new = ray.get(actor_of("decode-0").info.remote(), timeout=60)
    assert new["pid"] != old["pid"]
    assert new["node_id"] == ray_cluster.decode_node.node_id
    # What the killed worker left on its node is removed by the launcher.
    wait_for(lambda: not shm_pools(old["pid"]), 30, "the dead worker's pool to go")
    assert not Path(old["folder"]).exists()


def test_a_lost_nodes_worker_is_recreated_on_a_node_with_room(ray_cluster, server, expected):
    spare = ray_cluster.add_node(num_cpus=2, resources={"decode_node": 1})
    before = counter(server, "pdserve:request_migrations_total")
    pid = ray.get(actor_of("decode-0").info.remote(), timeout=60)["pid"]
    streams, threads = run_streams(server.url, list(expected), MAX_TOKENS)
    wait_for(lambda: decoding(streams), 120, "every stream decoding")
    frozen(server, "decode-0", pid)
    ray_cluster.remove_node(ray_cluster.decode_node, allow_graceful=False)
    ray_cluster.decode_node = spare
    finish(threads)
    assert_exact(streams, expected)
    assert counter(server, "pdserve:request_migrations_total") > before
    wait_for(lambda: serving(server, "decode-0"), 120, "decode-0 back")
    assert node_of("decode-0") == spare.node_id


def test_a_worker_no_node_has_room_for_waits_as_pending(ray_cluster, server, expected):
    lost = ray_cluster.decode_node
    ray_cluster.remove_node(lost, allow_graceful=False)
    # Until Ray declares the node dead it may still place the new actor there (and that
    # attempt dies with the node): "pending" is stable once Ray knows.
    wait_for(lambda: not is_alive(lost.node_id), 60, "Ray to see the node gone")
    wait_for(lambda: workers(server)["decode-0"]["state"] == "pending", 60, "decode-0 pending")
    # The router serves on: probes and the admin API answer while the worker waits.
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    time.sleep(2)  # several watchdog passes: still pending, nothing restarts in a loop
    assert workers(server)["decode-0"]["state"] == "pending"
    ray_cluster.decode_node = ray_cluster.add_node(num_cpus=2, resources={"decode_node": 1})
    wait_for(lambda: serving(server, "decode-0"), 120, "decode-0 placed on the new node")
    assert node_of("decode-0") == ray_cluster.decode_node.node_id
    assert_exact(run_exact(server, expected), expected)
