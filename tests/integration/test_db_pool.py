"""cfk_otel/_instrumentation/db.py against a real PostgreSQL: a pool's own reset query is
not the app's work."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import IN_MEMORY_PROVIDERS, ROOT, Services

SCRIPT = IN_MEMORY_PROVIDERS + textwrap.dedent(
    """
    import asyncio, json, os
    from cfk_otel._instrumentation.db import AsyncpgInstrumentor
    import asyncpg

    AsyncpgInstrumentor().instrument()

    async def main():
        pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=1)
        for _ in range(3):
            await pool.fetchval("SELECT 1")
        await pool.close()

    asyncio.run(main())
    counts = {
        dict(p.attributes)["operation"]: p.count
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "database_query_duration_seconds"
        for p in m.data.data_points
    }
    print(json.dumps({"spans": [s.name for s in spans.get_finished_spans()], "counts": counts}))
    """
)


def test_pool_reset_queries_make_no_span_and_no_timing(services: Services) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "DATABASE_URL": services.database_url}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"spans": ["SELECT", "SELECT", "SELECT"], "counts": {"SELECT": 3}}
