"""Whether the installed OpenTelemetry packages fit together.

The OpenTelemetry packages pin each other exactly (the SDK its API and semantic
conventions, each contrib instrumentation its ``opentelemetry-instrumentation``). pip
checks only what one command asks for, so an instrumentation added later by its own
``pip install`` can move those pins underneath the SDK (``pip check`` then fails). The
fix is one command that names cfk-otel with every instrumentation, so pip resolves the
whole family together; this module finds the mismatch and writes that command.
"""

from __future__ import annotations

import re
from importlib.metadata import distributions

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

_FAMILY = "opentelemetry-"
_BASE = "opentelemetry-instrumentation"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def mismatches() -> list[str]:
    """Each unmet pin among the installed ``opentelemetry-*`` packages and cfk-otel, in words."""
    installed: dict[str, tuple[str, list[str]]] = {}
    for dist in distributions():
        name = _canonical(dist.metadata["Name"] or "")
        if name.startswith(_FAMILY) or name == "cfk-otel":
            installed.setdefault(name, (dist.version, list(dist.requires or ())))
    found: list[str] = []
    for name, (version, requires) in sorted(installed.items()):
        for text in requires:
            try:
                requirement = Requirement(text)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # an extra's requirement, or another platform's
            target = _canonical(requirement.name)
            have = installed.get(target)
            if have is None or not target.startswith(_FAMILY):
                continue  # a missing package is pip's and the import system's to report
            try:
                fits = requirement.specifier.contains(Version(have[0]), prereleases=True)
            except InvalidVersion:
                continue
            if not fits:
                wanted = f"{requirement.name}{requirement.specifier}"
                found.append(f"{name} {version} requires {wanted}, {have[0]} is installed")
    return found


def fix_command() -> str:
    """The one ``pip install`` that resolves cfk-otel and every installed instrumentation together."""
    names = sorted(
        {
            _canonical(dist.metadata["Name"] or "")
            for dist in distributions()
            if _canonical(dist.metadata["Name"] or "").startswith(_BASE + "-")
        }
    )
    return " ".join(["pip install cfk-otel", *names])


def report() -> str | None:
    """A message for stderr when the family does not fit together, else None."""
    found = mismatches()
    if not found:
        return None
    return (
        "cfk_otel: the installed OpenTelemetry packages do not fit together ("
        + "; ".join(found)
        + "). An instrumentation added by its own `pip install` does this: pip does not re-check what"
        " is already installed. Telemetry may fail. Fix, in one command: " + fix_command()
    )
