"""cfk_otel/_bootstrap/packages.py: the installed OpenTelemetry family, checked as `pip check` would."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cfk_otel._bootstrap import packages as _packages


@dataclass
class FakeDist:
    name: str
    version: str
    requires: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> dict[str, str]:
        return {"Name": self.name}


def installed(monkeypatch: pytest.MonkeyPatch, *dists: FakeDist) -> None:
    monkeypatch.setattr(_packages, "distributions", lambda: list(dists))


SDK = FakeDist(
    "opentelemetry-sdk",
    "1.45.2",
    ["opentelemetry-api==1.45.2", "opentelemetry-semantic-conventions==0.66b2", "typing-extensions>=4.5"],
)


def test_a_consistent_family_has_nothing_to_say(monkeypatch: pytest.MonkeyPatch) -> None:
    installed(
        monkeypatch,
        SDK,
        FakeDist("opentelemetry-api", "1.45.2"),
        FakeDist("opentelemetry_semantic_conventions", "0.66b2", ["opentelemetry-api==1.45.2"]),
        FakeDist("opentelemetry-instrumentation", "0.66b2", ["opentelemetry-semantic-conventions==0.66b2"]),
        FakeDist("opentelemetry-instrumentation-httpx", "0.66b2", ["opentelemetry-instrumentation==0.66b2"]),
        FakeDist("cfk-otel", "0.1.0", ["opentelemetry-sdk<1.46,>=1.45.1", "pytest>=8; extra == 'test'"]),
    )
    assert _packages.mismatches() == []
    assert _packages.report() is None


OLD_BASE = "opentelemetry-instrumentation==0.66b1"


def test_an_instrumentation_added_later_that_moved_the_pins_is_named_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a plain second `pip install opentelemetry-instrumentation-asyncpg` leaves today.
    installed(
        monkeypatch,
        SDK,
        FakeDist("opentelemetry-api", "1.45.1"),
        FakeDist("opentelemetry-semantic-conventions", "0.66b1", ["opentelemetry-api==1.45.1"]),
        FakeDist("opentelemetry-instrumentation", "0.66b1", ["opentelemetry-semantic-conventions==0.66b1"]),
        FakeDist("opentelemetry-instrumentation-asyncpg", "0.66b1", [OLD_BASE]),
        FakeDist("Opentelemetry.Instrumentation_Redis", "0.66b1", [OLD_BASE]),
        FakeDist("requests", "2.32.0", ["urllib3<3"]),
    )
    assert _packages.mismatches() == [
        "opentelemetry-sdk 1.45.2 requires opentelemetry-api==1.45.2, 1.45.1 is installed",
        "opentelemetry-sdk 1.45.2 requires opentelemetry-semantic-conventions==0.66b2, 0.66b1 is installed",
    ]
    report = _packages.report()
    assert report is not None
    assert report.endswith(
        "pip install cfk-otel opentelemetry-instrumentation-asyncpg opentelemetry-instrumentation-redis"
    )


def test_extras_other_platforms_bad_metadata_and_missing_packages_are_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed(
        monkeypatch,
        FakeDist(
            "opentelemetry-exporter-x",
            "1.0",
            [
                "opentelemetry-api==9.9; extra == 'old'",
                "opentelemetry-api==8.8; sys_platform == 'nonexistent'",
                "opentelemetry-proto==1.0",  # not installed: pip check's to report
                "this is not a requirement ((",
            ],
        ),
        FakeDist("opentelemetry-api", "1.45.2"),
        FakeDist("opentelemetry-thing", "not-a-version"),
        FakeDist("opentelemetry-other", "1.0", ["opentelemetry-thing>=1"]),
    )
    assert _packages.mismatches() == []


def test_the_real_environment_is_checked_without_error() -> None:
    # The test venv is installed by one command, so its family fits together.
    assert _packages.mismatches() == []


def test_the_distro_warns_once_from_its_own_thread(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    from cfk_otel._bootstrap import distro as _distro

    monkeypatch.setattr(_packages, "report", lambda: "cfk_otel: the installed ... Fix, in one command: pip x")
    before = set(threading.enumerate())
    with caplog.at_level("WARNING", logger="cfk_otel"):
        _distro.check_packages()
        for thread in set(threading.enumerate()) - before:
            thread.join(5)
    assert [r.getMessage() for r in caplog.records if r.name == "cfk_otel"] == [
        "cfk_otel: the installed ... Fix, in one command: pip x"
    ]


def test_each_instrumented_library_is_an_optional_extra_at_the_version_instrumented() -> None:
    """Issue 21 point 6: asyncpg, redis, uvicorn and gunicorn are optional, and the extra
    that adds one asks for what its instrumentor accepts (nothing else declares them)."""
    import tomllib
    from importlib.metadata import entry_points

    from packaging.requirements import Requirement

    from tests.conftest import ROOT

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {Requirement(r).name for r in project["dependencies"]}
    extras = {
        Requirement(r).name: str(Requirement(r).specifier)
        for name, requirements in project["optional-dependencies"].items()
        if name not in ("test", "bench")
        for r in requirements
    }
    ours = [e for e in entry_points(group="opentelemetry_instrumentor") if e.value.startswith("cfk_otel.")]
    assert {e.name for e in ours} == {"cfk_uvicorn", "cfk_gunicorn", "cfk_asyncpg", "cfk_redis"}
    for entry in ours:
        for dependency in entry.load()().instrumentation_dependencies():
            requirement = Requirement(dependency)
            assert requirement.name not in runtime, f"{requirement.name} must stay optional"
            assert extras.get(requirement.name) == str(requirement.specifier), entry.name


def _pins(requirements: list[str]) -> dict[str, str]:
    """name -> version of each ``name==version`` requirement (and nothing else)."""
    from packaging.requirements import Requirement

    pins = {}
    for line in requirements:
        requirement = Requirement(line)
        [*specifiers] = requirement.specifier
        if len(specifiers) == 1 and specifiers[0].operator == "==":
            pins[requirement.name] = specifiers[0].version
    return pins


def test_the_range_runs_from_the_oldest_family_tested_to_the_newest() -> None:
    """Issue 22 point 4: each OpenTelemetry range in pyproject.toml runs from the version
    constraints/oldest.txt pins (`make test` runs the suite on those) to the next major
    release, and the test extra pins the newest family (CI's default venv) inside it."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    from tests.conftest import ROOT

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {
        r.name: r.specifier
        for r in map(Requirement, project["dependencies"])
        if r.name.startswith("opentelemetry-")
    }
    lines = (ROOT / "constraints" / "oldest.txt").read_text().splitlines()
    oldest = _pins([line for line in lines if line.strip() and not line.startswith("#")])
    newest = {n: v for n, v in _pins(project["optional-dependencies"]["test"]).items() if n in oldest}
    assert len(ranges) == 7  # the Prometheus exporter went (issue 22 point 4: our own scrape reader)
    assert set(oldest) == set(newest), "the oldest and the newest family name the same packages"
    assert set(ranges) <= set(oldest), "every runtime OpenTelemetry package has its oldest version"
    for name, specifier in ranges.items():
        bounds = {s.operator: Version(s.version) for s in specifier}
        assert set(bounds) == {">=", "<"}, name
        assert bounds[">="] == Version(oldest[name]), f"{name}: the lower bound is the oldest tested"
        assert bounds["<"] == Version(str(bounds[">="].major + 1)), f"{name}: up to the next major"
        assert specifier.contains(newest[name], prereleases=True), name
        assert Version(newest[name]) > bounds[">="], name
    # One family each: the core (1.x) and contrib (0.x) packages each share one release.
    for family in (oldest, newest):
        assert len({v for v in family.values() if Version(v).major >= 1}) == 1, family
        assert len({v for v in family.values() if Version(v).major == 0}) == 1, family
    # This venv is one of the two: the oldest in .venv-oldest, the newest in .venv.
    installed = {name: version(name) for name in oldest}
    assert installed in (oldest, newest), installed
