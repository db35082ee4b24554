"""Resource attributes: who is sending the telemetry.

Built once per process (each uvicorn or gunicorn worker gets its own
``service.instance.id``). The process command line is deliberately left out: it
often carries passwords.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import sys
import uuid
from pathlib import Path

from opentelemetry.sdk.resources import OTELResourceDetector

from cfk_otel._settings import Settings

# A container id is 64 hex characters inside a cgroup path (v1) or a mount source (v2).
_CONTAINER_ID = re.compile(r"(?:^|[/:-])([0-9a-f]{64})(?:\.scope)?(?:/|$)")


def container_id(
    cgroup: Path = Path("/proc/self/cgroup"), mountinfo: Path = Path("/proc/self/mountinfo")
) -> str:
    """The container id read from cgroup v1, else from cgroup v2's mount table; '' if none."""
    for path in (cgroup, mountinfo):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            # v2 mount table: only the hostname/resolv.conf bind mounts name the container.
            if path is mountinfo and "/containers/" not in line:
                continue
            for field_ in line.split():
                match = _CONTAINER_ID.search(field_)
                if match:
                    return match.group(1)
    return ""


def build_attributes(settings: Settings) -> dict[str, str | int]:
    """Attributes for ``Resource.create``.

    Keys that the user set in ``OTEL_RESOURCE_ATTRIBUTES`` are left out so that the
    user's value stands, except the service name, whose own variables are more specific.
    """
    attributes: dict[str, str | int] = {
        "service.name": settings.service_name,
        "service.version": settings.service_version,
        "deployment.environment.name": settings.environment,
        "service.instance.id": str(uuid.uuid4()),
        "host.name": socket.gethostname(),
        "host.arch": platform.machine(),
        "os.type": sys.platform,
        "process.pid": os.getpid(),
        "process.runtime.name": sys.implementation.name,
        "process.runtime.version": platform.python_version(),
        "process.executable.name": Path(sys.executable).name,
    }
    cid = container_id()
    if cid:
        attributes["container.id"] = cid
    for key, value in (
        ("k8s.pod.name", settings.k8s_pod_name),
        ("k8s.pod.uid", settings.k8s_pod_uid),
        ("k8s.namespace.name", settings.k8s_namespace),
        ("k8s.node.name", settings.k8s_node_name),
    ):
        if value:
            attributes[key] = value

    user_keys = set(OTELResourceDetector().detect().attributes) - {"service.name"}
    return {k: v for k, v in attributes.items() if k not in user_keys}
