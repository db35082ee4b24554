"""The one process state of cfk_otel.

It is written in one place, the set-up (:mod:`cfk_otel._bootstrap.setup`): the entry points that
``opentelemetry-instrument`` loads and ``cfk_otel.configure()`` report to the set-up, and
the set-up records what happened. Everything else receives what it needs when it is
built (the middleware, its endpoints and observers get the settings and this state from
``instrument_app``), so nothing on the request path looks the settings up again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._core.seam import LogSink
    from ._metrics.scrape import Scrape
    from ._settings import Settings


@dataclass
class State:
    settings: Settings | None = None
    started: bool = False
    deferred: bool = False  # waiting for the worker fork (gunicorn)
    shut_down: bool = False
    # Which of our entry points opentelemetry-instrument loaded (another distro may win).
    distro_selected: bool = False
    configurator_selected: bool = False
    # /api/metrics' renderer, made when the SDK starts (in each worker, after the fork).
    scrape: Scrape | None = None
    # On the native path, where logging's records (request lines included) go: the core.
    log_sink: LogSink | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
