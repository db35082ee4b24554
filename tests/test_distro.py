"""cfk_otel/_bootstrap/distro.py: `uvicorn --workers` workers are instrumented on every contrib release."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
from opentelemetry.instrumentation import auto_instrumentation

from cfk_otel._bootstrap.distro import keep_workers_instrumented

DIRECTORY = str(Path(auto_instrumentation.__file__).resolve().parent)


def started_by(monkeypatch: pytest.MonkeyPatch, sitecustomize: str | None, pythonpath: str | None) -> None:
    module = types.ModuleType("sitecustomize")
    if sitecustomize is not None:
        module.__file__ = sitecustomize
    monkeypatch.setitem(sys.modules, "sitecustomize", module)
    if pythonpath is None:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONPATH", pythonpath)


def test_the_directory_contrib_took_off_goes_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # As contrib before 0.63b0 leaves it after set-up: the app's own entry, ours gone.
    started_by(monkeypatch, os.path.join(DIRECTORY, "sitecustomize.py"), "/srv/app")
    keep_workers_instrumented()
    assert os.environ["PYTHONPATH"] == DIRECTORY + os.pathsep + "/srv/app"
    keep_workers_instrumented()  # 0.63b0 and later put it back themselves: never twice
    assert os.environ["PYTHONPATH"].split(os.pathsep).count(DIRECTORY) == 1
    started_by(monkeypatch, os.path.join(DIRECTORY, "sitecustomize.py"), None)
    keep_workers_instrumented()
    assert os.environ["PYTHONPATH"] == DIRECTORY


@pytest.mark.parametrize("sitecustomize", [None, "/usr/lib/python3/sitecustomize.py"])
def test_an_app_not_started_by_opentelemetry_instrument_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, sitecustomize: str | None
) -> None:
    started_by(monkeypatch, sitecustomize, "/srv/app")
    keep_workers_instrumented()
    assert os.environ["PYTHONPATH"] == "/srv/app"
