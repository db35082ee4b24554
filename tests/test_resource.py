"""cfk_otel/_bootstrap/resource.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cfk_otel._bootstrap.resource import build_attributes, container_id
from cfk_otel._settings import load

CID = "a" * 12 + "0123456789abcdef" * 3 + "b" * 4


def test_container_id_from_cgroup_v1(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup.write_text(f"12:pids:/kubepods/besteffort/pod1/{CID}\n")
    assert container_id(cgroup, tmp_path / "missing") == CID


def test_container_id_from_cgroup_v2_mountinfo(tmp_path: Path) -> None:
    (tmp_path / "cgroup").write_text("0::/\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"1 2 0:1 / / rw - overlay overlay rw\n"
        f"3 4 0:2 /var/lib/docker/containers/{CID}/hostname /etc/hostname rw - ext4 /dev/vda rw\n"
    )
    assert container_id(tmp_path / "cgroup", mountinfo) == CID


def test_no_container(tmp_path: Path) -> None:
    (tmp_path / "cgroup").write_text("0::/user.slice\n")
    (tmp_path / "mountinfo").write_text("1 2 0:1 / / rw - ext4 /dev/vda rw\n")
    assert container_id(tmp_path / "cgroup", tmp_path / "mountinfo") == ""


def test_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    settings = load({"SERVICE_NAME": "svc", "K8S_POD_NAME": "p", "K8S_NAMESPACE_NAME": "ns"})
    first, second = build_attributes(settings), build_attributes(settings)
    assert first["service.name"] == "svc"
    assert (first["k8s.pod.name"], first["k8s.namespace.name"]) == ("p", "ns")
    assert "k8s.node.name" not in first
    assert first["service.instance.id"] != second["service.instance.id"]
    assert not any(k.startswith("process.command") for k in first)  # command lines carry secrets


def test_user_resource_attributes_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "host.name=from-user,service.name=ignored")
    attrs = build_attributes(load({"SERVICE_NAME": "svc"}))
    assert "host.name" not in attrs  # left to OTEL_RESOURCE_ATTRIBUTES
    assert attrs["service.name"] == "svc"
