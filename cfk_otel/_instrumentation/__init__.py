"""Our instrumentations: uvicorn and gunicorn logging, asyncpg and redis client spans."""
