"""No private names of other packages in cfk_otel/ (issue 22, point 4).

The test walks the package's syntax trees and lists every access to another package's private name:
an import from a module path with a private segment, an imported name with a leading underscore, and
an attribute with a leading underscore that the package itself never defines. Each known access is in
``ALLOWED`` with the reason it is there; the list may only shrink. A new access fails the test, and so
does an entry that is no longer used, so the list stays true.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "cfk_otel"

# Private-looking names that are a package's public route, by its own documentation.
PUBLIC_ROUTES = {
    # The logs API and SDK live under underscored modules while the signal is in development; their
    # documentation imports them from there.
    "import opentelemetry._logs",
    "import opentelemetry.sdk._logs",
    "import opentelemetry.sdk._logs.export",
    "import opentelemetry.exporter.otlp.proto.http._log_exporter",
    # The configurator a distro subclasses, and the hook it overrides.
    "import opentelemetry.sdk._configuration",
    "opentelemetry.sdk._configuration._OTelSDKConfigurator",
    "super()._configure",
    # The logs API module itself, for its public functions.
    "opentelemetry._logs",
}

# Underscored members that the standard library documents as public.
STDLIB_PUBLIC = {"_replace", "_asdict", "_fields", "_make", "_field_defaults", "_exit"}

_SDK = "reimplements an SDK fast path; goes when the native core owns it (issue 22)"
_ASYNCPG = "asyncpg has no public hook for the query text of a prepared statement (issue 22)"
_LOGGING = "the standard library keeps the time relativeCreated counts from only in logging._startTime"
ALLOWED: dict[tuple[str, str], str] = {
    ("_instrumentation/db.py", "instance._connection"): _ASYNCPG,
    (
        "_instrumentation/db.py",
        "getattr(connection, '_params')",
    ): "asyncpg exposes no public database name or user",
    ("_instrumentation/db.py", "getattr(connection, '_addr')"): "asyncpg exposes no public peer address",
    (
        "_instrumentation/db.py",
        "getattr(instance, '_reset_query')",
    ): "asyncpg: the pool's reset query, to leave it unspanned",
    ("_logs/record.py", "getattr(logging, '_startTime')"): _LOGGING,
    ("_instrumentation/db.py", "instance._query"): _ASYNCPG,
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in {"self", "cls"}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    text: str


def _own_names(trees: dict[str, ast.Module]) -> set[str]:
    """Every underscored name the package defines: functions, classes, variables, attributes, slots."""
    own: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _is_self(node.value):
                own.add(node.attr)  # set on another package's object, it is still that package's name
            elif isinstance(node, ast.arg):
                own.add(node.arg)
            elif isinstance(node, ast.alias) and node.asname:
                own.add(node.asname)
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
            ):
                own.update(c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant))
    return {name for name in own if isinstance(name, str) and _private(name)}


def _mentions(annotation: ast.expr | None, names: set[str]) -> bool:
    return annotation is not None and any(
        isinstance(n, ast.Name) and n.id in names for n in ast.walk(annotation)
    )


def _foreign_typed(tree: ast.Module, foreign_names: set[str]) -> set[str]:
    """Parameters and ``self`` attributes annotated with another package's type."""
    typed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and _mentions(node.annotation, foreign_names):
            typed.add(node.arg)
        elif isinstance(node, ast.AnnAssign) and _mentions(node.annotation, foreign_names):
            typed.add(ast.unparse(node.target))
    return typed


def _foreign_module(module: str | None, level: int) -> bool:
    return level == 0 and module is not None and module.split(".")[0] != "cfk_otel"


def _findings(file: str, tree: ast.Module, own: set[str]) -> list[Finding]:
    found: list[Finding] = []
    foreign_names: set[str] = set()  # local names bound to another package's objects by an import

    def add(node: ast.AST, text: str) -> None:
        if text not in PUBLIC_ROUTES:
            found.append(Finding(file, getattr(node, "lineno", 0), text))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cfk_otel":
                    continue
                foreign_names.add((alias.asname or alias.name).split(".")[0])
                if any(_private(part) for part in alias.name.split(".")):
                    add(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and _foreign_module(node.module, node.level):
            module = node.module or ""
            if any(_private(part) for part in module.split(".")):
                add(node, f"import {module}")
            for alias in node.names:
                foreign_names.add(alias.asname or alias.name)
                if _private(alias.name):
                    add(node, f"{module}.{alias.name}")

    typed = _foreign_typed(tree, foreign_names)

    def foreign(receiver: ast.expr, attr: str) -> bool:
        if not _private(attr) or attr in STDLIB_PUBLIC:
            return False
        text = ast.unparse(receiver)
        return text in typed or text in foreign_names or attr not in own

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and foreign(node.value, node.attr):
            add(node, ast.unparse(node))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "hasattr", "setattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and foreign(node.args[0], node.args[1].value)
        ):
            add(node, f"{node.func.id}({ast.unparse(node.args[0])}, {node.args[1].value!r})")
    return found


def _all_findings() -> list[Finding]:
    trees = {
        str(path.relative_to(PACKAGE)): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    own = _own_names(trees)
    return [finding for file, tree in trees.items() for finding in _findings(file, tree, own)]


def test_no_new_private_names_of_other_packages() -> None:
    new = sorted(
        {f"{f.file}:{f.line}: {f.text}" for f in _all_findings() if (f.file, f.text) not in ALLOWED},
    )
    assert not new, "another package's private name is used (use its public API instead):\n" + "\n".join(new)


def test_allow_list_holds_only_what_is_still_used() -> None:
    used = {(f.file, f.text) for f in _all_findings()}
    stale = sorted(f"{file}: {text}" for file, text in ALLOWED if (file, text) not in used)
    assert not stale, "no longer used, remove from ALLOWED:\n" + "\n".join(stale)


def test_the_walker_sees_each_kind_of_private_access() -> None:
    """The walker itself: each kind of access is found, the package's own names are not."""
    source = (
        "from opentelemetry.sdk.trace import _Span\n"
        "from opentelemetry.sdk.metrics._internal import instrument\n"
        "import asyncpg._testbase\n"
        "from opentelemetry import trace\n"
        "class Mine:\n"
        "    def __init__(self):\n"
        "        self._mine = 1\n"
        "def f(tracer, point, span: trace.Span):\n"
        "    span._mine\n"
        "    getattr(span, '_attributes', None)\n"
        "    tracer._span_limits\n"
        "    trace._TRACER_PROVIDER\n"
        "    point._replace(x=1)\n"
        "    tracer._mine\n"
    )
    tree = ast.parse(source)
    texts = {f.text for f in _findings("x.py", tree, _own_names({"x.py": tree}))}
    assert texts == {
        "opentelemetry.sdk.trace._Span",
        "import opentelemetry.sdk.metrics._internal",
        "import asyncpg._testbase",
        "tracer._span_limits",
        "trace._TRACER_PROVIDER",
        "span._mine",
        "getattr(span, '_attributes')",
    }


def test_package_files_are_found() -> None:
    assert (PACKAGE / "__init__.py").exists()
    assert len(list(Path(PACKAGE).rglob("*.py"))) > 10
