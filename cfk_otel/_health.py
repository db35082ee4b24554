"""Health endpoints (being written: see issue 6)."""

from __future__ import annotations

from typing import Any

from ._settings import Settings


def build_endpoints(settings: Settings) -> dict[str, Any]:
    """The health paths the middleware answers itself, mapped to their ASGI apps."""
    return {}
