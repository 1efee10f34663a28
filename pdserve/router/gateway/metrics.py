"""The gateway's Prometheus metrics, registered in the router's registry.

    pdserve:key_requests_total{key_name}            requests authenticated with the key
    pdserve:key_prompt_tokens_total{key_name}       prompt tokens of its finished requests
    pdserve:key_generation_tokens_total{key_name}   tokens generated for it
    pdserve:key_rate_limited_total{key_name,limit}  429s from its quotas (requests, tokens,
                                                    concurrency)
    pdserve:requests_rejected_total{reason}         refusals at the edge: body_too_large,
                                                    invalid, unauthorized, queue_full,
                                                    ttft_unattainable, evicted, deadline
    pdserve:admission_queued_requests               admitted, waiting for a first token
    pdserve:admission_queued_tokens                 their prompt tokens (x n)
    pdserve:admission_running_sequences             admitted sequences past their first token
    pdserve:admission_prefill_tokens_per_second     the TTFT model's current rate

Requests without a key are counted under `key_name="none"`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from pdserve.router.gateway.admission import Admission

NO_KEY = "none"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, admission: Admission) -> None:
        key = ["key_name"]
        self.key_requests = Counter(
            "pdserve:key_requests", "Requests per API key.", key, registry=registry
        )
        self.key_prompt_tokens = Counter(
            "pdserve:key_prompt_tokens", "Prompt tokens per API key.", key, registry=registry
        )
        self.key_generation_tokens = Counter(
            "pdserve:key_generation_tokens",
            "Generated tokens per API key.",
            key,
            registry=registry,
        )
        self.key_rate_limited = Counter(
            "pdserve:key_rate_limited",
            "Requests refused by a key's quota.",
            [*key, "limit"],
            registry=registry,
        )
        self.rejected = Counter(
            "pdserve:requests_rejected",
            "Requests refused at the HTTP edge, by reason.",
            ["reason"],
            registry=registry,
        )
        gauges = (
            ("queued_requests", "Admitted requests waiting for their first token.", "num_queued"),
            ("queued_tokens", "Prompt tokens of those requests.", "num_queued_tokens"),
            ("running_sequences", "Admitted sequences past their first token.", "num_running"),
        )
        for name, doc, attribute in gauges:
            gauge = Gauge(f"pdserve:admission_{name}", doc, registry=registry)
            gauge.set_function(lambda a=attribute: getattr(admission, a))
        rate = Gauge(
            "pdserve:admission_prefill_tokens_per_second",
            "Prompt tokens per second the admission TTFT model assumes.",
            registry=registry,
        )
        rate.set_function(lambda: admission.model.tokens_per_s)
