"""KV-aware routing with fake workers: a cached prefix attracts its request unless the
worker holding it is over the load margin; `auto` decides local vs remote on the tokens
the decode worker would really compute; the other policies; the reasons reported."""

from __future__ import annotations

import pytest

from pdserve.errors import ConfigError
from pdserve.ipc import messages as m
from pdserve.router.policy import RoutingConfig, plan_request
from tests.router.test_policy import ids, pool_of


def cached_on(tokens: dict[str, int]):
    return lambda worker: tokens.get(worker.worker_id, 0)


def test_a_cached_prefix_wins_unless_its_worker_is_over_the_margin():
    config = RoutingConfig(mode="aggregated", kv_aware_load_margin=512)
    pool = pool_of(("m0", "mixed", 0), ("m1", "mixed", 0), ("m2", "mixed", 0))
    cached = cached_on({"m1": 192})
    plan = plan_request(pool, config, 300, cached)
    assert (ids(plan), plan.picks) == (("m1", None), (("mixed", "prefix_hit"),))
    # Within the margin, B still wins while its extra load is below the tokens it saves.
    pool.workers["m1"].pending_prefill_tokens = 150
    assert ids(plan_request(pool, config, 300, cached)) == ("m1", None)
    # Over the margin (512 tokens more than the least-loaded): the least-loaded goes.
    pool.workers["m1"].pending_prefill_tokens = 513
    plan = plan_request(pool, config, 300, cached)
    assert (ids(plan), plan.picks) == (("m0", None), (("mixed", "load_over_prefix"),))
    # No hit anywhere: by load alone.
    plan = plan_request(pool, config, 300)
    assert (ids(plan), plan.picks) == (("m0", None), (("mixed", "load"),))


def test_load_counts_queued_prompt_tokens_running_requests_and_kv_usage():
    config = RoutingConfig(mode="aggregated")
    pool = pool_of(("m0", "mixed", 0), ("m1", "mixed", 0))
    pool.workers["m0"].num_assigned = 2  # 2 x 16 tokens
    pool.workers["m1"].stats = m.WorkerStats("m1", 0, 0, num_free_blocks=32, num_blocks=64)
    assert ids(plan_request(pool, config, 10)) == ("m0", None)  # 32 < 0.5 x 512
    pool.workers["m0"].num_assigned = 20  # 320 > 256
    assert ids(plan_request(pool, config, 10)) == ("m1", None)


def test_both_pools_prefer_the_worker_holding_the_prefix():
    config = RoutingConfig(mode="disaggregated")
    pool = pool_of(
        ("p0", "prefill", 0), ("p1", "prefill", 0), ("d0", "decode", 0), ("d1", "decode", 0)
    )
    plan = plan_request(pool, config, 500, cached_on({"p1": 320, "d1": 128}))
    assert ids(plan) == ("d1", "p1")
    assert plan.picks == (("decode", "prefix_hit"), ("prefill", "prefix_hit"))
    assert plan.placement == ("remote", "mode")


def test_auto_prefills_locally_when_the_decode_worker_holds_most_of_the_prompt():
    config = RoutingConfig(mode="auto", auto_local_prefill_tokens=256)
    pool = pool_of(("p0", "prefill", 0), ("d0", "decode", 0))
    plan = plan_request(pool, config, 1000)
    assert (ids(plan), plan.placement) == (("d0", "p0"), ("remote", "long_uncached"))
    plan = plan_request(pool, config, 1000, cached_on({"d0": 752}))  # 248 left to compute
    assert (ids(plan), plan.placement) == (("d0", None), ("local", "decode_idle"))
    assert plan.picks == (("decode", "prefix_hit"),)  # the unused prefill pick is not counted
    plan = plan_request(pool, config, 1000, cached_on({"d0": 736}))  # 264 left
    assert ids(plan) == ("d0", "p0")


def test_round_robin_and_least_loaded_ignore_the_prefix():
    pool = pool_of(("m0", "mixed", 30), ("m1", "mixed", 10), ("m2", "mixed", 20))
    cached = cached_on({"m0": 1000})
    config = RoutingConfig(mode="aggregated", routing_policy="round_robin")
    selector = config.selector()
    picks = [ids(plan_request(pool, config, 1024, cached, selector))[0] for _ in range(4)]
    assert picks == ["m0", "m1", "m2", "m0"]
    config = RoutingConfig(mode="aggregated", routing_policy="least_loaded")
    plan = plan_request(pool, config, 1024, cached)
    assert (ids(plan), plan.picks) == (("m1", None), (("mixed", "least_loaded"),))


def test_routing_config_is_validated():
    with pytest.raises(ConfigError, match="routing_policy"):
        RoutingConfig(routing_policy="random")
    with pytest.raises(ConfigError, match="kv_aware_load_margin"):
        RoutingConfig(kv_aware_load_margin=-1)


def test_routing_metrics_count_decisions_and_prefix_hits():
    from pdserve.router.kv_index import PrefixMatch
    from pdserve.router.metrics import RouterMetrics

    metrics = RouterMetrics("tiny")
    pool = pool_of(("p0", "prefill", 0), ("d0", "decode", 0))
    config = RoutingConfig(mode="auto", auto_local_prefill_tokens=256)
    plan = plan_request(pool, config, 1000, cached_on({"d0": 752}))
    metrics.observe_routing("kv_aware", plan, 1000, PrefixMatch(47, 40), 16)
    text = metrics.render()[0].decode()
    expected = [
        'pdserve:routing_decisions_total{model_name="tiny",policy="kv_aware",'
        'reason="prefix_hit",role="decode"} 1.0',
        'pdserve:prefill_placement_total{model_name="tiny",placement="local",'
        'reason="decode_idle"} 1.0',
        'pdserve:router_prefix_cache_queries_total{model_name="tiny"} 1000.0',
        'pdserve:router_prefix_cache_hits_total{model_name="tiny",tier="device"} 640.0',
        'pdserve:router_prefix_cache_hits_total{model_name="tiny",tier="lower"} 112.0',
    ]
    for line in expected:
        assert line in text
