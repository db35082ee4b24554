"""Route templates (``/api/tickets/{ticket_id}``) for span names and metric labels.

Starlette's router (and so FastAPI's) records the matched route in ``scope["route"]``
and, for mounted sub-apps, extends ``scope["root_path"]``. The template of a request is
the mount prefix, templated, followed by the innermost route's ``path_format``.
Everything that did not match a route shares :data:`UNMATCHED`, so raw paths never
reach a label.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, Final

UNMATCHED: Final = "unmatched"
_CACHE_LIMIT: Final = 2048
_PARAM = re.compile(r"\{([^}:]+)(?::([^}]+))?\}")


def _routes_of(app: object) -> list[Any] | None:
    # Follow middleware wrappers (``.app``) down to something with a route table.
    for _ in range(16):
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):
            return routes
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def _mount_prefixes(routes: list[Any], prefix: str = "", depth: int = 0) -> Iterator[str]:
    for route in routes:
        child = getattr(route, "routes", None) if hasattr(route, "path_regex") else None
        if child is None and hasattr(route, "path_regex") and getattr(route, "app", None) is not None:
            child = _routes_of(route.app) if not hasattr(route, "endpoint") else None
        if isinstance(child, list) and depth < 8:
            here = prefix + getattr(route, "path", "")
            yield here
            yield from _mount_prefixes(child, here, depth + 1)


def _template_regex(template: str) -> re.Pattern[str]:
    out, last = [], 0
    for match in _PARAM.finditer(template):
        out.append(re.escape(template[last : match.start()]))
        out.append(".*" if match.group(2) == "path" else "[^/]+")
        last = match.end()
    out.append(re.escape(template[last:]))
    return re.compile("".join(out))


class RouteResolver:
    """Maps a finished request's scope to its route template; one per wrapped app."""

    def __init__(self, app: object) -> None:
        self._app = app
        self._templated: list[tuple[re.Pattern[str], str]] | None = None
        # (id(route), concrete prefix) -> (route, template); the route is kept so its id
        # cannot be reused while the entry lives.
        self._cache: MutableMapping[tuple[int, str], tuple[object, str]] = {}

    def template(self, scope: Mapping[str, Any], root_path: str, status: int) -> str:
        route = scope.get("route")
        if route is None:
            return UNMATCHED
        prefix = scope.get("root_path", "")[len(root_path) :]
        key = (id(route), prefix)
        hit = self._cache.get(key)
        if hit is not None:
            return hit[1]
        template = self._resolve(route, prefix, status)
        if len(self._cache) < _CACHE_LIMIT:
            self._cache[key] = (route, template)
        return template

    def _resolve(self, route: object, prefix: str, status: int) -> str:
        is_mount = hasattr(route, "routes") or (
            hasattr(route, "app") and not hasattr(route, "endpoint") and hasattr(route, "path_regex")
        )
        if is_mount and status == 404:
            return UNMATCHED  # the mount matched, nothing inside it did
        prefix = self._templated_prefix(prefix)
        if is_mount:
            return prefix + "/{path}"
        path = getattr(route, "path_format", None) or getattr(route, "path", None)
        if not isinstance(path, str):
            return UNMATCHED
        return prefix + path

    def _templated_prefix(self, prefix: str) -> str:
        if not prefix:
            return prefix
        if self._templated is None:
            routes = _routes_of(self._app) or []
            self._templated = [
                (_template_regex(p), p) for p in dict.fromkeys(_mount_prefixes(routes)) if "{" in p
            ]
        for regex, template in self._templated:
            if regex.fullmatch(prefix):
                return template
        return prefix
