"""Counts for issue 24's note: at 10% sampling, the healthy, failed and slow requests sent and
the traces kept for each, and the exemplars on one OpenMetrics scrape after N requests.

Runs tests/apps/sampling_app.py under opentelemetry-instrument (native path,
``parentbased_traceidratio`` at 0.1, ``CFK_TRACES_KEEP_SLOWER_THAN=0.05``) against PostgreSQL
and Redis (``scripts/services start``), with an OTLP receiver on 127.0.0.1 standing in for
the collector. Bounded: a few hundred requests, well under a minute.

    .venv/bin/python scripts/exemplar_counts.py [--healthy 500] [--failed 50] [--slow 20]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cfk_otel.testing import OtlpReceiver  # noqa: E402
from tests.conftest import free_port, launch, uvicorn_command  # noqa: E402

THRESHOLD = 0.05
HISTOGRAMS = (
    "http_request_duration_seconds",
    "database_query_duration_seconds",
    "redis_operation_duration_seconds",
)
SERVER = 2


def services() -> dict[str, str]:
    out = subprocess.run(
        [str(ROOT / "scripts" / "services"), "start"], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    pairs = (line.removeprefix("export ").split("=", 1) for line in out.splitlines() if "=" in line)
    return {k: v for k, v in pairs if k in ("DATABASE_URL", "REDIS_URL")}


def exemplars(url: str) -> dict[str, tuple[int, int]]:
    """Per histogram: (bucket lines with an exemplar, bucket lines) on one OpenMetrics scrape."""
    request = urllib.request.Request(f"{url}/api/metrics", headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    counts = {}
    for name in HISTOGRAMS:
        lines = re.findall(rf"^{name}_bucket\{{.*$", text, re.M)
        counts[name] = (sum(" # {" in line for line in lines), len(lines))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--healthy", type=int, default=500)
    parser.add_argument("--failed", type=int, default=50)
    parser.add_argument("--slow", type=int, default=20)
    args = parser.parse_args()
    sent = {"/ok": args.healthy, "/failed": args.failed, "/slow": args.slow}
    with OtlpReceiver() as receiver, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {
            **services(),
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "SERVICE_NAME": "cf-kanban-exemplar-counts",
            "CFK_OTEL_NATIVE": "true",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
            "CFK_TRACES_KEEP_SLOWER_THAN": str(THRESHOLD),
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
        app = launch(Path(tmp), uvicorn_command("sampling_app:app", port), env, port)
        scrapes = []
        try:
            done = 0
            for path, count in sent.items():
                for _ in range(count):
                    app.get(path)
                    done += 1
                    if done == 100:
                        scrapes.append((done, exemplars(app.url)))
            scrapes.append((done, exemplars(app.url)))
        finally:
            app.terminate()  # flushes what is queued
        kept: dict[str, set[str]] = defaultdict(set)
        for span in receiver.spans:
            if span.span.kind == SERVER:
                kept[span.name.split(" ", 1)[1]].add(span.trace_id)
    print("| requests | sent | traces kept | kept share |")
    print("|---|---:|---:|---:|")
    for path, count in sent.items():
        traces = len(kept[path])
        print(f"| {path} | {count} | {traces} | {traces / count:.0%} |")
    print()
    print("| after N requests | " + " | ".join(HISTOGRAMS) + " |")
    print("|---:|" + "---:|" * len(HISTOGRAMS))
    for done, counts in scrapes:
        cells = " | ".join(f"{with_one} of {lines} bucket lines" for with_one, lines in counts.values())
        print(f"| {done} | {cells} |")


if __name__ == "__main__":
    main()
