"""Resolution strategies: how a request names its tenant.

`Resolver` is the contract; any async callable `(HTTPConnection) -> str | None`
can serve as a custom resolver. `HeaderResolver`, `SubdomainResolver`,
`DomainResolver`, `PathResolver` and `ChainResolver` are here; `JWTResolver` needs the `jwt` extra
and is imported from `fastapi_tenancy.resolution.jwt`. `OpenAPITenant` is what a
resolver's `openapi()` returns: how `/docs` shows a client to name the tenant.
"""

from .base import CallableResolver, OpenAPITenant, Resolver, as_resolver
from .chain import ChainResolver
from .domain import DomainResolver
from .header import HeaderResolver
from .path import PathResolver
from .subdomain import SubdomainResolver

__all__ = [
    "CallableResolver",
    "ChainResolver",
    "DomainResolver",
    "HeaderResolver",
    "OpenAPITenant",
    "PathResolver",
    "Resolver",
    "SubdomainResolver",
    "as_resolver",
]
