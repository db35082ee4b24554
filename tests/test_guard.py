"""The one guard between cfk_otel's failures and the app (issue 21, point 5)."""

from __future__ import annotations

import ast
import asyncio
import logging

import pytest

from cfk_otel import _guard
from cfk_otel._guard import guard, warn_once
from tests.conftest import ROOT

PACKAGE = ROOT / "cfk_otel"
_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def test_a_failure_is_swallowed_and_logged_once_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    ran_after = []
    with caplog.at_level(logging.WARNING, logger="cfk_otel"):
        for attempt in range(3):
            with guard("exporting a thing"):
                raise RuntimeError(f"down {attempt}")
            ran_after.append(attempt)
        with guard("another thing"):
            raise ValueError("bad")
    assert ran_after == [0, 1, 2]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["cfk_otel: exporting a thing failed", "cfk_otel: another thing failed"]
    assert caplog.records[0].exc_info is not None  # with the traceback
    assert "down 0" in caplog.text


@pytest.mark.parametrize("signal", [KeyboardInterrupt, SystemExit, asyncio.CancelledError])
def test_what_is_not_an_error_goes_on_to_the_app(signal: type[BaseException]) -> None:
    with pytest.raises(signal), guard("a block"):
        raise signal()


def test_one_guard_per_kind_and_the_kinds_remembered_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    assert guard("recording a query") is guard("recording a query")
    with caplog.at_level(logging.WARNING, logger="cfk_otel"):
        for n in range(_guard.MAX_KINDS + 50):
            with guard(f"kind {n}"):
                raise RuntimeError
        warn_once("kind 0", "again")
    assert len(caplog.records) == _guard.MAX_KINDS
    assert len(_guard._guards) <= _guard.MAX_KINDS


def _is_log_call(node: ast.stmt) -> bool:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return False
    func = node.value.func
    if isinstance(func, ast.Name):
        return func.id == "warn_once"
    return isinstance(func, ast.Attribute) and func.attr in _LOG_METHODS | {"warn_once"}


def _only_logs(handler: ast.ExceptHandler) -> bool:
    """A handler that logs and swallows: at most a log call, ``pass`` and a plain return."""
    quiet = (ast.Pass, ast.Return)
    return any(_is_log_call(s) for s in handler.body) and all(
        _is_log_call(s) or (isinstance(s, quiet) and not isinstance(getattr(s, "value", None), ast.Call))
        for s in handler.body
    )


def _catches_everything(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in {"Exception", "BaseException"} for n in names)


def test_the_package_guards_with_the_one_guard() -> None:
    """No hand-written "log and swallow" handler and no once-flag outside ``_guard``: the guard is
    the one place that decides how a failure is logged, and that it is logged once."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_guard.py":
            continue
        name = path.relative_to(PACKAGE)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and _catches_everything(node) and _only_logs(node):
                found.append(f"{name}:{node.lineno}: log-and-swallow handler; use _guard.guard")
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                if "warned" in name:
                    found.append(f"{name}:{node.lineno}: a once-flag ({name}); use _guard.warn_once")
    assert found == []


def test_the_rule_sees_what_it_forbids() -> None:
    # The checker itself, on the two shapes it must catch and one it must let through.
    handler = ast.parse("try:\n    f()\nexcept Exception:\n    _log.debug('x', exc_info=True)\n")
    fallback = ast.parse("try:\n    f()\nexcept Exception:\n    value = repr(x)\n")
    [caught] = [n for n in ast.walk(handler) if isinstance(n, ast.ExceptHandler)]
    [kept] = [n for n in ast.walk(fallback) if isinstance(n, ast.ExceptHandler)]
    assert _catches_everything(caught)
    assert _only_logs(caught)
    assert not _only_logs(kept)
