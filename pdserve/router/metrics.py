"""The router's Prometheus metrics, named and bucketed like vLLM's so its dashboards work.

Owns: one `CollectorRegistry` per `RouterMetrics` (several apps in one process, as in the
tests, never collide on a global registry), the per-request timings the router sees, the
per-worker gauges and the KV hand-over measurements.

Contract:
- `start_request(num_prompt_tokens, arrival_time)` returns a `RequestTracker`; feed it every
  `StreamUpdate` of that request (`observe`) and call `abort()` if the request ends without
  its final update. Times are `time.monotonic()` seconds.
- `watch_workers(readiness)` makes `/metrics` read `vllm:num_requests_running`,
  `vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc` from `readiness().workers` at
  scrape time (label `worker`, plus `role`), so no polling loop keeps them fresh.
- `observe_kv_transfer(seconds, num_bytes)` is called by the cluster client per hand-over.
- `observe_routing(policy, plan, num_prompt_tokens, match, block_size)` is called by the
  cluster client per dispatched sample: `pdserve:routing_decisions_total{policy,role,
  reason}` (one per worker picked, reasons in router/selection.py),
  `pdserve:prefill_placement_total{placement,reason}` (local or remote prefill, reasons
  in router/policy.py), and the prefix cache as the router's global index sees it:
  `pdserve:router_prefix_cache_queries_total` (prompt tokens) and
  `pdserve:router_prefix_cache_hits_total{tier}` (tokens of the prompt's cached prefix on
  the worker that prefills it: `device`, or `lower` for host/disk/redis tiers beyond the
  device part).
- Per worker, from its stats (cumulative values the worker reports, exposed as counters):
  `vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total` (prompt tokens at
  first admission; hits from the device pool or any tier), and per KV tier (`tier` label:
  host, disk, redis) `pdserve:kv_tier_blocks` / `pdserve:kv_tier_bytes` (held now),
  `pdserve:kv_tier_hit_blocks_total`, `pdserve:kv_tier_read_bytes_total`,
  `pdserve:kv_tier_written_bytes_total`, `pdserve:kv_tier_corrupt_blocks_total`,
  `pdserve:kv_tier_lookup_blocks_total` (blocks lookups asked of the tier) and
  `pdserve:kv_tier_hit_rate` (hit / lookup blocks since the worker started; use the two
  counters for a windowed rate), `pdserve:kv_tier_dropped_writes_total`, and admission
  into the slow tiers, `pdserve:kv_tier_admitted_blocks_total{tier,policy}` and
  `pdserve:kv_tier_rejected_blocks_total{tier,policy}` (kvstore/admission.py).

Why measured here: the router is where a user's request arrives and its tokens leave, so
time to first token and end-to-end latency include queueing, routing and KV hand-over, as
the user sees them. `vllm:time_per_output_token_seconds` and
`vllm:inter_token_latency_seconds` carry the same observations (vLLM emits both: the first
is the older name). Token counters and `vllm:request_success_total` count each sample of an
`n > 1` request as vLLM does (one engine request per sample), except prompt tokens, which
are counted once per prompt like `usage.prompt_tokens`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdserve.outputs import StreamUpdate
from pdserve.router.tier_metrics import tier_admission_families

if TYPE_CHECKING:
    from pdserve.router.client import Readiness
    from pdserve.router.kv_index import PrefixMatch
    from pdserve.router.policy import Plan

logger = logging.getLogger(__name__)

# vLLM's buckets (vllm/v1/metrics/loggers.py), so recording rules and SLO thresholds carry over.
TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
PER_TOKEN_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
REQUEST_LATENCY_BUCKETS = (
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0),
    *(120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)
# A hand-over moves a prompt's KV blocks between processes or hosts: sub-millisecond over
# shared memory, up to seconds for long prompts over TCP.
KV_TRANSFER_BUCKETS = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0),
)
FINISH_REASONS = ("stop", "length", "abort")


class RouterMetrics:
    """Every metric the router exports, in its own registry."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            family = Histogram(name, doc, labels, registry=self.registry, buckets=buckets)
            return family.labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", PER_TOKEN_BUCKETS
        )
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token in seconds (older name of inter_token_latency).",
            PER_TOKEN_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Time from arrival until first scheduled, in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        success = Counter(
            "vllm:request_success",
            "Count of finished requests by finish reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.request_success = {r: success.labels(model_name, r) for r in FINISH_REASONS}
        self.kv_transfer_seconds = histogram(
            "pdserve:kv_transfer_seconds",
            "Duration of one KV cache hand-over from prefill to decode, in seconds.",
            KV_TRANSFER_BUCKETS,
        )
        self.kv_transfer_bytes = counter(
            "pdserve:kv_transfer_bytes", "Bytes of KV cache handed over from prefill to decode."
        )
        self.routing_decisions = Counter(
            "pdserve:routing_decisions",
            "Workers picked by the routing policy, by policy, pool (role) and reason.",
            [*labels, "policy", "role", "reason"],
            registry=self.registry,
        )
        self.prefill_placement = Counter(
            "pdserve:prefill_placement",
            "Prompts prefilled on the decode worker (local) or a prefill worker (remote).",
            [*labels, "placement", "reason"],
            registry=self.registry,
        )
        self.router_prefix_queries = counter(
            "pdserve:router_prefix_cache_queries",
            "Prompt tokens looked up in the router's global prefix index.",
        )
        hits = Counter(
            "pdserve:router_prefix_cache_hits",
            "Prompt tokens cached on the worker that prefills them, per the global index.",
            [*labels, "tier"],
            registry=self.registry,
        )
        self.router_prefix_hits = {t: hits.labels(model_name, t) for t in ("device", "lower")}
        self.migrations = counter(
            "pdserve:request_migrations",
            "Request samples moved to another worker (worker died, fenced, drained, failed).",
        )
        self.migrated_tokens = counter(
            "pdserve:migrated_tokens",
            "Generated tokens carried over by migrations (recomputed or served from cache).",
        )
        self.migration_replay_tokens = counter(
            "pdserve:migration_replay_tokens",
            "Prompt + generated tokens a resumed request needed in KV on its new worker.",
        )
        self.migration_replay_cached_tokens = counter(
            "pdserve:migration_replay_cached_tokens",
            "Of those, tokens the new worker served from its prefix cache or KV tiers.",
        )
        self.role_switches = Counter(
            "pdserve:role_switches",
            "Workers that changed role at runtime, by old role, new role and reason.",
            [*labels, "from", "to", "reason"],
            registry=self.registry,
        )
        self.planner_predicted_goodput = Gauge(
            "pdserve:planner_predicted_goodput",
            "The SLO planner's predicted goodput (req/s) of its target layout and of the "
            "current one, for the forecast load.",
            [*labels, "layout"],
            registry=self.registry,
        )
        self._workers = _WorkerCollector(model_name)
        self.registry.register(self._workers)

    # -- recording
    def start_request(
        self, num_prompt_tokens: int, arrival_time: float | None = None
    ) -> RequestTracker:
        """Begin timing one prompt's generation (all its samples)."""
        arrival = time.monotonic() if arrival_time is None else arrival_time
        return RequestTracker(self, num_prompt_tokens, arrival)

    def observe_kv_transfer(self, seconds: float, num_bytes: int) -> None:
        self.kv_transfer_seconds.observe(seconds)
        self.kv_transfer_bytes.inc(num_bytes)

    def observe_routing(
        self,
        policy: str,
        plan: Plan,
        num_prompt_tokens: int,
        match: PrefixMatch | None,
        block_size: int,
    ) -> None:
        for role, reason in plan.picks:
            self.routing_decisions.labels(self.model_name, policy, role, reason).inc()
        if plan.placement is not None:
            self.prefill_placement.labels(self.model_name, *plan.placement).inc()
        self.router_prefix_queries.inc(num_prompt_tokens)
        if match is not None:
            device = match.num_device_blocks * block_size
            self.router_prefix_hits["device"].inc(device)
            self.router_prefix_hits["lower"].inc(match.num_blocks * block_size - device)

    def observe_migration(self, num_generated_tokens: int) -> None:
        self.migrations.inc()
        self.migrated_tokens.inc(num_generated_tokens)

    def observe_migration_replay(self, num_tokens: int, num_cached_tokens: int) -> None:
        self.migration_replay_tokens.inc(num_tokens)
        self.migration_replay_cached_tokens.inc(min(num_cached_tokens, num_tokens))

    def observe_role_switch(self, old: str, new: str, reason: str) -> None:
        self.role_switches.labels(self.model_name, old, new, reason).inc()

    def observe_planner(self, decision) -> None:
        """A `control.planner.Decision`."""
        gauge = self.planner_predicted_goodput
        gauge.labels(self.model_name, "target").set(decision.predicted_goodput)
        gauge.labels(self.model_name, "current").set(decision.current_goodput)

    def watch_workers(self, readiness: Callable[[], Readiness]) -> None:
        """Read per-worker gauges from `readiness().workers` whenever metrics are scraped."""
        self._workers.readiness = readiness

    # -- exposition
    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTracker:
    """Timings of one prompt's generation, fed with its `StreamUpdate`s as they arrive."""

    def __init__(self, metrics: RouterMetrics, num_prompt_tokens: int, arrival: float) -> None:
        self._metrics = metrics
        self._num_prompt_tokens = num_prompt_tokens
        self._arrival = arrival
        self._last_token_time: dict[int, float] = {}  # per sample index
        self._finished_samples: set[int] = set()
        self._is_done = False

    def observe(self, update: StreamUpdate, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for delta in update.deltas:
            if delta.token_ids:
                self._observe_tokens(delta.index, len(delta.token_ids), now)
            if delta.finish_reason is not None:
                self._finish_sample(delta.index, delta.finish_reason)
        if update.finished and not self._is_done:
            self._is_done = True
            self._metrics.e2e_request_latency.observe(now - self._arrival)
            metrics = update.output.metrics
            if metrics is not None and metrics.first_scheduled_time is not None:
                queued = metrics.first_scheduled_time - metrics.arrival_time
                self._metrics.request_queue_time.observe(max(queued, 0.0))

    def abort(self, num_samples: int, now: float | None = None) -> None:
        """The request ended early (client gone, failure): unfinished samples count as
        aborted, and the time so far as its end-to-end latency, as vLLM does."""
        if self._is_done:
            return
        self._is_done = True
        for index in range(num_samples):
            if index not in self._finished_samples:
                self._finish_sample(index, "abort")
        now = time.monotonic() if now is None else now
        self._metrics.e2e_request_latency.observe(now - self._arrival)

    def _observe_tokens(self, index: int, num_tokens: int, now: float) -> None:
        metrics = self._metrics
        if not self._last_token_time:  # the request's first token, of any sample
            metrics.time_to_first_token.observe(now - self._arrival)
            metrics.prompt_tokens.inc(self._num_prompt_tokens)
        elif index in self._last_token_time:
            interval = now - self._last_token_time[index]
            metrics.inter_token_latency.observe(interval)
            metrics.time_per_output_token.observe(interval)
        self._last_token_time[index] = now
        metrics.generation_tokens.inc(num_tokens)

    def _finish_sample(self, index: int, reason: str) -> None:
        if index in self._finished_samples:
            return
        self._finished_samples.add(index)
        counter = self._metrics.request_success.get(reason)
        if counter is not None:
            counter.inc()


class _WorkerCollector:
    """Per-worker gauges, read from the client's readiness at scrape time."""

    GAUGES = (
        (
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            "num_running",
        ),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "num_waiting"),
        ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_usage"),
    )

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.readiness: Callable[[], Readiness] | None = None

    # Cumulative counts each worker reports (so exposed as counters of the latest value).
    COUNTERS = (
        (
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache, at first admission.",
            "num_prefix_query_tokens",
        ),
        (
            "vllm:prefix_cache_hits",
            "Prompt tokens served from the prefix cache (device pool or any KV tier).",
            "num_prefix_hit_tokens",
        ),
        (
            "pdserve:kv_tier_dropped_writes",
            "Writes to slow KV tiers dropped because the background writer was behind.",
            "num_tier_dropped_writes",
        ),
    )
    TIER_GAUGES = (
        ("pdserve:kv_tier_blocks", "KV blocks held in the tier.", "num_blocks"),
        ("pdserve:kv_tier_bytes", "Bytes held in the tier.", "used_bytes"),
    )
    TIER_COUNTERS = (
        ("pdserve:kv_tier_hit_blocks", "Blocks found in the tier by lookups.", "num_hit_blocks"),
        ("pdserve:kv_tier_read_bytes", "Bytes read from the tier.", "read_bytes"),
        ("pdserve:kv_tier_written_bytes", "Bytes written to the tier.", "written_bytes"),
        (
            "pdserve:kv_tier_corrupt_blocks",
            "Blocks found damaged (checksum, size, layout) and dropped.",
            "num_corrupt_blocks",
        ),
        (
            "pdserve:kv_tier_lookup_blocks",
            "Blocks lookups asked of the tier (hit rate: hit_blocks / lookup_blocks).",
            "num_lookup_blocks",
        ),
    )

    def collect(self) -> Iterator[Metric]:
        workers = self._workers()
        labels = ["model_name", "worker", "role"]
        for name, doc, attribute in self.GAUGES:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for worker in workers:
                values = [self.model_name, worker.worker_id, worker.role]
                family.add_metric(values, float(getattr(worker, attribute)))
            yield family
        roles = GaugeMetricFamily(
            "pdserve:worker_role",
            "1 for each worker's current role (it changes at runtime).",
            labels=labels,
        )
        for worker in workers:
            roles.add_metric([self.model_name, worker.worker_id, worker.role], 1.0)
        yield roles
        for name, doc, attribute in self.COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=labels)
            for worker in workers:
                values = [self.model_name, worker.worker_id, worker.role]
                counter.add_metric(values, float(getattr(worker, attribute)))
            yield counter
        tier_labels = [*labels, "tier"]
        for kind, specs in (
            (GaugeMetricFamily, self.TIER_GAUGES),
            (CounterMetricFamily, self.TIER_COUNTERS),
        ):
            for name, doc, attribute in specs:
                family = kind(name, doc, labels=tier_labels)
                for worker in workers:
                    for tier in worker.kv_tiers:
                        values = [self.model_name, worker.worker_id, worker.role, tier.tier]
                        family.add_metric(values, float(getattr(tier, attribute)))
                yield family
        yield from tier_admission_families(self.model_name, workers, labels)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names are fixed; nothing to check at registration

    def _workers(self) -> list:
        if self.readiness is None:
            return []
        try:
            return list(self.readiness().workers)
        except Exception:
            # A scrape must not fail because one status source did: leave the gauges out.
            logger.exception("reading worker status for /metrics failed")
            return []
