#!/usr/bin/env python3
"""``make microbench``: the hot paths one call at a time, ours beside the upstream equivalent.

Runs the pytest-benchmark suite in benchmarks/ several times (``--runs``, default 3) and
keeps, for each benchmark, the median over runs of its per-run median, per unit of work
(one request, record, log line or scrape). Pairs, each one pytest-benchmark group:
  ASGI request         TelemetryMiddleware vs OpenTelemetryMiddleware, with and without meters
  OTLP encoding        the exporter thread's cost for one request's spans
  histogram / counter  cfk_otel's metrics API vs the SDK instruments, same readers
  log line             JSON on stdout, and the OTLP record, vs the upstream handlers
  scrape               /api/metrics with 10,000 series vs prometheus_client over the stock reader
Writes docs/microbenchmarks.json and docs/microbenchmarks.md (docs/benchmarks.md, written
by ``make bench``, links to it). Extra arguments after ``--`` go to pytest.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# In the order of the report: the request path first, then metrics, logs, the scrape.
FILES = ("test_request.py", "test_metrics.py", "test_logs.py", "test_scrape.py")
PACKAGES = (
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-asgi",
    "opentelemetry-exporter-prometheus",
    "opentelemetry-exporter-otlp-proto-common",
    "prometheus-client",
    "python-json-logger",
    "pytest-benchmark",
)


def run_suite(output: Path, pytest_args: list[str]) -> dict[str, Any]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *(f"benchmarks/{name}" for name in FILES),
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-enable",  # overrides the --benchmark-disable of the default test run
            "--benchmark-only",
            "--benchmark-warmup=on",
            "--benchmark-columns=min,median,iqr,rounds",
            f"--benchmark-json={output}",
            *pytest_args,
        ],
        cwd=ROOT,
        check=True,
    )
    result: dict[str, Any] = json.loads(output.read_text())
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry per benchmark: medians over runs, in µs per unit of work."""
    groups: dict[str, list[dict[str, Any]]] = {}
    by_name: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for bench in run["benchmarks"]:
            by_name.setdefault(bench["name"], []).append(bench)
    for name, benches in by_name.items():
        info = benches[0]["extra_info"]
        per_call = info.get("per_call", 1)
        medians = [b["stats"]["median"] / per_call * 1e6 for b in benches]
        groups.setdefault(benches[0]["group"], []).append(
            {
                "name": name,
                "side": info.get("side", "ours"),
                "label": info.get("label", name),
                "primary": bool(info.get("primary")),
                "per_call": per_call,
                "median_us": statistics.median(medians),
                "min_us": min(b["stats"]["min"] / per_call * 1e6 for b in benches),
                "run_medians_us": [round(m, 3) for m in medians],
            }
        )
    summary = []
    for group, rows in groups.items():
        ours = next((r for r in rows if r["side"] == "ours" and r["primary"]), None)
        upstream = next((r for r in rows if r["side"] == "upstream" and r["primary"]), None)
        if ours and upstream:
            summary.append(
                {
                    "pair": group,
                    "ours": ours["label"],
                    "upstream": upstream["label"],
                    "ours_us": ours["median_us"],
                    "upstream_us": upstream["median_us"],
                    "ratio": ours["median_us"] / upstream["median_us"],
                    "ratio_of_minimums": ours["min_us"] / upstream["min_us"],
                }
            )
    machine = runs[0]["machine_info"]
    commit = runs[0].get("commit_info", {})
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": machine["cpu"].get("brand_raw", machine["machine"]),
            "cores": str(machine["cpu"].get("count", "?")),
            "python": machine["python_version"],
            "kernel": machine["release"],
        },
        "commit": {"id": commit.get("id"), "dirty": commit.get("dirty")},
        "runs": len(runs),
        "versions": {p: importlib.metadata.version(p) for p in PACKAGES},
        "summary": summary,
        "groups": groups,
    }


def us(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    commit = str(result["commit"]["id"] or "unknown")[:7] + (
        " with local changes" if result["commit"]["dirty"] else ""
    )
    lines = [
        "# Micro-benchmarks",
        "",
        f"Generated by `make microbench` on {result['date']}: {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}, commit {commit}. Each figure is the median over {result['runs']} run(s) "
        "of pytest-benchmark's median, in µs per unit of work (one request, record, log line or "
        "scrape); ratios below 1 mean ours is cheaper. Both sides run in the same process against "
        "identical providers; the code is in [benchmarks/](../benchmarks), each pair explained in "
        "its module's docstring. Compare the ratios, not absolute times across runs: those move "
        "with the machine's load (the minimums are the least disturbed by it).",
        "",
        "The macro benchmark (whole app under load) is in [benchmarks.md](benchmarks.md).",
        "",
        "| pair | ours µs | upstream µs | ours / upstream | same, of the minimums |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['pair']} | {us(s['ours_us'])} | {us(s['upstream_us'])} | {s['ratio']:.2f} "
            f"| {s['ratio_of_minimums']:.2f} |"
        )
    lines += ["", "## Every variant", ""]
    for group, rows in result["groups"].items():
        upstream = next((r for r in rows if r["side"] == "upstream" and r["primary"]), None)
        lines += [
            f"**{group}**",
            "",
            "| side | variant | µs | min µs | vs upstream |",
            "|---|---|---:|---:|---:|",
        ]
        for r in rows:
            ratio = (
                f"{r['median_us'] / upstream['median_us']:.2f}"
                if upstream and r["side"] != "baseline"
                else "—"
            )
            lines.append(
                f"| {r['side']} | {r['label']} | {us(r['median_us'])} | {us(r['min_us'])} | {ratio} |"
            )
        lines.append("")
    versions = ", ".join(f"{name} {version}" for name, version in result["versions"].items())
    lines.append(f"Versions: {versions}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_suite(Path(tmp) / f"run{n}.json", args.pytest_args) for n in range(args.runs)]
    result = summarise(runs)
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "microbenchmarks.json").write_text(json.dumps(result, indent=2) + "\n")
    (docs / "microbenchmarks.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
