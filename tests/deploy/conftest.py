"""Shared helpers for the deployment files in deploy/ and docs/dashboards/.

Every check runs the real tool (promtool, amtool, prometheus): a missing tool fails the
run with CI=true and skips elsewhere (tests.conftest.unavailable).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.collector.conftest import collector_bin  # noqa: F401  (fixture shared with tests/collector)
from tests.conftest import ROOT, unavailable

DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTMANAGER_DIR = DEPLOY / "alertmanager"
KUBERNETES_DIR = DEPLOY / "kubernetes"
DASHBOARD = ROOT / "docs" / "dashboards" / "cf-kanban.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"

# Debian package that provides each tool (for the message; `make test` set-up installs them).
_PACKAGES = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "amtool": "prometheus-alertmanager",
    "prometheus-alertmanager": "prometheus-alertmanager",
}


def tool(name: str) -> str:
    """The path of a real binary, or fail (CI=true) / skip with the package to install."""
    found = shutil.which(name)
    if found is None:
        unavailable(f"{name} is not installed (apt-get install {_PACKAGES.get(name, name)})")
        raise AssertionError("unreachable")
    return found


def run(*command: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a tool with a bound on its time; never raises on a non-zero exit."""
    return subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


def anchors(markdown: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    return {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in markdown.read_text().splitlines()
        if line.startswith("#")
    }


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
