"""`HeaderResolver`: the tenant identifier from a request header (`X-Tenant-ID`)."""

from starlette.requests import HTTPConnection

from ..errors import TenantResolutionError
from .base import OpenAPITenant, Resolver

__all__ = ["HeaderResolver"]


class HeaderResolver(Resolver):
    """Reads the identifier from one header, `X-Tenant-ID` by default.

    A header sent twice with different values is refused (400) rather than
    resolved by picking one: two layers (a proxy and the client) could each
    believe their value wins.
    """

    def __init__(self, header_name: str = "X-Tenant-ID") -> None:
        self.header_name = header_name.lower()
        self._raw_name = self.header_name.encode("latin-1")
        self._spelling = header_name  # as configured, for the OpenAPI schema

    async def resolve(self, connection: HTTPConnection) -> str | None:
        # The raw ASGI header list (names are lower-cased bytes): one pass, no copy.
        values = [value for name, value in connection.scope["headers"] if name == self._raw_name]
        if not values:
            return None
        if len(values) > 1 and len(set(values)) > 1:
            raise TenantResolutionError("conflicting tenant headers", detail="Tenant identifier ambiguous")
        # Only HTTP's optional whitespace (RFC 9110: space and tab) is trimmed. str.strip()
        # would also drop NBSP, NEL and other control characters, so "alpha\xa0" would
        # reach tenant alpha while a proxy's rule comparing raw values saw another tenant.
        return values[0].decode("latin-1").strip(" \t") or None

    def openapi(self, *, required: bool = True) -> OpenAPITenant:
        parameter = {
            "name": self._spelling,
            "in": "header",
            "required": required,
            "schema": {"type": "string"},
            "description": "The tenant's identifier, e.g. `acme`.",
        }
        return OpenAPITenant(parameters=(parameter,))
