"""Prometheus families of the workers' KV tier admission (kvstore/admission.py).

Split from router/metrics.py to keep that file short. From each worker's reported
`KVTierCounters`: `pdserve:kv_tier_admitted_blocks_total{tier,policy}` and
`pdserve:kv_tier_rejected_blocks_total{tier,policy}` (blocks the admission policy let
into or kept out of a slow tier), and `pdserve:kv_tier_hit_rate{tier}` — hit blocks over
blocks looked up in the tier since the worker started (for a windowed rate, divide the
`rate()`s of `pdserve:kv_tier_hit_blocks_total` and `pdserve:kv_tier_lookup_blocks_total`).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

ADMISSION_COUNTERS = (
    (
        "pdserve:kv_tier_admitted_blocks",
        "Blocks the admission policy let into a slow KV tier (disk, redis).",
        "num_admitted_blocks",
    ),
    (
        "pdserve:kv_tier_rejected_blocks",
        "Blocks the admission policy kept out of a slow KV tier (disk, redis).",
        "num_rejected_blocks",
    ),
)


def tier_admission_families(model_name: str, workers: list, labels: list[str]) -> Iterator[Metric]:
    """`labels` are the per-worker ones (model, worker, role); `tier` (and `policy`) added."""
    for name, doc, attribute in ADMISSION_COUNTERS:
        family = CounterMetricFamily(name, doc, labels=[*labels, "tier", "policy"])
        for worker in workers:
            for tier in worker.kv_tiers:
                values = [model_name, worker.worker_id, worker.role, tier.tier, tier.admission]
                family.add_metric(values, float(getattr(tier, attribute)))
        yield family
    rate = GaugeMetricFamily(
        "pdserve:kv_tier_hit_rate",
        "Blocks found in the tier / blocks lookups asked of it, since the worker started.",
        labels=[*labels, "tier"],
    )
    for worker in workers:
        for tier in worker.kv_tiers:
            if tier.num_lookup_blocks:
                values = [model_name, worker.worker_id, worker.role, tier.tier]
                rate.add_metric(values, tier.num_hit_blocks / tier.num_lookup_blocks)
    yield rate
