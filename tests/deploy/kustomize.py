"""A tiny kustomize for the tests (no kubectl or kustomize binary exists here).

Supports exactly what deploy/kubernetes uses and refuses everything else, so a
kustomization that grows a feature this does not model fails the tests instead of being
rendered wrongly: `resources` (files inside the kustomization root, or directories with
their own kustomization.yaml), `configMapGenerator` (`files`, `literals`, `behavior`
create/merge/replace) with kustomize's content-hash name suffix and the references to
generated ConfigMaps in pod templates rewritten, as kustomize does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

_KNOWN = {"apiVersion", "kind", "resources", "configMapGenerator"}
_GENERATED = "__generated__"


def build(directory: Path) -> list[dict[str, Any]]:
    """Render ``directory/kustomization.yaml`` to a list of Kubernetes objects."""
    docs = _build(directory.resolve())
    renames: dict[tuple[str, str], str] = {}
    for doc in docs:
        if doc.pop(_GENERATED, False):
            meta = doc["metadata"]
            digest = hashlib.sha256(json.dumps(doc["data"], sort_keys=True).encode()).hexdigest()[:10]
            renames[meta.get("namespace", ""), meta["name"]] = f"{meta['name']}-{digest}"
            meta["name"] = renames[meta.get("namespace", ""), meta["name"]]
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod is not None:
            _rename_references(pod, doc["metadata"].get("namespace", ""), renames)
    return docs


def _build(root: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KNOWN
    if unknown:
        raise ValueError(f"{root}/kustomization.yaml: not modelled by tests/deploy/kustomize.py: {unknown}")
    docs: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            docs.extend(_build(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(_inside(root, path).read_text()) if d)
    for generator in kustomization.get("configMapGenerator", []):
        _generate(root, generator, docs)
    return docs


def _generate(root: Path, generator: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """One configMapGenerator entry: a new ConfigMap, or merged into / replacing a base's."""
    data: dict[str, str] = {}
    for item in generator.get("files", []):
        key, _, relative = item.rpartition("=")
        path = _inside(root, (root / relative).resolve())
        data[key or path.name] = path.read_text()
    for literal in generator.get("literals", []):
        key, value = literal.split("=", 1)
        data[key] = value
    name, namespace = generator["name"], generator.get("namespace", "")
    existing = [
        d
        for d in docs
        if d.get(_GENERATED)
        and d["metadata"]["name"] == name
        and d["metadata"].get("namespace", "") == namespace
    ]
    behavior = generator.get("behavior", "create")
    if behavior == "create":
        if existing:
            raise ValueError(f"configMapGenerator {name}: already exists (use behavior: merge)")
        metadata = {"name": name, **({"namespace": namespace} if namespace else {})}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
        docs[-1][_GENERATED] = True
    elif behavior in ("merge", "replace"):
        if not existing:
            raise ValueError(f"configMapGenerator {name}: nothing to {behavior}")
        if behavior == "merge":
            existing[0]["data"].update(data)
        else:
            existing[0]["data"] = data
    else:
        raise ValueError(f"configMapGenerator {name}: unknown behavior {behavior}")


def _inside(root: Path, path: Path) -> Path:
    """kustomize's default load restrictor: no file outside the kustomization root."""
    if not path.is_relative_to(root):
        raise ValueError(f"{path} is outside the kustomization root {root} (kustomize refuses it)")
    return path


def _rename_references(pod: dict[str, Any], namespace: str, renames: dict[tuple[str, str], str]) -> None:
    def renamed(name: str) -> str:
        return renames.get((namespace, name), name)

    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            volume["configMap"]["name"] = renamed(volume["configMap"]["name"])
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                source["configMapRef"]["name"] = renamed(source["configMapRef"]["name"])
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                ref["name"] = renamed(ref["name"])
