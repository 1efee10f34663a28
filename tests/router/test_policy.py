"""Where requests go: modes, thresholds and least-outstanding-tokens balancing."""

from __future__ import annotations

import pytest

from pdserve.control.workers import WorkerHandle, WorkerPool
from pdserve.errors import ConfigError
from pdserve.ipc import messages as m
from pdserve.router.policy import RoutingConfig, plan_request, required_jobs

LAYOUT = m.KVLayout(2, 64, 16, 2, 8, "float32")


def pool_of(*specs: tuple[str, str, int]) -> WorkerPool:
    """Workers given as (worker_id, role, outstanding_tokens)."""
    pool = WorkerPool(ctx=None)
    for worker_id, role, outstanding in specs:
        info = m.Register(worker_id, role, 1, "tcp://x:1", "tcp://x:2", LAYOUT, 512, ["tcp"])
        handle = WorkerHandle(info, ctrl=None, outstanding_tokens=outstanding)
        pool.workers[worker_id] = handle
    return pool


def ids(plan) -> tuple[str, str | None]:
    return plan.decode.worker_id, plan.prefill.worker_id if plan.prefill else None


def test_aggregated_uses_least_loaded_mixed_worker_only():
    pool = pool_of(("m0", "mixed", 50), ("m1", "mixed", 10), ("d0", "decode", 0))
    assert ids(plan_request(pool, RoutingConfig(mode="aggregated"), 1000)) == ("m1", None)
    assert plan_request(pool_of(("d0", "decode", 0)), RoutingConfig(mode="aggregated"), 5) is None


def test_disaggregated_pairs_least_loaded_of_each_role():
    pool = pool_of(
        ("p0", "prefill", 900), ("p1", "prefill", 100), ("d0", "decode", 7), ("d1", "decode", 3)
    )
    config = RoutingConfig(mode="disaggregated")
    assert ids(plan_request(pool, config, 5)) == ("d1", "p1")  # even a short prompt goes remote
    pool.workers["d1"].is_alive = False
    assert ids(plan_request(pool, config, 5)) == ("d0", "p1")
    assert plan_request(pool_of(("d0", "decode", 0)), config, 5) is None  # no prefill worker


def test_auto_keeps_short_prompts_and_backed_up_prefill_local():
    config = RoutingConfig(
        mode="auto", auto_local_prefill_tokens=256, auto_max_prefill_queue_tokens=1000
    )
    pool = pool_of(("p0", "prefill", 0), ("d0", "decode", 0))
    assert ids(plan_request(pool, config, 255)) == ("d0", None)
    assert ids(plan_request(pool, config, 256)) == ("d0", "p0")
    pool.workers["p0"].pending_prefill_tokens = 1001  # the prefill pool is backed up
    assert ids(plan_request(pool, config, 5000)) == ("d0", None)
    pool.workers["p0"].is_alive = False
    pool.workers["p0"].pending_prefill_tokens = 0
    assert ids(plan_request(pool, config, 5000)) == ("d0", None)


def test_auto_keeps_short_prompts_local_only_where_they_add_the_least_waiting():
    config = RoutingConfig(mode="auto", auto_local_prefill_tokens=256)
    pool = pool_of(("p0", "prefill", 0), ("d0", "decode", 0))
    decode, prefill = pool.workers["d0"], pool.workers["p0"]
    prefill.pending_prefill_tokens = 10_000  # however backed up: nothing to stall locally
    plan = plan_request(pool, config, 50)
    assert (ids(plan), plan.placement) == (("d0", None), ("local", "decode_idle"))
    prefill.pending_prefill_tokens = 0
    decode.num_assigned = 3  # decoding: a local prefill would stall its batch
    plan = plan_request(pool, config, 50)
    assert (ids(plan), plan.placement) == (("d0", "p0"), ("remote", "decode_busy"))
    # Local: 100 queued there + 3 requests x 50 = 250 tokens of waiting; remote: the queue.
    decode.pending_prefill_tokens, prefill.pending_prefill_tokens = 100, 249
    assert ids(plan_request(pool, config, 50)) == ("d0", "p0")
    prefill.pending_prefill_tokens = 250
    plan = plan_request(pool, config, 50)
    assert (ids(plan), plan.placement) == (("d0", None), ("local", "prefill_queue"))
    decode.num_assigned = 30  # a bigger batch to stall: the same queue no longer justifies it
    assert ids(plan_request(pool, config, 50)) == ("d0", "p0")
    assert ids(plan_request(pool, config, 5)) == ("d0", None)  # 100 + 30 x 5 <= 250


def test_a_mixed_worker_never_prefills_for_itself():
    pool = pool_of(("m0", "mixed", 0))
    assert ids(
        plan_request(pool, RoutingConfig(mode="auto", auto_local_prefill_tokens=0), 999)
    ) == (
        "m0",
        None,
    )
    assert plan_request(pool, RoutingConfig(mode="disaggregated"), 999) is None


def test_required_jobs_and_config_errors():
    assert required_jobs("aggregated") == ("mixed",)
    assert required_jobs("disaggregated") == ("prefill", "decode")
    assert required_jobs("auto") == ("decode",)
    with pytest.raises(ConfigError, match="mode"):
        RoutingConfig(mode="fast")
    with pytest.raises(ConfigError, match="kv_backend"):
        RoutingConfig(kv_backend="rdma")


def test_disaggregated_with_a_mixed_worker_keeps_a_prefill_worker_free():
    """decode + mixed (after a role switch): whichever the decode pick would be, the plan
    pairs the mixed worker (prefill) with the decode worker instead of finding none."""
    pool = pool_of(("d0", "decode", 500), ("m0", "mixed", 0))
    plan = plan_request(
        pool, RoutingConfig(mode="disaggregated", routing_policy="least_loaded"), 50
    )
    assert ids(plan) == ("d0", "m0")


@pytest.mark.parametrize("roles", [("mixed", "mixed"), ("decode", "mixed"), ("decode", "decode")])
def test_auto_hands_prompts_to_prefill_workers_only(roles):
    """Without a prefill worker, every prompt is prefilled where it decodes, long or
    short, busy or not (two mixed workers are the aggregated layout, not each other's
    prefill workers); a mixed worker beside a prefill worker is a decode target."""
    pool = pool_of(("w0", roles[0], 5000), ("w1", roles[1], 0))
    pool.workers["w0"].num_assigned = pool.workers["w1"].num_assigned = 3
    config = RoutingConfig(mode="auto", routing_policy="least_loaded")
    for num_prompt_tokens in (64, 4096):
        plan = plan_request(pool, config, num_prompt_tokens)
        assert ids(plan) == ("w1", None)
        assert plan.placement == ("local", "no_prefill_worker")
    pool = pool_of(("p0", "prefill", 0), ("m0", "mixed", 0))
    assert ids(plan_request(pool, config, 4096)) == ("m0", "p0")
    assert ids(plan_request(pool, RoutingConfig(mode="disaggregated"), 64)) == ("m0", "p0")
