"""Price a real run's engine steps with a profile: which steps the cost model gets wrong.

Input: the step logs of a real `pdserve serve` run (`PDSERVE_STEP_LOG`, engine/step_log.py;
`benchmarks/sim_validation.py --step-log` writes them to `<out-dir>/<case>_steps/`). Each
logged step has the cost model's shape (tokens, sampled rows, prefill attention, decode
context) and its measured phases. For every worker it prints, by step class (decode rows
only; one prefill span alone; prefill spans with decode rows; by tokens in the step):
the number of steps, the measured execute time, the profile's price of the same shape
(`Profile.cost(threads).seconds`), their ratio (median, and summed time over summed
price), and where the rest of the worker's wall time went: scheduling and updating around
`execute`, and the gaps between one step's end and the next one's start while it was busy
(the worker loop's messaging: receiving requests, sending outputs, KV events).

    python benchmarks/step_log_compare.py --profile P.json DIR [DIR ...]

With `--fit-out OUT.json` it also writes a copy of the profile calibrated on the logs
(sim/step_log_fit.py): each logged thread count's step cost fitted to the steps that ran
alone (trimmed), and every size's loop overhead (`step_overhead_s`).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import common  # noqa: F401  (sys.path and thread settings, like every benchmark)

from pdserve.engine.step_log import read_step_log
from pdserve.sim.cost_model import StepShape
from pdserve.sim.profile import Profile

BUSY_GAP_S = 0.05
# A thread count is refitted only from this many steps that ran alone, this many of them
# with a prefill span (two busy workers rarely leave one alone: a few hundred decode steps
# do not pin tokens(N) of prefills).
MIN_STEPS = 500
MIN_PREFILL_STEPS = 50  # a gap longer than this between steps is idle time, not loop overhead


def step_class(r: dict) -> str:
    if r["prefills"] == 0:
        return f"decode x{_bucket(r['decodes'])}"
    kind = "prefill" if r["decodes"] == 0 else "mixed"
    return f"{kind} {_bucket(r['tokens'])} tok"


def _bucket(n: int) -> str:
    edges = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
    for lo, hi in itertools.pairwise(edges):
        if n < hi:
            return f"{lo}-{hi - 1}" if hi - 1 > lo else str(lo)
    return f"{edges[-1]}+"


def price(profile: Profile, r: dict) -> float:
    shape = StepShape(r["tokens"], r["sampled"], r["prefill_attention"], r["decode_context"])
    return profile.cost(r["threads"]).seconds(shape)


def summarize(profile: Profile, records: list[dict]) -> dict:
    """Per step class: count, measured and priced seconds; and the worker's time budget."""
    classes: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        classes.setdefault(step_class(r), []).append((r["execute"], price(profile, r)))
    around = sum(r["schedule"] + r["update"] for r in records)
    gaps = []
    for a, b in itertools.pairwise(records):
        gap = b["t"] - (a["t"] + a["schedule"] + a["execute"] + a["update"])
        if 0 <= gap < BUSY_GAP_S:
            gaps.append(gap)
    return {
        "classes": classes,
        "execute": sum(r["execute"] for r in records),
        "priced": sum(p for items in classes.values() for _, p in items),
        "around": around,
        "busy_gaps": sum(gaps),
        "num_steps": len(records),
        "span": records[-1]["t"] - records[0]["t"] if records else 0.0,
    }


def print_summary(name: str, s: dict) -> None:
    print(
        f"\n{name}: {s['num_steps']} steps over {s['span']:.1f} s; execute {s['execute']:.2f} s "
        f"(priced {s['priced']:.2f} s, x{s['execute'] / max(s['priced'], 1e-9):.2f}); "
        f"schedule+update {s['around']:.2f} s; gaps between steps while busy "
        f"{s['busy_gaps']:.2f} s"
    )
    print("| step class | steps | execute ms median | priced ms median | ratio median | Σ ratio |")
    print("|---|---|---|---|---|---|")
    for key in sorted(s["classes"], key=_order):
        items = s["classes"][key]
        measured = statistics.median(m for m, _ in items)
        priced = statistics.median(p for _, p in items)
        ratio = statistics.median(m / p for m, p in items if p > 0)
        total = sum(m for m, _ in items) / max(sum(p for _, p in items), 1e-12)
        print(
            f"| {key} | {len(items)} | {1e3 * measured:.1f} | {1e3 * priced:.1f} | "
            f"{ratio:.2f} | {total:.2f} |"
        )


def _order(key: str) -> tuple:
    kind, _, rest = key.partition(" ")
    first = rest.lstrip("x").split("-")[0].split(" ")[0].rstrip("+")
    return (kind, int(first) if first.isdigit() else 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", required=True)
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--fit-out", type=Path, default=None, help="write a calibrated profile")
    p.add_argument("--trim", type=float, default=None, help="sim/step_log_fit.py's TRIM")
    args = p.parse_args(argv)
    profile = Profile.load(args.profile)
    for folder in args.dirs:
        for stem, records in read_step_log(folder).items():
            if records:
                print_summary(f"{folder.name}/{stem}", summarize(profile, records))
    if args.fit_out:
        calibrated = calibrate(profile, args.dirs, args.trim)
        calibrated.save(args.fit_out)
        print(f"\nwrote {args.fit_out}: " + "; ".join(calibrated.notes[-2:]))
    return 0


def calibrate(profile: Profile, dirs: list[Path], trim: float | None) -> Profile:
    """`profile` with its step costs refitted on the logs (module docstring)."""
    import dataclasses

    from pdserve.sim import step_log_fit as f

    by_threads: dict[int, list[dict]] = {}
    logs = []
    for folder in dirs:
        run = read_step_log(folder)
        logs += list(run.values())
        for records in f.alone(run).values():
            for r in records:
                by_threads.setdefault(r["threads"], []).append(r)
    overhead = f.loop_overhead_s(logs)
    costs = dict(profile.costs)
    for threads, records in sorted(by_threads.items()):
        num_prefill = sum(1 for r in records if r["prefills"])
        if len(records) < MIN_STEPS or num_prefill < MIN_PREFILL_STEPS:
            print(
                f"{threads} threads: {len(records)} steps ran alone ({num_prefill} with a "
                "prefill span): too few to fit; the profile's cost is kept"
            )
            del by_threads[threads]
            continue
        costs[threads] = f.fit_step_log(records, trim=trim if trim is not None else f.TRIM)
    calibrated = dataclasses.replace(profile, costs=costs)
    calibrated = f.with_step_overhead(calibrated, overhead)
    sizes = ", ".join(f"{t} threads: {len(r)} steps" for t, r in sorted(by_threads.items()))
    sizes = sizes or "none refitted"
    notes = (
        f"step costs refitted on step logs of {len(dirs)} runs ({sizes})",
        f"loop overhead {1e3 * overhead:.3f} ms per step from the same logs",
    )
    return dataclasses.replace(calibrated, notes=tuple(profile.notes) + notes)


if __name__ == "__main__":
    sys.exit(main())
