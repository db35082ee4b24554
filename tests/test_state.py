"""One process state, written by set-up and passed down (issue 21, point 3)."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGE = ROOT / "cfk_otel"
# Who may write which state: the process state by set-up alone; the error tracker's own
# switch (is Sentry on?) by its start and stop, which set-up calls.
WRITERS = {"_bootstrap/setup.py": None, "_errors/api.py": {"start", "close", "_reset_for_tests"}}


def _writes(tree: ast.Module) -> list[tuple[str, int]]:
    """(enclosing function, line) of each assignment to ``STATE.<field>`` or ``x.STATE.<field>``."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            owner = target.value if isinstance(target, ast.Attribute) else None
            if (isinstance(owner, ast.Name) and owner.id == "STATE") or (
                isinstance(owner, ast.Attribute) and owner.attr == "STATE"
            ):
                found.append((function, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_the_state_is_written_by_set_up_only() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE))
        allowed = WRITERS.get(name, set())
        for function, line in _writes(ast.parse(path.read_text())):
            if allowed is not None and function not in allowed:
                wrong.append(f"{name}:{line} ({function})")
    assert wrong == []


def test_the_rule_sees_a_write() -> None:
    tree = ast.parse("def configure():\n    setup.STATE.started = True\n")
    assert ("configure", 2) in _writes(tree)
