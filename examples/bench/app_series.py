"""The benchmark app with 10,000 series of one custom metric, for the scrape measurement.

The one place in the benchmark apps with telemetry code: the document's custom-metrics API,
as an app with a large label space would use it (``scripts/bench.py``'s scrape step).
"""

from __future__ import annotations

from app import app

import cfk_otel

SERIES = 10_000

_shards = cfk_otel.register_counter("bench_shard_events_total", "Events per shard", ["shard"])
for _shard in range(SERIES):
    _shards.inc({"shard": str(_shard)})

__all__ = ["app"]
