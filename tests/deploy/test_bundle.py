"""``cfk-otel deploy-files DIR`` (issue 19 point 7): the operations bundle, from the
installed package, identical to the checkout's files, its alert rules valid for promtool.

The wheel test builds the real wheel (``pip wheel . --no-deps``, the compiled core
included), unpacks it and runs the command from the unpacked package alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cfk_otel._cli import deploy_files as _deploy_files
from cfk_otel._cli.main import main
from tests.conftest import ROOT
from tests.deploy.conftest import run, tool

PARTS = ("deploy", "docs/dashboards", "collector/config")


def checkout_files() -> dict[str, bytes]:
    """The bundle as the repository holds it (git's list: no stray local files)."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--", *PARTS],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    names = [n for n in listed.split("\0") if n and (ROOT / n).is_file()]
    assert len(names) > 30, names
    return {name: (ROOT / name).read_bytes() for name in names}


def written_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def check_promtool(directory: Path) -> None:
    promtool = tool("promtool")
    rules = directory / "deploy" / "prometheus"
    checked = run(promtool, "check", "rules", str(rules / "alerting-rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(promtool, "test", "rules", "alerting-rules.test.yml", cwd=rules, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout + tested.stderr


def test_the_bundle_is_the_checkouts_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "ops"
    assert main(["deploy-files", str(target)]) == 0
    expected = checkout_files()
    assert written_files(target) == expected
    out = capsys.readouterr().out
    assert f"{len(expected)} file(s) written to {target}, 0 already up to date" in out
    assert "  wrote deploy/prometheus/alerting-rules.test.yml" in out
    check_promtool(target)


def test_an_existing_directory_is_never_overwritten_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "ops"
    assert main(["deploy-files", str(target)]) == 0
    capsys.readouterr()
    assert main(["deploy-files", str(target)]) == 0
    assert "0 file(s) written" in capsys.readouterr().out

    edited = target / "deploy" / "alertmanager" / "alertmanager.yml"
    edited.write_text("# mine\n")
    assert main(["deploy-files", str(target)]) == 1
    err = capsys.readouterr().err
    assert "would overwrite files that differ" in err
    assert "deploy/alertmanager/alertmanager.yml" in err
    assert "--force" in err
    assert edited.read_text() == "# mine\n"
    assert main(["deploy-files", str(target), "--force"]) == 0
    assert edited.read_bytes() == (ROOT / "deploy/alertmanager/alertmanager.yml").read_bytes()

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["deploy-files", str(a_file)]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err


def test_a_missing_bundle_is_said_plainly(tmp_path: Path) -> None:
    with pytest.raises(_deploy_files.BundleError, match="has no operations bundle"):
        _deploy_files.files(tmp_path)


def test_the_repository_keeps_one_copy() -> None:
    """cfk_otel/_ops holds links into the checkout, not copies."""
    for part in PARTS:
        link = _deploy_files.ROOT / part
        assert link.is_symlink(), link
        assert link.resolve() == (ROOT / part).resolve()


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel . --no-deps``, as a user or a release would build it, the compiled core
    too: about 2 minutes on 2 cores with a cold cargo cache, a few seconds with the one kept
    beside the collector's cache (CFK_CACHE, as collector/build.sh reads it)."""
    out = tmp_path_factory.mktemp("wheel")
    cache = Path(
        os.environ.get("CFK_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cfk-otel"
    )
    env = {
        **os.environ,
        "CARGO_TARGET_DIR": os.environ.get("CARGO_TARGET_DIR") or str(cache / "cargo-target"),
    }
    built = subprocess.run(
        [
            "nice",
            "-n",
            "10",
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "-q",
            "-w",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        env=env,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [path] = out.glob("cfk_otel-*.whl")
    return path


@pytest.mark.timeout(1900)
def test_the_wheel_carries_the_bundle(wheel: Path, tmp_path: Path) -> None:
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(unpacked)
    assert "cfk_otel/_ops/deploy/prometheus/alerting-rules.yml" in names
    assert not [n for n in names if n.startswith(("deploy/", "docs/", "collector/"))]  # nothing loose
    target = tmp_path / "ops"
    script = (
        "import sys, cfk_otel; from cfk_otel._cli.main import main\n"
        f"assert cfk_otel.__file__.startswith({str(unpacked)!r}), cfk_otel.__file__\n"
        f"sys.exit(main(['deploy-files', {str(target)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(unpacked)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert written_files(target) == checkout_files()
    check_promtool(target)
