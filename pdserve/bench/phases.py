"""Phase-shifting load for `pdserve bench run --phases FILE`: traffic that changes over time.

A phases file is YAML (or JSON) with a `phases:` list, run in order:

    phases:
      - workload: code                 # any workload name (`bench/workloads.py`)
        duration_s: 120                # how long this phase sends
        rate: 14                       # requests/s (Poisson; `burstiness` for gamma)
      - name: long                     # optional label (default: the workload's name)
        workload: "random:in=1024,out=128"
        duration_s: 120
        rate: 1.6
        slo: {ttft_ms: 5000, tpot_ms: 50}        # default: the workload's SLO
        extra_body: {slo_class: long}            # merged into this phase's requests
      - {workload: chat, duration_s: 120, rate: 6}
    seed: 0                            # optional (default: --seed): arrivals and prompts

`build_load` turns it into one list of `RequestSpec`s with send times (`timestamp_s`):
phase i's arrivals are its own seeded Poisson (or gamma) process from the phase's start,
cut at its duration, and its prompts are sampled from its workload with a seed of its
own, so two phases of one workload share no prompt a prefix cache could carry over. The
load generator replays them as a trace; records come back in send order, so record j
belongs to the phase of spec j. The run's config keeps the phases with their request
counts (`phases_config`), and `summarize_phases` splits any saved run again.

Per phase and over the whole run: SLO attainment (requests meeting *their phase's* SLO /
requests sent, errors count as misses) and goodput = requests meeting their SLO / the
phase's scheduled duration (the whole run: / the sum of durations). With the offered
load fixed by the file, goodput is what the server made of it: at most the offered rate,
comparable across servers given the same file. Requests still running when the next
phase starts count for the phase that sent them.

Every check runs before anything is sent; an error names its place (`phases[1].rate`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pdserve.bench.types import SLO, RequestSpec, RunResult, Summary
from pdserve.errors import ConfigError

PHASE_KEYS = ("name", "workload", "duration_s", "rate", "burstiness", "slo", "extra_body")
FILE_KEYS = ("phases", "seed")
SEED_STRIDE = 1000  # phase i samples prompts with seed * SEED_STRIDE + i


@dataclass(frozen=True, slots=True)
class Phase:
    workload: str
    duration_s: float
    rate: float
    slo: SLO | None = None  # None: the workload's default SLO
    burstiness: float = 1.0
    name: str | None = None
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.workload


@dataclass(frozen=True)
class PhasedLoad:
    phases: tuple[Phase, ...]
    slos: tuple[SLO, ...]  # each phase's effective SLO
    specs: list[RequestSpec]  # in send order, `timestamp_s` set
    counts: tuple[int, ...]  # requests per phase (specs are grouped by phase, in order)

    @property
    def starts(self) -> tuple[float, ...]:
        return tuple(itertools.accumulate((p.duration_s for p in self.phases[:-1]), initial=0.0))


# ---- parsing --------------------------------------------------------------------------


def load_phases(path: str | Path) -> tuple[tuple[Phase, ...], int | None]:
    """The phases and the seed of a phases file (None when it sets none)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("phases", f"{path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError("phases", f"{path} is not valid YAML: {e}") from None
    return parse_file(data)


def parse_file(data: Any) -> tuple[tuple[Phase, ...], int | None]:
    if not isinstance(data, Mapping):
        raise ConfigError("phases", f"expected a mapping with a `phases:` list, got {data!r}")
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key; known: {list(FILE_KEYS)}")
    seed = data.get("seed")
    if seed is not None and not _is_int(seed):
        raise ConfigError("seed", f"expected an integer, got {seed!r}")
    return parse_phases(data.get("phases")), seed


def parse_phases(data: Any, where: str = "phases") -> tuple[Phase, ...]:
    if not isinstance(data, list | tuple) or not data:
        raise ConfigError(where, f"expected a non-empty list of phases, got {data!r}")
    return tuple(_phase(f"{where}[{i}]", item) for i, item in enumerate(data))


def _phase(where: str, item: Any) -> Phase:
    if not isinstance(item, Mapping):
        raise ConfigError(where, f"expected a mapping, got {item!r}")
    unknown = sorted(set(item) - set(PHASE_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown; known: {list(PHASE_KEYS)}")
    for key in ("workload", "duration_s", "rate"):
        if key not in item:
            raise ConfigError(f"{where}.{key}", "missing")
    workload = item["workload"]
    if not isinstance(workload, str):
        raise ConfigError(f"{where}.workload", f"expected a workload name, got {workload!r}")
    from pdserve.bench.workloads import get_workload

    try:
        get_workload(workload)
    except ConfigError as e:
        raise ConfigError(f"{where}.workload", str(e).removeprefix(f"{e.field}: ")) from None
    name = item.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}.name", f"expected a string, got {name!r}")
    extra_body = item.get("extra_body") or {}
    if not isinstance(extra_body, Mapping):
        raise ConfigError(f"{where}.extra_body", f"expected a mapping, got {extra_body!r}")
    return Phase(
        workload=workload,
        duration_s=_positive(f"{where}.duration_s", item["duration_s"], "seconds"),
        rate=_positive(f"{where}.rate", item["rate"], "requests/s"),
        slo=_slo(f"{where}.slo", item.get("slo")),
        burstiness=_positive(f"{where}.burstiness", item.get("burstiness", 1.0), "a gamma shape"),
        name=name,
        extra_body=dict(extra_body),
    )


def _positive(where: str, value: Any, unit: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(where, f"expected a finite number > 0 ({unit}), got {value!r}")
    return float(value)


def _slo(where: str, data: Any) -> SLO | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected {{ttft_ms, tpot_ms}}, got {data!r}")
    unknown = sorted(set(data) - {"ttft_ms", "tpot_ms"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "unknown; known: ['ttft_ms', 'tpot_ms']")
    for key in ("ttft_ms", "tpot_ms"):
        if key not in data:
            raise ConfigError(f"{where}.{key}", "missing: give both ttft_ms and tpot_ms")
    return SLO(
        _positive(f"{where}.ttft_ms", data["ttft_ms"], "ms"),
        _positive(f"{where}.tpot_ms", data["tpot_ms"], "ms"),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---- the load -------------------------------------------------------------------------


def phase_times(phase: Phase, seed: int, index: int) -> list[float]:
    """Send offsets within the phase (0 <= t < duration_s), seeded per phase."""
    from pdserve.bench.loadgen import Arrival, arrival_times

    arrival = Arrival.gamma(phase.rate, phase.burstiness)
    times = arrival_times(arrival, seed * SEED_STRIDE + index)
    return list(itertools.takewhile(lambda t: t < phase.duration_s, times))


def build_load(phases: Sequence[Phase], seed: int = 0, tokenizer: Any = None) -> PhasedLoad:
    """Every phase's requests with their send times, in order (module docstring)."""
    from pdserve.bench.workloads import get_workload

    specs: list[RequestSpec] = []
    counts, slos = [], []
    start = 0.0
    for index, phase in enumerate(phases):
        workload = get_workload(phase.workload)
        times = phase_times(phase, seed, index)
        sampled = workload.sample(len(times), seed * SEED_STRIDE + index, tokenizer)
        for t, spec in zip(times, sampled, strict=True):
            extra = {**(spec.extra_body or {}), **phase.extra_body} or None
            specs.append(replace(spec, timestamp_s=start + t, extra_body=extra))
        counts.append(len(times))
        slos.append(phase.slo or workload.default_slo)
        start += phase.duration_s
    if not specs:
        raise ConfigError("phases", "no phase sends a request: raise a rate or a duration")
    forms = {spec.prompt is None for spec in specs}
    if len(forms) > 1:
        raise ConfigError(
            "phases", "phases mix chat-message workloads with prompt workloads; use one kind"
        )
    return PhasedLoad(tuple(phases), tuple(slos), specs, tuple(counts))


def phases_config(load: PhasedLoad) -> list[dict[str, Any]]:
    """The phases as `RunResult.config["phases"]` keeps them (what `summarize_phases` reads)."""
    return [
        {
            "name": phase.label,
            "workload": phase.workload,
            "duration_s": phase.duration_s,
            "rate": phase.rate,
            "burstiness": phase.burstiness,
            "start_s": start,
            "num_requests": count,
            "slo_ttft_ms": slo.ttft_ms,
            "slo_tpot_ms": slo.tpot_ms,
            "extra_body": dict(phase.extra_body),
        }
        for phase, slo, count, start in zip(
            load.phases, load.slos, load.counts, load.starts, strict=True
        )
    ]


# ---- summaries ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PhaseSummary:
    name: str
    start_s: float
    duration_s: float
    rate: float
    slo: SLO | None  # None for the whole run (each phase's own SLO applies)
    num_requests: int
    num_errors: int
    num_met: int
    summary: Summary  # latencies and throughputs of this phase's requests

    @property
    def attainment(self) -> float:
        return self.num_met / self.num_requests if self.num_requests else 0.0

    @property
    def goodput(self) -> float:
        return self.num_met / self.duration_s


def summarize_phases(result: RunResult) -> list[PhaseSummary]:
    """One summary per phase of a phased run, then the whole run (named "all")."""
    from pdserve.bench import metrics
    from pdserve.bench.loadgen import _span

    phases = result.config.get("phases")
    if not phases:
        raise ConfigError("phases", "this run has no phases (not made with --phases)")
    if sum(p["num_requests"] for p in phases) != len(result.records):
        raise ConfigError("phases", "the run's records do not match its phases' request counts")
    out, offset, num_met_all = [], 0, 0
    for p in phases:
        records = result.records[offset : offset + p["num_requests"]]
        offset += p["num_requests"]
        slo = SLO(p["slo_ttft_ms"], p["slo_tpot_ms"])
        num_met = sum(slo.is_met(r) for r in records)
        num_met_all += num_met
        part = RunResult(result.config, records, _span(records))
        out.append(_phase_summary(p["name"], p, slo, num_met, metrics.summarize(part, slo)))
    total = {
        "start_s": 0.0,
        "duration_s": sum(p["duration_s"] for p in phases),
        "rate": len(result.records) / sum(p["duration_s"] for p in phases),
    }
    whole = metrics.summarize(result)
    out.append(_phase_summary("all", total, None, num_met_all, whole))
    return out


def _phase_summary(name, p, slo, num_met, summary: Summary) -> PhaseSummary:
    return PhaseSummary(
        name,
        p["start_s"],
        p["duration_s"],
        p["rate"],
        slo,
        summary.num_requests,
        summary.num_errors,
        num_met,
        summary,
    )


def format_phases(parts: Sequence[PhaseSummary]) -> str:
    header = (
        f"{'phase':<24}{'start s':>8}{'rate':>7}{'reqs':>6}{'errors':>7}{'attain':>8}"
        f"{'goodput':>9}{'TTFT p90':>10}{'TPOT p90':>10}  SLO ms (TTFT/TPOT)"
    )
    lines = [header]
    for part in parts:
        s = part.summary
        slo = "each phase's" if part.slo is None else f"{part.slo.ttft_ms:g}/{part.slo.tpot_ms:g}"
        lines.append(
            f"{part.name[:23]:<24}{part.start_s:>8.0f}{part.rate:>7.2f}{part.num_requests:>6}"
            f"{part.num_errors:>7}{100 * part.attainment:>7.1f}%{part.goodput:>9.3f}"
            f"{_p90(s.ttft_ms):>10}{_p90(s.tpot_ms):>10}  {slo}"
        )
    return "\n".join(lines)


def phases_to_dict(parts: Sequence[PhaseSummary]) -> list[dict[str, Any]]:
    from pdserve.bench import metrics

    return [
        {
            "name": part.name,
            "start_s": part.start_s,
            "duration_s": part.duration_s,
            "rate": part.rate,
            "num_requests": part.num_requests,
            "num_errors": part.num_errors,
            "num_met": part.num_met,
            "attainment": part.attainment,
            "goodput": part.goodput,
            "summary": metrics.summary_to_dict(part.summary),
        }
        for part in parts
    ]


def _p90(p) -> str:
    return "-" if p is None else f"{p.p90:.1f}"
