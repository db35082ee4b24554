"""The benchmark's report (scripts/bench.py): the ladder's arithmetic and its table."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("cfk_bench_script", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _paired(cpu: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    bare = cpu["bare"]
    return {
        name: {
            "keeps_median": statistics.median(b / c for b, c in zip(bare, cpus, strict=True)),
            "keeps_min": 0.0,
            "keeps_max": 1.0,
            "added_us_median": statistics.median(c - b for b, c in zip(bare, cpus, strict=True)),
            "cpu_us_per_round": cpus,
        }
        for name, cpus in cpu.items()
    }


def test_each_step_is_the_median_of_its_per_round_differences(bench: ModuleType) -> None:
    # The rounds drift (round 3 is slow for everyone); a step is read within each round,
    # so the drift cancels: the median of differences, not the difference of medians.
    paired = _paired(
        {
            "bare": [300.0, 310.0, 600.0],
            "empty_middleware": [320.0, 331.0, 640.0],
            "cfk_unsampled": [400.0, 500.0, 700.0],
        }
    )
    steps = bench.ladder_steps(paired)
    assert list(steps) == ["empty_middleware", "cfk_unsampled"]
    assert steps["empty_middleware"] == 21.0  # differences 20, 21, 40
    assert steps["cfk_unsampled"] == 80.0  # differences 80, 169, 60; medians' difference: 169


def test_the_report_has_one_ladder_row_per_step_with_what_it_adds(bench: ModuleType) -> None:
    names = list(bench.LADDER)
    cpu = {name: [300.0 + 10 * i, 300.0 + 12 * i] for i, name in enumerate(names)}
    result = {
        "date": "2026-11-27",
        "machine": {"cpu": "test", "cores": "2", "python": "3.11"},
        "rounds": 1,
        "results": {},
        "side_by_side": {},
        "paired_rounds": 2,
        "ladder": _paired(cpu),
    }
    text = bench.markdown(result)
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | " in line[2:]]
    ladder_rows = [row for row in rows if row.split(" | ")[0].removeprefix("| ") in bench.LADDER]
    assert [row.split(" | ")[0].removeprefix("| ") for row in ladder_rows] == names[1:]
    last = ladder_rows[-1].strip("| ").split(" | ")
    assert last[1] == bench.LADDER["cfk_otel"]
    assert last[3] == f"{(10 * 5 + 12 * 5) / 2:.0f}"  # over bare: 50 and 60, median 55
    assert last[4] == "11"  # over the step before: 10 and 12


def test_the_scrape_step_reports_its_time_and_the_p99_ratio(bench: ModuleType) -> None:
    result = {
        "date": "2026-12-05",
        "machine": {"cpu": "cpu", "cores": "2", "python": "3.11"},
        "rounds": 1,
        "soak_seconds": 60,
        "results": {},
        "side_by_side": {},
        "paired_rounds": 0,
        "ladder": {},
        "collector_down_soak": None,
        "scrape_interference": {
            "series": 10_000,
            "scrape_ms_median": 6.04,
            "scrapes_during": 20,
            "every_s": 0.5,
            "rate": 400,
            "p99_ms_without": 4.0,
            "p99_ms_with": 6.0,
        },
    }
    text = bench.markdown(result)
    assert "Scrapes of 10,000 series" in text
    assert "6.0 ms each" in text
    assert "4.00 ms without scrapes, 6.00 ms with one every 0.5 s (20 scrapes; 1.50x)" in text
