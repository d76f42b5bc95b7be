"""`PathResolver`: the tenant from a leading path segment (`/t/acme/orders`)."""

import re

from starlette.requests import HTTPConnection
from starlette.types import Scope

from ..errors import TenantResolutionError
from .base import OpenAPITenant, Resolver

__all__ = ["PathResolver", "validate_path_prefix"]

_PREFIX = re.compile(r"(?:/[A-Za-z0-9_~-]+)*")


def validate_path_prefix(prefix: str) -> str:
    """Check a path prefix (`/t`, `/api/tenants`, or `""` for none); `ValueError` otherwise."""
    if _PREFIX.fullmatch(prefix) is None:
        raise ValueError(
            "must be empty or '/'-separated segments of letters, digits, '_', '~' or '-', "
            "starting with '/' and without a trailing '/' (e.g. '/t')"
        )
    return prefix


class PathResolver(Resolver):
    """Reads the identifier from the path segment after `prefix`: `/t/acme/orders` names `acme`.

    The app's routes are written without the tenant segment: `app_scope` moves
    `/t/acme` into the scope's `root_path`, so the route sees `/orders` while
    `request.url` stays `/t/acme/orders` and `request.url_for(...)` builds URLs
    under `/t/acme`.

    Refused with 400, before any lookup: a path with a `.` or `..` segment
    (`/t/../admin`, also when sent as `%2e%2e`), and one with an encoded slash
    (`%2F`), which would split into segments differently before and after decoding.
    """

    def __init__(self, prefix: str = "/t") -> None:
        self.prefix = validate_path_prefix(prefix)
        self._start = prefix + "/"

    async def resolve(self, connection: HTTPConnection) -> str | None:
        found = self._split(connection.scope)
        return found[0] if found is not None else None

    def openapi(self, *, required: bool = True) -> OpenAPITenant:
        return OpenAPITenant(path_prefix=self.prefix)

    def app_scope(self, scope: Scope) -> Scope:
        found = self._split(scope)
        if found is None:
            return scope
        # The path keeps its full value, as ASGI servers send it (it includes the
        # root_path); Starlette routes on the part after root_path.
        return {**scope, "root_path": found[1]}

    def _split(self, scope: Scope) -> tuple[str, str] | None:
        """(identifier, the root_path that includes the tenant segment), or None."""
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        route = path
        # The route's part of the path, as Starlette computes it.
        cut = len(root_path)
        if cut and path.startswith(root_path) and path[cut : cut + 1] in ("", "/"):
            route = path[cut:]
        if not route.startswith(self._start):
            return None
        # The server has decoded the path: `%2e%2e` is `..` by now, so one check covers
        # both spellings. Substring scans only: linear, no regex, no copy of the path.
        if "/." in route and ("/./" in route or "/../" in route or route.endswith(("/.", "/.."))):
            raise TenantResolutionError("dot segment in a tenant path", detail="Tenant path invalid")
        raw_path = scope.get("raw_path")
        if raw_path and b"%2" in raw_path and (b"%2f" in raw_path or b"%2F" in raw_path):
            raise TenantResolutionError("encoded slash in a tenant path", detail="Tenant path invalid")
        identifier = route[len(self._start) :].partition("/")[0]
        if not identifier:
            return None
        return identifier, root_path + self._start + identifier
