"""`RouterMetrics` fed with hand-made stream updates at chosen times: exact counts, sums and
buckets, vLLM's names, per-worker gauges read at scrape time, one registry per instance."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.outputs import (
    CompletionOutput,
    RequestMetrics,
    RequestOutput,
    SampleDelta,
    StreamUpdate,
)
from pdserve.router.client import Readiness, WorkerStatus
from pdserve.router.metrics import (
    PER_TOKEN_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    RouterMetrics,
)

MODEL = "tiny"


def samples(metrics: RouterMetrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, keyed by (name, sorted labels without model_name)."""
    content, _ = metrics.render()
    result = {}
    for family in text_string_to_metric_families(content.decode()):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("model_name") == MODEL
            result[sample.name, tuple(sorted(labels.items()))] = sample.value
    return result


def value(metrics: RouterMetrics, name: str, **labels) -> float:
    return samples(metrics)[name, tuple(sorted(labels.items()))]


def update(
    *deltas: SampleDelta, finished: bool = False, metrics: RequestMetrics | None = None
) -> StreamUpdate:
    output = RequestOutput(
        "r", None, [1, 2, 3], [CompletionOutput(0, "", [])], finished, 0, metrics
    )
    return StreamUpdate(list(deltas), output, finished)


def test_timings_of_one_request_at_known_times():
    metrics = RouterMetrics(MODEL)
    tracker = metrics.start_request(num_prompt_tokens=3, arrival_time=100.0)
    tracker.observe(update(SampleDelta(0, "a", [7])), now=100.25)  # first token
    tracker.observe(update(SampleDelta(0, "", [8, 9])), now=100.30)
    queued = RequestMetrics(arrival_time=50.0, first_scheduled_time=50.5)
    last = SampleDelta(0, "bc", [10], finish_reason="length")
    tracker.observe(update(last, finished=True, metrics=queued), now=100.45)

    assert value(metrics, "vllm:time_to_first_token_seconds_count") == 1
    assert value(metrics, "vllm:time_to_first_token_seconds_sum") == pytest.approx(0.25)
    assert value(metrics, "vllm:time_to_first_token_seconds_bucket", le="0.1") == 0
    assert value(metrics, "vllm:time_to_first_token_seconds_bucket", le="0.25") == 1
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert value(metrics, f"{name}_count") == 2
        assert value(metrics, f"{name}_sum") == pytest.approx(0.05 + 0.15)
        assert value(metrics, f"{name}_bucket", le="0.05") == 1
    assert value(metrics, "vllm:e2e_request_latency_seconds_sum") == pytest.approx(0.45)
    assert value(metrics, "vllm:request_queue_time_seconds_count") == 1
    assert value(metrics, "vllm:request_queue_time_seconds_sum") == pytest.approx(0.5)
    assert value(metrics, "vllm:prompt_tokens_total") == 3
    assert value(metrics, "vllm:generation_tokens_total") == 4
    assert value(metrics, "vllm:request_success_total", finished_reason="length") == 1
    assert value(metrics, "vllm:request_success_total", finished_reason="stop") == 0


def test_queue_time_is_left_out_when_the_client_does_not_know_it():
    metrics = RouterMetrics(MODEL)
    tracker = metrics.start_request(3, arrival_time=0.0)
    done = SampleDelta(0, "a", [7], finish_reason="stop")
    tracker.observe(update(done, finished=True, metrics=RequestMetrics(arrival_time=0.0)), now=1)
    assert value(metrics, "vllm:request_queue_time_seconds_count") == 0
    assert value(metrics, "vllm:e2e_request_latency_seconds_count") == 1


def test_samples_of_n_are_timed_and_counted_apart():
    metrics = RouterMetrics(MODEL)
    tracker = metrics.start_request(5, arrival_time=0.0)
    tracker.observe(update(SampleDelta(0, "a", [1]), SampleDelta(1, "b", [2])), now=1.0)
    tracker.observe(update(SampleDelta(1, "c", [3], finish_reason="stop")), now=1.5)
    tracker.observe(
        update(SampleDelta(0, "d", [4], finish_reason="length"), finished=True), now=3.0
    )
    assert value(metrics, "vllm:time_to_first_token_seconds_count") == 1  # per request
    assert value(metrics, "vllm:inter_token_latency_seconds_sum") == pytest.approx(0.5 + 2.0)
    assert value(metrics, "vllm:prompt_tokens_total") == 5  # once per prompt
    assert value(metrics, "vllm:generation_tokens_total") == 4
    assert value(metrics, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(metrics, "vllm:request_success_total", finished_reason="length") == 1


def test_abort_counts_unfinished_samples_once():
    metrics = RouterMetrics(MODEL)
    tracker = metrics.start_request(4, arrival_time=10.0)
    tracker.observe(update(SampleDelta(0, "a", [1], finish_reason="stop")), now=11.0)
    tracker.abort(num_samples=3, now=12.0)
    tracker.abort(num_samples=3, now=13.0)  # idempotent
    assert value(metrics, "vllm:request_success_total", finished_reason="abort") == 2
    assert value(metrics, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(metrics, "vllm:e2e_request_latency_seconds_sum") == pytest.approx(2.0)
    # Aborted before its first token: nothing prefilled, nothing counted.
    metrics.start_request(9, arrival_time=0.0).abort(1, now=1.0)
    assert value(metrics, "vllm:prompt_tokens_total") == 4
    assert value(metrics, "vllm:time_to_first_token_seconds_count") == 1


def test_kv_transfers():
    metrics = RouterMetrics(MODEL)
    metrics.observe_kv_transfer(0.004, 1_048_576)
    metrics.observe_kv_transfer(0.2, 3_145_728)
    assert value(metrics, "pdserve:kv_transfer_seconds_count") == 2
    assert value(metrics, "pdserve:kv_transfer_seconds_sum") == pytest.approx(0.204)
    assert value(metrics, "pdserve:kv_transfer_seconds_bucket", le="0.005") == 1
    assert value(metrics, "pdserve:kv_transfer_bytes_total") == 4_194_304


def test_worker_gauges_are_read_at_scrape_time():
    metrics = RouterMetrics(MODEL)
    workers = [WorkerStatus("p0", "prefill", True, 2, 5, 0.5)]
    metrics.watch_workers(lambda: Readiness(True, workers=workers))
    p0 = {"worker": "p0", "role": "prefill"}
    assert value(metrics, "vllm:num_requests_running", **p0) == 2
    assert value(metrics, "vllm:num_requests_waiting", **p0) == 5
    assert value(metrics, "vllm:kv_cache_usage_perc", **p0) == 0.5
    workers.append(WorkerStatus("d0", "decode", True, 7, 0, 0.75))
    assert value(metrics, "vllm:num_requests_running", worker="d0", role="decode") == 7


def test_prefix_cache_and_kv_tier_counters_per_worker():
    from pdserve.ipc.messages import KVTierCounters

    metrics = RouterMetrics(MODEL)
    tiers = [
        KVTierCounters("host", 10, 2_621_440, 4, 1_048_576, 2_621_440),
        KVTierCounters("disk", 30, 7_864_320, 6, 1_572_864, 7_864_320, 1, "frequency", 30, 70, 8),
    ]
    workers = [WorkerStatus("m0", "mixed", True, 1, 0, 0.25, 4096, 1024, tiers, 3)]
    metrics.watch_workers(lambda: Readiness(True, workers=workers))
    m0 = {"worker": "m0", "role": "mixed"}
    assert value(metrics, "vllm:prefix_cache_queries_total", **m0) == 4096
    assert value(metrics, "vllm:prefix_cache_hits_total", **m0) == 1024
    assert value(metrics, "pdserve:kv_tier_dropped_writes_total", **m0) == 3
    assert value(metrics, "pdserve:kv_tier_blocks", tier="host", **m0) == 10
    assert value(metrics, "pdserve:kv_tier_bytes", tier="disk", **m0) == 7_864_320
    assert value(metrics, "pdserve:kv_tier_hit_blocks_total", tier="disk", **m0) == 6
    assert value(metrics, "pdserve:kv_tier_read_bytes_total", tier="host", **m0) == 1_048_576
    assert value(metrics, "pdserve:kv_tier_written_bytes_total", tier="host", **m0) == 2_621_440
    assert value(metrics, "pdserve:kv_tier_corrupt_blocks_total", tier="disk", **m0) == 1
    assert value(metrics, "pdserve:kv_tier_lookup_blocks_total", tier="disk", **m0) == 8
    assert value(metrics, "pdserve:kv_tier_hit_rate", tier="disk", **m0) == 0.75
    disk = {"tier": "disk", "policy": "frequency", **m0}
    assert value(metrics, "pdserve:kv_tier_admitted_blocks_total", **disk) == 30
    assert value(metrics, "pdserve:kv_tier_rejected_blocks_total", **disk) == 70
    host = {"tier": "host", "policy": "all", **m0}
    assert value(metrics, "pdserve:kv_tier_rejected_blocks_total", **host) == 0


def test_a_failing_status_source_does_not_fail_the_scrape(caplog):
    metrics = RouterMetrics(MODEL)

    def broken() -> Readiness:
        raise ConnectionError("coordinator gone")

    metrics.watch_workers(broken)
    exposition = samples(metrics)
    assert not any(name == "vllm:num_requests_running" for name, _ in exposition)
    assert ("vllm:e2e_request_latency_seconds_count", ()) in exposition
    assert "coordinator gone" in caplog.text


def test_instances_have_their_own_registries():
    first, second = RouterMetrics(MODEL), RouterMetrics(MODEL)
    first.observe_kv_transfer(1.0, 10)
    assert value(first, "pdserve:kv_transfer_bytes_total") == 10
    assert value(second, "pdserve:kv_transfer_bytes_total") == 0


@pytest.mark.parametrize(
    ("name", "buckets"),
    [
        ("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
        ("vllm:inter_token_latency_seconds", PER_TOKEN_BUCKETS),
        ("vllm:time_per_output_token_seconds", PER_TOKEN_BUCKETS),
        ("vllm:e2e_request_latency_seconds", REQUEST_LATENCY_BUCKETS),
        ("vllm:request_queue_time_seconds", REQUEST_LATENCY_BUCKETS),
    ],
)
def test_buckets_are_vllms(name, buckets):
    bounds = [
        float(dict(labels)["le"])
        for sample_name, labels in samples(RouterMetrics(MODEL))
        if sample_name == f"{name}_bucket"
    ]
    assert bounds == [*buckets, float("inf")]
    # Spot checks against vLLM's lists: their sizes and ends.
    assert (len(TTFT_BUCKETS), TTFT_BUCKETS[0], TTFT_BUCKETS[-1]) == (22, 0.001, 2560.0)
    assert (len(PER_TOKEN_BUCKETS), PER_TOKEN_BUCKETS[0], PER_TOKEN_BUCKETS[-1]) == (19, 0.01, 80.0)
    assert (len(REQUEST_LATENCY_BUCKETS), REQUEST_LATENCY_BUCKETS[-1]) == (21, 7680.0)
