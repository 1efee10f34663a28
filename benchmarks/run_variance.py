"""Run-to-run variance of real runs: the noise floor the simulator's errors sit on.

Reads the real runs that `benchmarks/sim_validation.py` kept in several `--out-dir`s (the
same cases, same seed, same arrivals, run one after another) and prints, per case and
metric (TTFT p50/p99, TPOT p50/p99, output throughput, goodput), every run's value, the
mean, and the spread: the largest deviation of a run from the mean, relative to the mean
(the error a perfect model of the mean run would show against the worst single run).

    python benchmarks/run_variance.py DIR1 DIR2 DIR3 [--json-out v.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common  # noqa: F401  (sys.path and thread settings, like every benchmark)
from sim_validation import row

METRICS = ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "throughput", "goodput")


def real_rows(folder: Path) -> dict[str, dict]:
    """The real runs in `folder`, by case tag, summarised with the SLO they were run with."""
    from pdserve.bench import metrics
    from pdserve.bench.types import SLO

    rows = {}
    for path in sorted(folder.glob("*_real.json")):
        data = json.loads(path.read_text())
        run = metrics.from_json(path.read_text())
        config = data.get("config", {})
        slo = SLO(config.get("slo_ttft_ms"), config.get("slo_tpot_ms"))
        rows[path.name.removesuffix("_real.json")] = row(metrics.summarize(run, slo))
    return rows


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, largest |value - mean| / mean)."""
    mean = sum(values) / len(values)
    if mean == 0:
        return mean, 0.0
    return mean, max(abs(v - mean) for v in values) / mean


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    runs = [real_rows(d) for d in args.dirs]
    cases = sorted(set.intersection(*(set(r) for r in runs)))
    out = {}
    print("| case | metric | runs | mean | spread |")
    print("|---|---|---|---|---|")
    for case in cases:
        out[case] = {}
        for metric in METRICS:
            values = [r[case][metric] for r in runs]
            if any(v is None for v in values):
                continue
            mean, dev = spread(values)
            out[case][metric] = {"values": values, "mean": mean, "spread": dev}
            shown = " / ".join(f"{v:.3g}" for v in values)
            print(f"| {case} | {metric} | {shown} | {mean:.3g} | ±{100 * dev:.0f} % |")
    if args.json_out:
        args.json_out.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
