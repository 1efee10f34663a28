"""The live dashboard: `/dashboard` (a page people look at instead of reading `/metrics`).

    GET /dashboard        the page: one static HTML file from the package, no build step;
                          it polls the data route every 2 s and draws with plain SVG
    GET /dashboard/data   JSON: workers (role, state, queues, KV use, prefix and tier
                          hits), the last minutes of TTFT / TPOT / throughput / SLO
                          attainment, recent role switches and planner decisions

The data route is protected like `/metrics` (the same key when probes are protected); the
page itself holds no data, and asks for the key when the data route answers 401.

Series come from the router's own Prometheus registry, sampled every `SAMPLE_S` into a
ring of `NUM_SAMPLES`: per interval, the mean TTFT and TPOT (deltas of the histograms'
sums and counts), output tokens per second, and the share of first tokens within the
planner's TTFT target (from the histogram's buckets). No second bookkeeping of requests.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends
from starlette.responses import HTMLResponse, JSONResponse

from pdserve.router.client import EngineClient
from pdserve.router.metrics import RouterMetrics

SAMPLE_S = 2.0
NUM_SAMPLES = 180  # six minutes


class Telemetry:
    """Interval series sampled from the metrics registry (module docstring)."""

    def __init__(self, metrics: RouterMetrics, slo_ttft_ms: float | None = None) -> None:
        self.metrics = metrics
        self.slo_ttft_s = slo_ttft_ms / 1e3 if slo_ttft_ms else None
        self.samples: deque[dict[str, Any]] = deque(maxlen=NUM_SAMPLES)
        self._last: dict[str, float] | None = None
        self._task: asyncio.Task | None = None

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_S)

    def _read(self) -> dict[str, float]:
        labels = {"model_name": self.metrics.model_name}
        get = self.metrics.registry.get_sample_value
        values = {
            "time": time.monotonic(),
            "ttft_sum": get("vllm:time_to_first_token_seconds_sum", labels) or 0.0,
            "ttft_count": get("vllm:time_to_first_token_seconds_count", labels) or 0.0,
            "tpot_sum": get("vllm:inter_token_latency_seconds_sum", labels) or 0.0,
            "tpot_count": get("vllm:inter_token_latency_seconds_count", labels) or 0.0,
            "tokens": get("vllm:generation_tokens_total", labels) or 0.0,
            "ttft_ok": 0.0,
        }
        if self.slo_ttft_s is not None:
            bucket = _bucket_at_most(self.slo_ttft_s)
            if bucket is not None:
                values["ttft_ok"] = (
                    get("vllm:time_to_first_token_seconds_bucket", {**labels, "le": bucket}) or 0.0
                )
        return values

    def sample(self) -> None:
        now = self._read()
        last, self._last = self._last, now
        if last is None:
            return
        dt = max(now["time"] - last["time"], 1e-9)
        num_first = now["ttft_count"] - last["ttft_count"]
        num_tokens = now["tpot_count"] - last["tpot_count"]
        self.samples.append(
            {
                "t": round(now["time"], 2),
                "ttft_s": (now["ttft_sum"] - last["ttft_sum"]) / num_first if num_first else None,
                "tpot_s": (now["tpot_sum"] - last["tpot_sum"]) / num_tokens if num_tokens else None,
                "tokens_per_s": (now["tokens"] - last["tokens"]) / dt,
                "ttft_attainment": (now["ttft_ok"] - last["ttft_ok"]) / num_first
                if num_first and self.slo_ttft_s is not None
                else None,
            }
        )


def _bucket_at_most(limit_s: float) -> str | None:
    """The largest TTFT bucket boundary ≤ the target, as Prometheus labels it."""
    from pdserve.router.metrics import TTFT_BUCKETS

    below = [b for b in TTFT_BUCKETS if b <= limit_s]
    return repr(float(max(below))) if below else None


def dashboard_router(
    client: EngineClient, metrics: RouterMetrics, data_auth: list, route_class: type
) -> APIRouter:
    """`/dashboard` and its data route; `data_auth`: the checks that guard `/metrics`."""
    router = APIRouter(route_class=route_class)
    planner = getattr(client, "planner", None)
    slo = planner.config.slo_ttft_ms if planner is not None else None
    telemetry = Telemetry(metrics, slo)

    @router.get("/dashboard", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page())

    @router.get("/dashboard/data", dependencies=[Depends(d) for d in data_auth])
    async def data() -> JSONResponse:
        telemetry.ensure_running()
        return JSONResponse(snapshot(client, telemetry))

    return router


def _page() -> str:
    return resources.files("pdserve.router").joinpath("dashboard.html").read_text("utf-8")


def snapshot(client: EngineClient, telemetry: Telemetry) -> dict[str, Any]:
    readiness = client.readiness()
    workers = []
    handles = getattr(getattr(client, "pool", None), "workers", {})
    for w in readiness.workers:
        handle = handles.get(w.worker_id)
        state = "serving" if w.is_alive else "dead"
        if handle is not None and handle.is_alive and handle.is_draining:
            state = "draining"
        hits = (
            w.num_prefix_hit_tokens / w.num_prefix_query_tokens
            if w.num_prefix_query_tokens
            else None
        )
        workers.append(
            {
                "worker_id": w.worker_id,
                "role": w.role,
                "state": state,
                "num_running": w.num_running,
                "num_waiting": w.num_waiting,
                "kv_usage": w.kv_usage,
                "prefix_hit_rate": hits,
                "tier_hit_blocks": {t.tier: t.num_hit_blocks for t in w.kv_tiers},
            }
        )
    elastic = getattr(client, "elastic", None)
    planner = getattr(client, "planner", None)
    now = time.monotonic()
    return {
        "model": client.model_name,
        "ready": readiness.is_ready,
        "workers": workers,
        "series": list(telemetry.samples),
        "now": round(now, 2),
        "role_switches": [
            {
                "age_s": round(now - when, 1),
                "worker_id": s.worker_id,
                "from": s.old_role,
                "to": s.new_role,
                "reason": reason,
                "num_finished": s.num_finished,  # ran to the end during the drain
                "num_migrated": s.num_migrated,  # still running after it: moved
                "seconds": round(s.seconds, 2),
            }
            for when, s, reason in (elastic.history if elastic is not None else [])
        ],
        "planner": [
            {"age_s": round(now - when, 1), "reason": d.reason, "target": d.target.as_dict()}
            for when, d in (planner.history if planner is not None else [])
        ][-20:],
    }
