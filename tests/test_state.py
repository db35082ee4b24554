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


# Besides STATE, a few process-wide values live beside the code that uses them (the
# choice of path in the seam, the keeper of failed and slow traces, Sentry's one event
# processor, the uncaught-exception hooks). Each is written by one function, and only
# set-up calls those functions; the rest are caches, made on first use.
SET_UP_WRITERS = {
    ("_core/seam.py", "activate"): "which path records our spans",
    ("_core/seam.py", "set_value_limits"): "the value-length limits the core cuts at",
    ("_core/sampling.py", "sdk_arguments"): "the keeper of failed and slow traces",
    ("_errors/sentry.py", "init"): "Sentry's one event processor and event budget",
    ("_errors/uncaught.py", "install"): "the process's one pair of exception hooks",
    ("_errors/uncaught.py", "uninstall"): "the process's one pair of exception hooks",
}
CACHES = {
    ("_logs/render.py", "_redacted_context"): "the last context redacted, reused while it is the same",
    ("_metrics/catalogue.py", "default"): "the process's metric registry, made on first use",
}
# Set-up, and the error tracker's start, which set-up calls.
CALLERS = {"_bootstrap/setup.py", "_errors/api.py"}


def _modules_by_alias(tree: ast.Module, path: str) -> dict[str, str]:
    """Local name -> the package file it names, for each module imported from cfk_otel."""
    package = path.rpartition("/")[0]
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package if node.level == 1 else ""
            base = f"{base}/{node.module.replace('.', '/')}" if node.module else base
        elif node.module and node.module.startswith("cfk_otel"):
            base = node.module.removeprefix("cfk_otel").lstrip(".").replace(".", "/")
        else:
            continue
        for alias in node.names:
            module = f"{base}/{alias.name}".lstrip("/") + ".py"
            if (PACKAGE / module).exists():
                aliases[alias.asname or alias.name] = module
    return aliases


def _process_state_findings(files: dict[str, ast.Module]) -> list[str]:
    found = []
    writers = {name for _, name in SET_UP_WRITERS}
    for path, tree in files.items():
        aliases = _modules_by_alias(tree, path)
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                has_global = any(isinstance(n, ast.Global) for n in ast.walk(function))
                if has_global and (path, function.name) not in SET_UP_WRITERS | CACHES.keys():
                    found.append(f"{path}:{function.lineno}: {function.name} writes a module global")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in writers
            ):
                owner = node.func.value
                module = aliases.get(owner.id) if isinstance(owner, ast.Name) else None
                if (module, node.func.attr) in SET_UP_WRITERS and path not in CALLERS:
                    found.append(
                        f"{path}:{node.lineno}: calls {module}'s {node.func.attr}, which set-up alone may"
                    )
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if (
                        isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name)
                        and target.value.id in aliases
                        and path not in CALLERS
                    ):
                        found.append(f"{path}:{node.lineno}: sets {aliases[target.value.id]}'s {target.attr}")
    return found


def test_process_wide_values_are_written_by_set_up_only() -> None:
    files = {
        str(path.relative_to(PACKAGE)): ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))
    }
    for path, name in SET_UP_WRITERS | CACHES:  # the lists name what exists
        assert any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.walk(files[path])), (
            path,
            name,
        )
    assert _process_state_findings(files) == []


def test_the_process_state_rule_sees_each_way_round_it() -> None:
    files = {
        "_asgi/middleware.py": ast.parse(
            "from cfk_otel._core import seam as _core\n"
            "from cfk_otel._metrics import catalogue\n"
            "def handle():\n    _core.activate(None)\n"
            "def strict():\n    catalogue.STRICT = True\n"
            "def cache():\n    global X\n"
        ),
        "_bootstrap/setup.py": ast.parse(
            "from cfk_otel._core import seam as _core\ndef start():\n    _core.activate(None)\n"
        ),
    }
    found = _process_state_findings(files)
    assert sorted(f.split(": ", 1)[1] for f in found) == [
        "cache writes a module global",
        "calls _core/seam.py's activate, which set-up alone may",
        "sets _metrics/catalogue.py's STRICT",
    ]
