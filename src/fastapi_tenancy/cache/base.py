"""`TenantCache`: every key carries the tenant; a whole tenant is invalidated in one step.

Keys are laid out as `<prefix>:<identifier>:<tenant id>:v<version>:<escaped key>`.
The tenant id is in the key so that a slug purged and registered again never sees
the old tenant's entries. Invalidating a tenant increments its version counter: the
old entries become unreachable at once and expire with their TTL. No pattern delete
(`KEYS`/`SCAN` + `DEL`) is ever issued, so no key, identifier or prefix can widen an
invalidation to another tenant's entries.
"""

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from ..context import current_tenant
from ..tenant import Tenant

__all__ = ["CacheBackend", "TenantCache"]

_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MISSING: Any = object()


class CacheBackend(ABC):
    """Where a `TenantCache` keeps entries: versioned namespaces of keys.

    A namespace is one tenant's part of the cache. Implement the five methods;
    `invalidate(namespace)` must make every entry set before it unreachable in one
    atomic step (the built-in backends bump a version counter that is part of
    every key), and must never touch another namespace.
    """

    @abstractmethod
    async def get(self, namespace: str, key: str) -> bytes | None:
        """The value stored under `key` in the namespace's current version, or None."""

    @abstractmethod
    async def set(self, namespace: str, key: str, value: bytes, ttl: float | None) -> None:
        """Store `value` under `key` in the namespace's current version; `ttl` in seconds."""

    @abstractmethod
    async def delete(self, namespace: str, key: str) -> None:
        """Remove `key` from the namespace's current version (no error if absent)."""

    @abstractmethod
    async def invalidate(self, namespace: str) -> None:
        """Make every entry of the namespace unreachable, in one step."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Release connections. Called by `TenantCache.close()`."""


class TenantCache:
    """A cache whose keys always carry the tenant. Safe for concurrent use by requests.

    Each call acts for the current tenant (`current_tenant()`: outside a tenant scope
    it raises instead of reading a shared key) or for `tenant=`. Values are stored
    as JSON. `ttl` (seconds, default 300; None keeps entries until evicted) also
    bounds how long invalidated entries occupy memory.

        cache = TenantCache(MemoryCacheBackend())
        await cache.set("dashboard", {"orders": 3})
        await cache.get("dashboard")           # the current tenant's value only
        await cache.invalidate_tenant()        # the current tenant's whole cache
    """

    def __init__(self, backend: CacheBackend, *, prefix: str = "tenancy", ttl: float | None = 300) -> None:
        if _PREFIX.fullmatch(prefix) is None:
            raise ValueError(f"cache prefix {prefix!r:.80} must be 1-64 of A-Z a-z 0-9 _ . -")
        if ttl is not None and ttl <= 0:
            raise ValueError("ttl must be positive seconds or None")
        self.backend = backend
        self.prefix = prefix
        self.ttl = ttl

    def namespace(self, tenant: Tenant | None = None) -> str:
        """The namespace of `tenant` (default: the current tenant) in the backend."""
        tenant = current_tenant() if tenant is None else tenant
        # Identifiers are slugs and ids are generated: neither holds ":"; the id keeps a
        # re-registered slug away from the old tenant's entries.
        return f"{self.prefix}:{tenant.identifier}:{tenant.id}"

    @staticmethod
    def escape(key: str) -> str:
        """The stored form of a caller's key: percent-encoded, so it holds no `:`, glob
        character (`* ? [ ] \\`) or whitespace, and two different keys never collide."""
        if not isinstance(key, str):
            raise TypeError(f"cache keys are str, not {type(key).__name__}")
        return quote(key, safe="")

    async def get(self, key: str, default: Any = None, *, tenant: Tenant | None = None) -> Any:
        """The value cached under `key` for the tenant, or `default`."""
        raw = await self.backend.get(self.namespace(tenant), self.escape(key))
        return default if raw is None else json.loads(raw)

    async def set(
        self, key: str, value: Any, *, ttl: float | None = _MISSING, tenant: Tenant | None = None
    ) -> None:
        """Cache `value` (JSON-serialisable) under `key` for the tenant."""
        ttl = self.ttl if ttl is _MISSING else ttl
        raw = json.dumps(value, separators=(",", ":")).encode()
        await self.backend.set(self.namespace(tenant), self.escape(key), raw, ttl)

    async def delete(self, key: str, *, tenant: Tenant | None = None) -> None:
        """Forget `key` for the tenant."""
        await self.backend.delete(self.namespace(tenant), self.escape(key))

    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Awaitable[Any]],
        *,
        ttl: float | None = _MISSING,
        tenant: Tenant | None = None,
    ) -> Any:
        """The cached value, or `await factory()` cached and returned (a miss is not locked:
        concurrent misses may each call the factory)."""
        tenant = current_tenant() if tenant is None else tenant
        raw = await self.backend.get(self.namespace(tenant), self.escape(key))
        if raw is not None:
            return json.loads(raw)
        value = await factory()
        await self.set(key, value, ttl=ttl, tenant=tenant)
        return value

    async def invalidate_tenant(self, tenant: Tenant | None = None) -> None:
        """Drop every entry of the tenant (default: the current tenant), in one step."""
        await self.backend.invalidate(self.namespace(tenant))

    async def close(self) -> None:
        """Close the backend."""
        await self.backend.close()
