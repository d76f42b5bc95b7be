"""Resolution strategies: how a request names its tenant.

`Resolver` is the contract; `HeaderResolver` reads a header; any async callable
`(HTTPConnection) -> str | None` can serve as a custom resolver.
"""

from .base import CallableResolver, Resolver, as_resolver
from .header import HeaderResolver

__all__ = ["CallableResolver", "HeaderResolver", "Resolver", "as_resolver"]
