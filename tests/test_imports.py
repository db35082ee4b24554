"""No import circle among cfk_otel's modules (issue 21 point 2).

Every import counts: at module level, inside functions (lazy) and under ``TYPE_CHECKING``.
A circle means two modules that cannot be understood, tested or changed one at a time;
the usual fix is a smaller module both import (as ``_asgi.types`` and ``_errors.total`` are),
or an event one emits and the other subscribes to.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "cfk_otel"


def _module_name(path: Path) -> str:
    """``_core.seam`` for cfk_otel/_core/seam.py; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.ImportFrom, package: str) -> list[str]:
    """The cfk_otel modules one ``from ... import`` names (a module, or a module's members)."""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
        base = ".".join([*anchor, node.module] if node.module else anchor)
    elif node.module and (node.module == "cfk_otel" or node.module.startswith("cfk_otel.")):
        base = node.module.removeprefix("cfk_otel").lstrip(".")
    else:
        return []
    return [base, *(f"{base}.{a.name}" if base else a.name for a in node.names)]


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    packages = {_module_name(path) for path in paths if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                targets.update(_imported(node, package))
            elif isinstance(node, ast.Import):
                targets.update(
                    a.name.removeprefix("cfk_otel.") for a in node.names if a.name.startswith("cfk_otel.")
                )
        # Edges to modules only: importing a package runs its __init__, which for
        # cfk_otel itself is the public API and for a subpackage is only a docstring.
        graph[name] = {t for t in targets if t in modules and t not in packages and t != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_circle() -> None:
    graph = _graph()
    circles = _circles(graph)
    detail = [
        " <-> ".join(c) + ": " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
        for c in circles
    ]
    assert not circles, "import circles:\n" + "\n".join(detail)


def test_the_check_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
