"""The declared dependencies are exactly what the package imports (issue 21 point 6).

Every third-party module that ``cfk_otel/`` imports, at module level or lazily, belongs to
a distribution that pyproject declares: at run time, or as the optional extra of the
library it instruments. And every run-time dependency is imported by the package itself,
so nothing rides along that only the tests or the benchmarks use.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "cfk_otel"
# Optional integrations: imported only when the app has them (guarded), declared as extras.
OPTIONAL = {"asyncpg", "redis", "uvicorn", "gunicorn"}
# Run-time dependencies the package reaches by entry point, not by import: the exporters
# that `OTEL_*_EXPORTER=otlp` selects (the SDK's configurator loads them by name).
BY_ENTRY_POINT = {
    "opentelemetry-exporter-otlp-proto-grpc": "opentelemetry_traces_exporter",
    "opentelemetry-exporter-otlp-proto-http": "opentelemetry_traces_exporter",
}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return _canonical(match.group(0))


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _namespace(module: str) -> bool:
    if module.split(".", maxsplit=1)[0] in sys.stdlib_module_names:
        return False
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin in (None, "namespace")


def _imported_modules(paths: list[Path]) -> dict[str, set[str]]:
    """Each absolute, non-cfk_otel module imported, with the files that import it."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from opentelemetry import trace`: a namespace package has no owner of its
                # own, so the names it gives (modules) are what is imported.
                names = (
                    [f"{node.module}.{a.name}" for a in node.names]
                    if _namespace(node.module)
                    else [node.module]
                )
            for name in names:
                top = name.split(".")[0]
                if top == "cfk_otel" or top in sys.stdlib_module_names or top == "__future__":
                    continue
                found.setdefault(name, set()).add(
                    str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
                )
    return found


@cache
def _owners() -> dict[str, str]:
    """Installed file (absolute path) -> its distribution, for every distribution."""
    owners: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = _canonical(dist.metadata["Name"])
        for file in dist.files or ():
            owners[str(Path(str(dist.locate_file(file))).resolve())] = name
    return owners


def _distribution(module: str) -> str:
    """The distribution that installs ``module`` (namespace packages such as
    ``opentelemetry`` are shared, so it is found by the module's own file)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{module} is not installed"
    locations = [spec.origin] if spec.origin and spec.origin != "namespace" else []
    locations += [str(Path(p) / "__init__.py") for p in spec.submodule_search_locations or ()]
    for location in locations:
        owner = _owners().get(str(Path(location).resolve()))
        if owner:
            return owner
    raise AssertionError(f"no installed distribution owns {module} ({locations})")


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_imported_distribution_is_declared() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    extras = {
        _requirement_name(r)
        for name, rs in project["optional-dependencies"].items()
        if name in OPTIONAL
        for r in rs
    }
    undeclared = []
    for module, files in sorted(_imported_modules(_package_files()).items()):
        if module.split(".")[0] in OPTIONAL:
            owner = _canonical(module.split(".")[0])
            if owner not in extras:
                undeclared.append(f"{module} (optional, no extra) in {sorted(files)}")
            continue
        owner = _distribution(module)
        if owner not in runtime:
            undeclared.append(f"{module} from {owner} in {sorted(files)}")
    assert undeclared == []


def test_every_runtime_dependency_is_imported_by_the_package() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    imported = {
        _distribution(m) for m in _imported_modules(_package_files()) if m.split(".")[0] not in OPTIONAL
    }
    assert sorted(runtime - imported - set(BY_ENTRY_POINT)) == []


def test_what_is_reached_by_entry_point_provides_one() -> None:
    for name, group in BY_ENTRY_POINT.items():
        groups = {e.group for e in importlib.metadata.distribution(name).entry_points}
        assert group in groups, (name, sorted(groups))


def test_the_checks_see_an_import_and_its_owner(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import os\nimport wrapt\nfrom opentelemetry.sdk.trace import TracerProvider\n"
        "def f():\n    from prometheus_client import Counter\n"
    )
    found = _imported_modules([source])
    assert set(found) == {"wrapt", "opentelemetry.sdk.trace", "prometheus_client"}  # lazy ones too; no stdlib
    assert _distribution("opentelemetry.sdk.trace") == "opentelemetry-sdk"
    assert _distribution("opentelemetry.trace") == "opentelemetry-api"  # one namespace, two owners
    assert _distribution("prometheus_client") == "prometheus-client"
