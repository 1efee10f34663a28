"""`pdserve serve --launcher ray` on a real multi-node Ray cluster on this machine.

One `ray.cluster_utils.Cluster` for the module: a head node with the custom resource
`prefill_node` and a second node with `decode_node`; `worker_resources` sends each role to
the node its resource names. One `pdserve serve` drives it through the CLI (flags + YAML),
and this test process joins the cluster as a second driver to find, inspect and kill the
actors. The tests run in order and share that server: placement and exact outputs first,
then an actor killed under load, then a lost node (its worker moves to a node with room),
then a worker that no node has room for (pending until a node joins).

Greedy outputs are compared with the offline engine's in batch-invariant mode, so they
are exact by construction on every CPU, migrations included.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from pdserve.control.worker_spec import read_spec
from pdserve.ipc.security import load_key_file
from pdserve.llm import LLM
from pdserve.sampling_params import SamplingParams
from tests.serving.faults import ADMIN_KEY, prompts, run_streams, workers
from tests.serving.server import ServerProcess

ray = pytest.importorskip("ray")  # installed by `make setup`; importorskip names the cause

MAX_TOKENS = 24
# Fast node-death detection for the lost-node test (Ray's defaults take ~15 s).
SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"prefill_node": 1},
            "include_dashboard": False,
            "_system_config": SYSTEM_CONFIG,
        },
    )
    try:
        cluster.decode_node = cluster.add_node(num_cpus=2, resources={"decode_node": 1})
        ray.init(address=cluster.address, namespace="pdserve", logging_level="WARNING")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    config = tmp_path_factory.mktemp("ray") / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "launcher": "ray",
                "worker_resources": {
                    "prefill": {"resources": {"prefill_node": 1}},
                    "decode": {"resources": {"decode_node": 1}},
                },
            }
        )
    )
    s = ServerProcess(
        "--config",
        str(config),
        "--ray-address",
        ray_cluster.address,
        "--mode",
        "disaggregated",
        "--threads-per-worker",
        "1",
        "--batch-invariant",
        "--max-num-seqs",
        "8",
        "--admin-key",
        ADMIN_KEY,
        "--migration-wait-s",
        "120",
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


def actor_of(worker_id: str):
    """The live actor of `worker_id` (actors are named pdserve:<worker>:<n>)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    mine = sorted(
        (n for n in names if n.startswith(f"pdserve:{worker_id}:")),
        key=lambda n: int(n.rsplit(":", 1)[1]),
    )
    assert mine, f"no actor for {worker_id} in {names}"
    return ray.get_actor(mine[-1], namespace="pdserve")


def node_of(worker_id: str) -> str:
    return ray.get(actor_of(worker_id).info.remote(), timeout=60)["node_id"]


def run_exact(server, expected: dict[str, str]) -> list:
    """Stream every prompt at once; returns the streams once all have finished."""
    streams, threads = run_streams(server.url, list(expected), MAX_TOKENS)
    for t in threads:
        t.join(180)
    return streams


def assert_exact(streams, expected: dict[str, str]) -> None:
    for stream in streams:
        assert stream.error is None, stream.error
        assert stream.completion_tokens == MAX_TOKENS
        assert stream.text == expected[stream.prompt]


def test_workers_land_on_the_nodes_their_resources_name(ray_cluster, server, expected):
    assert node_of("prefill-0") == ray_cluster.head_node.node_id
    assert node_of("decode-0") == ray_cluster.decode_node.node_id
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
