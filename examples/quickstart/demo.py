"""``make demo``: the quick-start app under ``opentelemetry-instrument``, with a summary.

Starts the app (port 3000) with its telemetry going to an in-process OTLP receiver,
drives a short burst of traffic, and prints what arrived. ``--once`` exits after the
summary; otherwise it keeps serving until Ctrl-C and then stops what it started.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cfk_otel.testing import OtlpReceiver

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN = Path(sys.executable).parent


def services_env() -> dict[str, str]:
    out = subprocess.run(
        [str(ROOT / "scripts" / "services"), "env"], capture_output=True, text=True, check=True
    )
    return dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines())


def request(url: str, data: dict[str, object] | None = None) -> int:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the summary")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3000")))
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"

    with OtlpReceiver() as receiver:
        env = {
            **os.environ,
            **services_env(),
            "SERVICE_NAME": "cf-kanban",
            "SERVICE_VERSION": "1.0.0",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "500",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        }
        command = [
            str(BIN / "opentelemetry-instrument"),
            str(BIN / "uvicorn"),
            "app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.port),
            "--log-level",
            "warning",
        ]
        app = subprocess.Popen(command, cwd=HERE, env=env)
        try:
            for _ in range(100):
                try:
                    request(base + "/api/tickets/count")
                    break
                except OSError:
                    time.sleep(0.1)
            statuses: collections.Counter[int] = collections.Counter()
            for i in range(20):
                statuses[request(base + "/api/tickets", {"title": f"demo ticket {i}"})] += 1
                statuses[request(base + f"/api/tickets/{i + 1}")] += 1
                statuses[request(base + "/api/tickets/count")] += 1
            statuses[request(base + "/api/tickets/999999")] += 1
            statuses[request(base + "/api/fail")] += 1
            receiver.wait_for(lambda: len(receiver.spans) >= 60 and len(receiver.logs) >= 20, timeout=10)

            names = collections.Counter(s.name for s in receiver.spans)
            print("\n=== cfk_otel demo ===")
            print(f"requests served: {sum(statuses.values())}  by status: {dict(sorted(statuses.items()))}")
            print(
                f"received over OTLP: {len(receiver.spans)} spans, {len(receiver.logs)} log records, "
                f"{len(receiver.metrics)} metric streams"
            )
            print("span names:")
            for name, count in names.most_common(8):
                print(f"  {count:4d}  {name}")
            metric_names = sorted({m.name for m in receiver.metrics})
            print(f"metrics: {', '.join(metric_names)}")
            resource = receiver.spans[0].resource if receiver.spans else {}
            print(
                "resource: "
                + ", ".join(
                    f"{k}={resource[k]}"
                    for k in ("service.name", "service.version", "service.instance.id")
                    if k in resource
                )
            )
            if not args.once:
                print(f"\nthe app is serving at {base}; Ctrl-C stops it")
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
        except KeyboardInterrupt:
            pass
        finally:
            app.send_signal(signal.SIGTERM)
            app.wait(15)
    return 0 if receiver.spans else 1


if __name__ == "__main__":
    sys.exit(main())
