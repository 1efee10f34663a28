"""What a run measured, in numbers: `summarize`, the text table, and the saved JSON.

- `summarize(result, slo=None, price_per_hour=None) -> Summary`: mean/p50/p90/p99 of
  TTFT, TPOT, ITL and E2E in milliseconds over successful requests; request and token
  throughput over the run's span; with an SLO, attainment and goodput; with a price per
  machine-hour, the cost of a million output tokens.
- `format_summary(summary, config=None) -> str`: a readable table (the run's settings
  first, when given, so a pasted result says what produced it).
- `to_json(result, summary=None) -> str`, `from_json(text) -> RunResult`: a run saved
  with its records, so it can be summarised again under another SLO or compared later;
  `summary_from_dict` reads a saved summary. `run_to_dict`/`run_from_dict` are the same
  as plain data, for embedding in larger files (goodput searches, sweeps).

Definitions (the same as vLLM's `benchmark_serving` where it has one):
- percentiles: numpy's default linear interpolation between closest ranks;
- TPOT of a request: (E2E - TTFT) / (output tokens - 1), for requests of >= 2 tokens;
- ITL: every gap between two text chunks of every request, pooled;
- throughputs divide by `RunResult.duration_s`, first send to last completion;
- SLO attainment: requests meeting both targets / ALL requests — an error is a miss;
- goodput: requests meeting both targets / duration (requests per second);
- cost per 1M output tokens: price_per_hour / (output tok/s * 3600) * 1e6.
Torch-free; numpy only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pdserve.bench.types import SLO, Percentiles, RequestRecord, RunResult, Summary

FORMAT = "pdserve-bench-run"
FORMAT_VERSION = 1


def percentiles(values_s: Sequence[float]) -> Percentiles | None:
    """Mean, p50, p90, p99 in milliseconds of values in seconds; None when empty."""
    if not values_s:
        return None
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return Percentiles(mean=float(ms.mean()), p50=float(p50), p90=float(p90), p99=float(p99))


def summarize(
    result: RunResult, slo: SLO | None = None, price_per_hour: float | None = None
) -> Summary:
    records = result.records
    ok = [r for r in records if r.is_ok]
    duration = result.duration_s
    num_output = sum(r.num_output_tokens for r in ok)
    num_prompt = sum(r.num_prompt_tokens for r in ok)
    output_throughput = _per_second(num_output, duration)
    attainment = goodput = None
    if slo is not None:
        num_met = sum(slo.is_met(r) for r in records)
        attainment = num_met / len(records) if records else 0.0
        goodput = _per_second(num_met, duration)
    cost = None
    if price_per_hour is not None and output_throughput > 0:
        cost = price_per_hour / (output_throughput * 3600) * 1e6
    return Summary(
        num_requests=len(records),
        num_ok=len(ok),
        num_errors=len(records) - len(ok),
        duration_s=duration,
        request_throughput=_per_second(len(ok), duration),
        output_throughput=output_throughput,
        total_token_throughput=_per_second(num_prompt + num_output, duration),
        ttft_ms=percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=percentiles([t for r in ok if (t := r.tpot_s) is not None]),
        itl_ms=percentiles([gap for r in ok for gap in r.itl_s]),
        e2e_ms=percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
        slo=slo,
        slo_attainment=attainment,
        goodput=goodput,
        cost_per_million_output_tokens=cost,
        num_without_usage=sum(not r.has_usage for r in ok),
        prefix_cache_hit_rate=_hit_rate(ok),
    )


def _hit_rate(records: Sequence[RequestRecord]) -> float | None:
    reported = [r for r in records if r.num_cached_tokens is not None]
    prompt = sum(r.num_prompt_tokens for r in reported)
    return sum(r.num_cached_tokens for r in reported) / prompt if prompt else None


def _per_second(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0


# ---- text -----------------------------------------------------------------------------


def format_summary(summary: Summary, config: Mapping[str, Any] | None = None) -> str:
    lines = []
    if config:
        width = max(len(k) for k in config)
        lines += [f"{k:<{width}}  {_plain(v)}" for k, v in config.items()] + [""]
    s = summary
    lines += [
        f"requests            {s.num_requests} ({s.num_ok} ok, {s.num_errors} errors)"
        f" in {s.duration_s:.2f} s",
        f"request throughput  {s.request_throughput:.3f} req/s",
        f"output throughput   {s.output_throughput:.1f} tok/s",
        f"total throughput    {s.total_token_throughput:.1f} tok/s (prompt + output)",
        "",
        f"{'(ms)':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, p in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2E", s.e2e_ms)):
        cells = [p.mean, p.p50, p.p90, p.p99] if p is not None else []
        lines.append(
            f"{name:<10}" + "".join(f"{v:>10.2f}" for v in cells) + ("  -" if not cells else "")
        )
    if s.slo is not None:
        lines += [
            "",
            f"SLO                 TTFT <= {s.slo.ttft_ms:g} ms, TPOT <= {s.slo.tpot_ms:g} ms",
            f"SLO attainment      {100 * (s.slo_attainment or 0.0):.1f}% (errors count as misses)",
            f"goodput             {s.goodput or 0.0:.3f} req/s meeting both",
        ]
    if s.prefix_cache_hit_rate is not None:
        lines.append(f"prefix cache        {100 * s.prefix_cache_hit_rate:.1f}% of prompt tokens")
    if s.cost_per_million_output_tokens is not None:
        lines.append(
            f"cost                ${s.cost_per_million_output_tokens:.4f} per 1M output tokens"
        )
    if s.num_without_usage:
        lines.append(
            f"WARNING: {s.num_without_usage} requests got no usage from the server; "
            "their token counts are 0 and token throughputs are understated"
        )
    return "\n".join(lines)


# ---- JSON -----------------------------------------------------------------------------


def to_json(result: RunResult, summary: Summary | None = None) -> str:
    return json.dumps(run_to_dict(result, summary), indent=1, allow_nan=False)


def from_json(text: str) -> RunResult:
    return run_from_dict(json.loads(text))


def run_to_dict(result: RunResult, summary: Summary | None = None) -> dict[str, Any]:
    """Plain, strict-JSON data; non-finite floats become null (in the config: "inf")."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": _finite(result.config, keep_inf=True),
        "duration_s": result.duration_s,
        "records": [_finite(dataclasses.asdict(r)) for r in result.records],
        "summary": None if summary is None else summary_to_dict(summary),
    }


def run_from_dict(data: Mapping[str, Any]) -> RunResult:
    if data.get("format") != FORMAT:
        raise ValueError(f"not a saved pdserve bench run (format={data.get('format')!r})")
    names = {f.name for f in dataclasses.fields(RequestRecord)}
    records = [RequestRecord(**{k: v for k, v in r.items() if k in names}) for r in data["records"]]
    return RunResult(config=dict(data["config"]), records=records, duration_s=data["duration_s"])


def summary_to_dict(summary: Summary) -> dict[str, Any]:
    return _finite(dataclasses.asdict(summary))


def summary_from_dict(data: Mapping[str, Any]) -> Summary:
    fields = {f.name for f in dataclasses.fields(Summary)}
    values = {k: v for k, v in data.items() if k in fields}
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        if values.get(name) is not None:
            values[name] = Percentiles(**values[name])
    if values.get("slo") is not None:
        values["slo"] = SLO(**values["slo"])
    return Summary(**values)


def _finite(value: Any, keep_inf: bool = False) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if keep_inf and value > 0 else None
    if isinstance(value, Mapping):
        return {k: _finite(v, keep_inf) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v, keep_inf) for v in value]
    return value


def _plain(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)
