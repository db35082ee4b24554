"""collector/build.sh's first run (issue 19 point 9): a cold compile says how far it is, and
the cache survives edits to the script that do not change the binary.

Nothing here builds the collector: the progress code (collector/progress.sh, which
build.sh sources for its compile step) runs on a tiny Go module with a GOCACHE of its own;
the cache tests use a temporary CFK_CACHE and ``--cached-only``, which never builds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, unavailable

COLLECTOR = ROOT / "collector"
PROGRESS = COLLECTOR / "progress.sh"
BUILD = COLLECTOR / "build.sh"
TOOLCHAIN = "go1.27.3"  # build.sh's GOTOOLCHAIN

pytestmark = pytest.mark.timeout(300)


def go() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if found is None:
        unavailable("no Go toolchain (go on PATH or /usr/local/go/bin/go)")
        raise AssertionError("unreachable")
    return found


def tiny_module(directory: Path, body: str = 'println(strconv.Itoa(7), errors.New("x").Error())') -> Path:
    """A main package on two small std-lib packages (with the runtime, ~40 packages cold)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "go.mod").write_text("module example.com/tiny\n\ngo 1.22\n")
    imports = 'import (\n\t"errors"\n\t"strconv"\n)\n\nvar _, _ = errors.New, strconv.Itoa\n'
    (directory / "main.go").write_text(f"package main\n\n{imports}\nfunc main() {{\n\t{body}\n}}\n")
    return directory


def go_env(tmp_path: Path, cold: bool = True, **extra: str) -> dict[str, str]:
    """Go's environment; ``cold``: a GOCACHE of the test's own (else the user's, warm)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GO", "CFK_", "CGO_"))}
    env.update(GOTOOLCHAIN="local", GOFLAGS="", GOPROXY="off", GOWORK="off")
    if cold:
        env["GOCACHE"] = str(tmp_path / "gocache")
    env.update(GO=go(), CGO_ENABLED="0", **extra)
    return env


def build_with_progress(
    tmp_path: Path, module: Path, interval: str, cold: bool = True
) -> subprocess.CompletedProcess[str]:
    script = (
        f'source "{PROGRESS}"\n'
        f'go_build_with_progress "{module}" "{tmp_path}/compile.log" "{tmp_path}/tiny" '
        '-trimpath "-ldflags=-s -w" "-gcflags="\n'
    )
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=go_env(tmp_path, CFK_PROGRESS_INTERVAL=interval, cold=cold),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_a_cold_compile_counts_its_packages(tmp_path: Path) -> None:
    result = build_with_progress(tmp_path, tiny_module(tmp_path / "src"), interval="0")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    [announced] = [int(m) for m in re.findall(r"^build\.sh: compiling (\d+) packages", result.stderr, re.M)]
    assert announced > 5  # a fresh GOCACHE: the std packages it imports are compiled too
    counts = [
        (int(done), int(total))
        for done, total in re.findall(
            r"^build\.sh: compiling: (\d+)/(\d+) packages, \d+s elapsed", result.stderr, re.M
        )
    ]
    assert [d for d, _ in counts] == list(range(1, announced + 1)), lines  # every package, in order
    assert {t for _, t in counts} == {announced}
    assert re.fullmatch(
        rf"build\.sh: compiling: {announced}/{announced} packages, \d+s elapsed; linking", lines[-2]
    )
    assert re.fullmatch(rf"build\.sh: compiled {announced} packages and linked in \d+s", lines[-1])
    assert any(", ~" in line and line.endswith(" left") for line in lines)  # an estimate on the way
    assert "compiling: 0/" not in result.stderr
    ran = subprocess.run([str(tmp_path / "tiny")], capture_output=True, text=True, timeout=10, check=True)
    assert ran.stderr.strip() == "7 x"  # println writes to stderr
    assert "example.com/tiny" in (tmp_path / "compile.log").read_text()  # go build -v's own lines kept

    # Warm: nothing left to compile but the main package, and no estimate to make.
    again = build_with_progress(tmp_path, tmp_path / "src", interval="0")
    assert again.returncode == 0, again.stderr
    assert "build.sh: compiling 1 packages" in again.stderr
    assert "~" not in again.stderr


def test_the_interval_keeps_the_log_short(tmp_path: Path) -> None:
    """progress_filter alone, fed go build -v's kind of output (package paths and the
    compiler's messages, which are not counted)."""
    lines = "a/b\\nc/d\\n# c/d\\nc/d/x.go:1:2: oops\\n\\ne/f\\n"
    script = f'source "{PROGRESS}"\nprintf "{lines}" | progress_filter 3 "{tmp_path}/log" "$1"\n'
    quiet = subprocess.run(
        ["bash", "-c", script, "-", "600"], capture_output=True, text=True, timeout=10, check=True
    )
    assert quiet.stderr.splitlines() == [
        "build.sh: compiling: 3/3 packages, 0s elapsed; linking",
        "build.sh: compiled 3 packages and linked in 0s",
    ]
    chatty = subprocess.run(
        ["bash", "-c", script, "-", "0"], capture_output=True, text=True, timeout=10, check=True
    )
    assert chatty.stderr.splitlines()[:2] == [
        "build.sh: compiling: 1/3 packages, 0s elapsed",
        "build.sh: compiling: 2/3 packages, 0s elapsed",
    ]
    assert (tmp_path / "log").read_text().count("c/d/x.go:1:2: oops") == 2  # everything kept, twice


def test_a_failed_compile_fails_and_keeps_the_compilers_words(tmp_path: Path) -> None:
    module = tiny_module(tmp_path / "src", body="undefinedName()")
    result = build_with_progress(tmp_path, module, interval="0", cold=False)
    assert result.returncode != 0
    assert "undefined: undefinedName" in (tmp_path / "compile.log").read_text()


def test_progress_lines_format() -> None:
    script = (
        f'source "{PROGRESS}"\n'
        "progress_line 812 1953 372; progress_line 0 1953 0; progress_line 5 0 61; progress_line 9 4 3720\n"
    )
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    assert out.splitlines() == [
        "compiling: 812/1953 packages, 6m12s elapsed, ~8m42s left",
        "compiling: 0/1953 packages, 0s elapsed",
        "compiling: 5 packages, 1m01s elapsed",
        "compiling: 9/9 packages, 1h02m elapsed",
    ]


# --- the cache: keyed by a recipe number, not by the script's text -----------------------------


def fake_earlier_build(cache: Path, tmp_path: Path, name: str, *flags: str) -> Path:
    """A build directory as build.sh made them before it kept a recipe number: the manifest,
    and a binary (here a tiny one) whose build information `go version -m` reads."""
    directory = cache / "collector" / name
    directory.mkdir(parents=True)
    (directory / "builder-config.yaml").write_bytes((COLLECTOR / "builder-config.yaml").read_bytes())
    env = go_env(tmp_path, cold=False, GOTOOLCHAIN=TOOLCHAIN)
    env.pop("GOPROXY")  # the pinned toolchain may come from the module cache
    module = tiny_module(tmp_path / f"src-{name}")
    built = subprocess.run(
        [go(), "build", *flags, "-o", str(directory / "otelcol-cfk"), "."],
        cwd=module,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if built.returncode != 0:
        unavailable(f"the {TOOLCHAIN} toolchain is not available: {built.stderr[-500:]}")
    return directory


def cached_only(cache: Path, manifest: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CFK_", "GOFLAGS"))}
    env.update(CFK_CACHE=str(cache), CFK_COLLECTOR_BIN_DIR=str(cache / "bin"))
    if manifest is not None:
        env["CFK_BUILDER_CONFIG"] = str(manifest)
    return subprocess.run(
        [str(BUILD), "--cached-only"], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_a_build_from_before_the_recipe_number_is_taken_over_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # Refused: built without -trimpath (not what the builder runs).
    fake_earlier_build(cache, tmp_path, "aaaa-no-trimpath")
    refused = cached_only(cache)
    assert refused.returncode == 3, refused.stderr
    assert "--cached-only: not building" in refused.stderr
    assert "~23 min" in refused.stderr

    earlier = fake_earlier_build(cache, tmp_path, "bbbb-same", "-trimpath")
    taken = cached_only(cache)
    assert taken.returncode == 0, taken.stderr
    path = Path(taken.stdout.splitlines()[-1])
    assert path.parent.parent == cache / "collector"
    assert path.parent.name not in ("aaaa-no-trimpath", "bbbb-same")
    assert path.read_bytes() == (earlier / "otelcol-cfk").read_bytes()
    assert (path.parent / "recipe").read_text() == "1 (taken over from bbbb-same)\n"
    assert "the same build as bbbb-same" in taken.stderr
    assert (cache / "bin" / "otelcol-cfk").resolve() == path

    again = cached_only(cache)  # now the plain cache hit
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip() == f"build.sh: cached build {path.parent.name}"

    other = tmp_path / "other-manifest.yaml"
    other.write_text((COLLECTOR / "builder-config.yaml").read_text() + "\n# another manifest\n")
    assert cached_only(cache, other).returncode == 3  # a manifest of its own: nothing to take over
