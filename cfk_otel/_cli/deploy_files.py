"""``cfk-otel deploy-files DIR``: the operations bundle, from the installed package.

The bundle is the checkout's own files, under the paths the documentation uses:
``deploy/`` (Prometheus alert rules and their unit tests, the scrape configuration,
Alertmanager, Kubernetes manifests), ``docs/dashboards/`` (the Grafana dashboard) and
``collector/config/`` (the collector's configurations). The repository keeps one copy:
``cfk_otel/_ops/`` holds symbolic links to those directories, which the wheel build
follows (a wheel holds the files) and an editable install reads through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent / "_ops"
PARTS: Final = ("deploy", "docs/dashboards", "collector/config")


class BundleError(Exception):
    """Why the bundle was not written; safe to print."""


def files(root: Path = ROOT) -> dict[str, Path]:
    """Every file of the bundle: its relative path (``/``-separated) and where it is."""
    found: dict[str, Path] = {}
    for part in PARTS:
        top = root / part
        if not top.is_dir():
            raise BundleError(f"{top} is missing: this installation of cfk-otel has no operations bundle")
        for directory, subdirs, names in os.walk(top, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "__")))
            for name in sorted(names):
                if name.startswith(".") or name.endswith((".pyc", "~")):
                    continue
                path = Path(directory) / name
                found[path.relative_to(root).as_posix()] = path
    return found


@dataclass
class Written:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def write(target: Path, force: bool = False, root: Path = ROOT) -> Written:
    """Copy the bundle into ``target``. A file already there with other content is left
    alone (and the whole copy refused, before anything is written) unless ``force``."""
    bundle = files(root)
    if target.exists() and not target.is_dir():
        raise BundleError(f"{target} exists and is not a directory")
    conflicts = []
    for relative, source in bundle.items():
        destination = target / relative
        if destination.is_dir():
            conflicts.append(f"{relative} (a directory)")
        elif destination.exists() and destination.read_bytes() != source.read_bytes() and not force:
            conflicts.append(relative)
    if conflicts:
        shown = ", ".join(conflicts[:5]) + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise BundleError(f"would overwrite files that differ in {target}: {shown} (--force to overwrite)")
    result = Written()
    for relative, source in bundle.items():
        destination = target / relative
        data = source.read_bytes()
        if destination.exists() and destination.read_bytes() == data:
            result.unchanged.append(relative)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(data)
        result.written.append(relative)
    return result


NEXT_STEPS: Final = """\
next:
  promtool check rules {dir}/deploy/prometheus/alerting-rules.yml
  promtool test rules {dir}/deploy/prometheus/alerting-rules.test.yml
  kubectl apply -k {dir}/deploy/kubernetes/overlays/production
  import {dir}/docs/dashboards/cf-kanban.json into Grafana
  see {dir}/deploy/kubernetes/README.md and {dir}/docs/dashboards/README.md"""
