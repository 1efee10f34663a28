"""Builders for the Ray serving tests (test_ray.py): start `pdserve serve --launcher ray`
with given YAML settings, find a worker's actor and where it runs, stream prompts and compare them with the offline engine's text, and
list what a run left behind (live actors, shared-memory pools)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pdserve.transfer import SHM_DIR, SHM_PREFIX
from tests.serving.faults import ADMIN_KEY, run_streams, workers
from tests.serving.server import ServerProcess

MAX_TOKENS = 64  # long enough that a kill lands while every stream decodes
ray = pytest.importorskip("ray")  # installed by `make setup`; importorskip names the cause

READY = re.compile(r"^pdserve ready: (http://\S+)/v1 .*router actor (\S+) on ")


def actor_of(worker_id: str):
    """The newest live actor of `worker_id` (actors are named pdserve-<run>:<worker>:<n>)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    mine = sorted(
        (n for n in names if n.split(":")[1:2] == [worker_id]),
        key=lambda n: int(n.rsplit(":", 1)[1]),
    )
    assert mine, f"no actor for {worker_id} in {names}"
    return ray.get_actor(mine[-1], namespace="pdserve")


def node_of(worker_id: str) -> str:
    return ray.get(actor_of(worker_id).info.remote(), timeout=60)["node_id"]


def run_exact(server, expected: dict[str, str]) -> list:
    """Stream every prompt at once; returns the streams once all have finished."""
    streams, threads = run_streams(server.url, list(expected), MAX_TOKENS)
    finish(threads)
    return streams


def decoding(streams) -> bool:
    return all(3 <= len(s.chunks) < MAX_TOKENS - 16 for s in streams)


def finish(threads) -> None:
    for t in threads:
        t.join(180)


def shm_pools(pid: int) -> list[Path]:
    return list(SHM_DIR.glob(f"{SHM_PREFIX}*-{pid}"))


def serving(server, worker_id: str) -> bool:
    return workers(server).get(worker_id, {}).get("state") == "serving"


def assert_exact(streams, expected: dict[str, str]) -> None:
    for stream in streams:
        assert stream.error is None, stream.error
        assert stream.completion_tokens == MAX_TOKENS
        assert stream.text == expected[stream.prompt]


def is_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def router_runs(server) -> list[tuple[str, str]]:
    """(URL, actor name) of each time the router actor said it was ready, in order."""
    found = (READY.match(line) for line in list(server.lines))
    return [m.groups() for m in found if m]


def live_actors() -> dict[str, dict]:
    """Every live actor of the cluster, by id, as Ray's GCS lists it."""
    return {a: i for a, i in ray._private.state.actors().items() if i["State"] == "ALIVE"}


PLACED_BY_RESOURCE = {
    "prefill": {"resources": {"prefill_node": 1}},
    "decode": {"resources": {"decode_node": 1}},
}


def start_server(
    ray_cluster, folder: Path, settings: dict, *args: str, wait: bool = True
) -> ServerProcess:
    """`pdserve serve --launcher ray` with `settings` in its YAML."""
    config = folder / "serve.yaml"
    config.write_text(yaml.safe_dump({"launcher": "ray", **settings}))
    return ServerProcess(
        "--config",
        str(config),
        "--ray-address",
        ray_cluster.address,
        "--threads-per-worker",
        "1",
        "--batch-invariant",
        "--max-num-seqs",
        "8",
        "--num-kv-blocks",
        "256",
        "--admin-key",
        ADMIN_KEY,
        # Off loopback, as across machines: workers bind their Ray node's IP, and the
        # router's wildcard address reaches them as the router node's IP (CURVE on).
        "--worker-host",
        "0.0.0.0",
        *args,
        wait=wait,
    )
