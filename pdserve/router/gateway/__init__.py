"""The gateway: what stands between the internet and dispatch (issue 14).

    config.py     GatewayConfig: every limit and switch of the HTTP edge
    limits.py     body size, per-request limits, unsupported fields, tokenising off the loop
    admission.py  SLO-aware admission: queued tokens -> predicted TTFT -> 429 early
    ttft_model.py the TTFT predictor admission fits to measured TTFTs
    keys.py       API keys (constant-time), token-bucket quotas, x-ratelimit headers
    gate.py       Gateway (the checks in order) and Lease (what an accepted request holds)
    metrics.py    per-key and admission metrics
    errors.py     the refusals, mapped to HTTP by router/serving.py

Torch-free, like the rest of the router.
"""

from pdserve.router.gateway.config import GatewayConfig
from pdserve.router.gateway.gate import Gateway, Lease

__all__ = ["Gateway", "GatewayConfig", "Lease"]
