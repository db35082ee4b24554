"""scripts/services when its ports are taken (issue 19 point 9): it names the port and what
holds it, takes the next free port, and prints the URLs it chose.

Each test has a CFK_STATE of its own and ports of its own: the shared PostgreSQL (55432) and
Redis (56379) other tests use are never touched. Every server started here is stopped.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from tests.conftest import ROOT, unavailable

SERVICES = ROOT / "scripts" / "services"
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def state() -> Iterator[Path]:
    """A CFK_STATE the postgres user can enter (pytest's tmp_path is private to root)."""
    if shutil.which("redis-server") is None or not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        unavailable("PostgreSQL or Redis is not installed (scripts/services install)")
    directory = Path(tempfile.mkdtemp(prefix="cfk-services-test-", dir="/var/tmp"))
    directory.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _below_ephemeral() -> list[int]:
    """Ports below the kernel's ephemeral range, in a random order. The script takes the port
    after a held one: in the ephemeral range, any test's client connection may own that one
    between the script's check and the server's bind (PostgreSQL then fails to start)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return random.sample(range(20_000, low - 100, 10), 200)


@pytest.fixture
def held() -> Iterator[list[int]]:
    """Two ports held by listening sockets of this process, as another server would hold them."""
    sockets: list[socket.socket] = []
    for port in _below_ephemeral():
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        s.listen()
        sockets.append(s)
        if len(sockets) == 2:
            break
    yield [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()


def services(
    command: str, state: Path, ports: list[int], path: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFK_")}
    env.update(CFK_STATE=str(state), CFK_PG_PORT=str(ports[0]), CFK_REDIS_PORT=str(ports[1]))
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [str(SERVICES), command], env=env, capture_output=True, text=True, timeout=150, check=False
    )


def urls(out: str) -> dict[str, str]:
    return dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if "=" in line)


async def _pg(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return int(await conn.fetchval("SELECT 1"))
    finally:
        await conn.close()


def run_and_stop(state: Path, ports: list[int], path: str | None = None) -> tuple[str, dict[str, str]]:
    started = services("start", state, ports, path)
    try:
        assert started.returncode == 0, started.stderr
        chosen = urls(started.stdout)
        assert asyncio.run(_pg(chosen["DATABASE_URL"])) == 1
        assert redis.Redis.from_url(chosen["REDIS_URL"], socket_timeout=5).ping()
        assert urls(services("env", state, ports, path).stdout) == chosen  # env and stop know them
        return started.stderr, chosen
    finally:
        stopped = services("stop", state, ports, path)
        assert stopped.returncode == 0, stopped.stderr


def test_taken_ports_are_named_with_their_holder_and_others_chosen(state: Path, held: list[int]) -> None:
    pg, rd = held
    err, chosen = run_and_stop(state, held)
    me = f"(pid {os.getpid()}, {os.path.realpath(f'/proc/{os.getpid()}/exe')})"
    assert f"scripts/services: port {pg} is held by python" in err, err
    assert me in err
    new_pg = int(chosen["DATABASE_URL"].rsplit(":", 1)[1].split("/")[0])
    new_rd = int(chosen["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    assert new_pg not in (pg, rd)
    assert new_rd not in (pg, rd)
    assert f"PostgreSQL uses {new_pg} instead" in err
    assert f"port {rd} is held by python" in err
    assert f"Redis uses {new_rd} instead" in err
    assert f"scripts/services: PostgreSQL on 127.0.0.1:{new_pg}, Redis on 127.0.0.1:{new_rd}" in err
    assert "cfk-test-password" not in err


def test_without_ss_the_holder_comes_from_proc(state: Path, held: list[int], tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ss").write_text("#!/bin/sh\nexit 1\n")
    (fake / "ss").chmod(0o755)
    err, _ = run_and_stop(state, held, path=f"{fake}:{os.environ['PATH']}")
    assert f"port {held[0]} is held by python" in err, err
    assert f"(pid {os.getpid()}, " in err


def test_free_ports_are_kept(state: Path) -> None:
    ports = []
    for port in _below_ephemeral():  # free now, and no client connection will take them
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
        if len(ports) == 2:
            break
    err, chosen = run_and_stop(state, ports)
    assert "is held by" not in err
    assert f"127.0.0.1:{ports[0]}/cfk" in chosen["DATABASE_URL"]
    assert f"127.0.0.1:{ports[1]}/0" in chosen["REDIS_URL"]
