"""Builders for simulator tests: profiles with hand-picked costs, layouts, specs."""

from __future__ import annotations

from pdserve.bench.types import RequestSpec
from pdserve.config import EngineConfig
from pdserve.serve import ServeConfig
from pdserve.sim.cost_model import StepCost
from pdserve.sim.profile import Profile, TransferCost

# tokens(N) = 10 ms + 0.1 ms per token past the first; nothing else.
LINEAR = StepCost((1, 1001), (0.010, 0.110), 0.0, 0.0, 0.0)
IPC_S = 0.001


def make_profile(
    cost: StepCost = LINEAR,
    transfer: TransferCost | None = None,
    cores: int = 2,
    contention: float = 1.0,
    sizes: tuple[int, ...] = (1, 2),
) -> Profile:
    return Profile(
        kind="measured",
        hardware={"device": "cpu", "cpu_model": "test", "isa": [], "cores": cores},
        model={
            "name": "test-model",
            "num_params": 1000,
            "num_layers": 4,
            "num_kv_heads": 1,
            "head_dim": 8,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "dtype": "float32",
            "tie_word_embeddings": False,
            "hidden_size": 8,
            "kv_bytes_per_token": 16384,
        },
        costs={n: cost for n in sizes},
        transfer={"shm": transfer or TransferCost(0.005, 1e18)},
        ipc_latency_s=IPC_S,
        cores=cores,
        contention=contention,
    )


def layout(mode: str, num_blocks: int = 1000, **kw) -> ServeConfig:
    counts = {"aggregated": {"mixed_workers": 1}}.get(
        mode, {"prefill_workers": 1, "decode_workers": 1}
    )
    engine = EngineConfig(num_kv_blocks=num_blocks, **kw.pop("engine", {}))
    return ServeConfig(mode=mode, threads_per_worker=1, engine=engine, **{**counts, **kw})


def spec(num_words: int, max_tokens: int, first: str = "alpha") -> RequestSpec:
    """A completion of BOS + `num_words` words (stand-in ids: one id per word)."""
    words = [first] + [f"w{i}" for i in range(num_words - 1)]
    return RequestSpec(prompt=" ".join(words), max_tokens=max_tokens)


def one_request(profile: Profile, mode: str = "aggregated", max_tokens: int = 3, **kw):
    """The record of one 101-token prompt sent alone to a `mode` layout."""
    from pdserve.bench.loadgen import Arrival
    from pdserve.sim.run import simulate

    specs = [spec(100, max_tokens)]
    return simulate(
        layout(mode), profile, specs, Arrival.poisson(float("inf")), num_requests=1, **kw
    ).records[0]
