"""`phases:` in a sweep YAML (bench/sweep_phases.py): the spec's checks, and a real sweep —
one real `pdserve serve` sent a two-phase trace, one broken configuration recorded and
skipped, the ranking and `sweep.json`."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from pdserve.bench import phases
from pdserve.bench.sweep import cmd_sweep
from pdserve.bench.sweep_phases import format_ranking, run_phased_sweep
from pdserve.bench.sweep_spec import SweepSpec
from pdserve.errors import ConfigError
from tests.bench.test_sweep import TINY

PHASES = [
    {"name": "short", "workload": "code", "duration_s": 1.5, "rate": 2.0},
    {
        "name": "tight",
        "workload": "code",
        "duration_s": 1.0,
        "rate": 3.0,
        "slo": {"ttft_ms": 60000, "tpot_ms": 60000},
    },
]


def phased(**changes) -> dict:
    data = {"configurations": [dict(TINY)], "phases": PHASES, "search": {"seed": 3}}
    return data | changes


def test_a_sweep_has_workloads_or_phases():
    spec = SweepSpec.from_dict(phased())
    assert [p.label for p in spec.phases] == ["short", "tight"] and spec.workloads == ()
    with pytest.raises(ConfigError) as e:
        SweepSpec.from_dict(phased(workloads=["chat"]))
    assert e.value.field == "phases"
    with pytest.raises(ConfigError) as e:
        SweepSpec.from_dict(phased(phases=[{"workload": "code", "rate": 1}]))
    assert e.value.field == "phases[0].duration_s"
    assert SweepSpec.from_dict({"configurations": [dict(TINY)]}).phases == ()


def test_dry_run_lists_the_phases(tmp_path, capsys):
    path = tmp_path / "day.yaml"
    path.write_text(yaml.safe_dump(phased()))
    assert cmd_sweep(argparse.Namespace(config=str(path), out=None, dry_run=True)) == 0
    assert "phases: short, tight; search:" in capsys.readouterr().out


def test_each_configuration_gets_the_same_trace_and_a_ranking(tmp_path, builtin_model_dir):
    broken = {"name": "broken", "mode": "aggregated", "model": str(tmp_path / "no-such-model")}
    spec = SweepSpec.from_dict(phased(configurations=[broken, TINY]))
    lines: list[str] = []
    results = run_phased_sweep(spec, tmp_path, log=lines.append)
    assert lines[0] == "[1/2] broken: starting pdserve serve"
    assert not results[0].is_ok and results[0].error.startswith("server exited with code 1")
    tiny = results[1]
    assert tiny.is_ok, tiny.error
    counts = phases.build_load(spec.phases, 3).counts  # the seeded trace, exactly
    assert [p["name"] for p in tiny.phases] == ["short", "tight", "all"]
    assert [p["num_requests"] for p in tiny.phases] == [*counts, sum(counts)]
    assert all(p["num_errors"] == 0 for p in tiny.phases)
    # The loose SLO of the second phase: every request of it meets it.
    assert tiny.phases[1]["attainment"] == 1.0
    assert tiny.phases[1]["goodput"] == counts[1] / 1.0
    assert tiny.goodput == tiny.phases[-1]["num_met"] / 2.5
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["ranking"] == ["tiny", "broken"]
    assert [c["name"] for c in saved["configurations"]] == ["broken", "tiny"]
    table = format_ranking(results).splitlines()
    assert table[0].startswith("| # | configuration | short attain / goodput |")
    assert table[2].startswith("| 1 | tiny | ") and table[2].endswith("| ok |")
    assert table[3].startswith("| 2 | broken | - | - | - | FAILED: server exited")
