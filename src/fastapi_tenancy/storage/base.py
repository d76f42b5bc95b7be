"""`TenantStore`: the contract every tenant registry fulfils."""

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from ..domain import Domain
from ..errors import ConfigurationError, TenantChangedError, TenantNotFoundError
from ..tenant import Tenant, TenantStatus

__all__ = ["TenantStore", "TenantVersion", "version_of"]

TenantVersion = tuple[str, str, datetime]
"""A tenant's version as the registry keeps it: `(id, status, updated_at)`; see `TenantStore.get_versions`."""


def version_of(tenant: Tenant) -> TenantVersion:
    """The version of `tenant`: equal to what `get_versions` reads while the stored tenant is unchanged.

    `id` tells incarnations of one slug apart (deleted, then registered again); the
    status (a `str`) compares equal to its value as a store reads it back.
    """
    return (tenant.id, tenant.status, tenant.updated_at)


class TenantStore(ABC):
    """Where tenants are registered. Safe to share between concurrent requests.

    To write a custom store, subclass this and implement the abstract methods;
    `tests/storage/test_contract.py` is the suite every store must pass. Rules:

    - lookups return `None` for an unknown tenant (they are on the request path,
      where exceptions would be the common case for probing clients);
    - `create` raises `TenantAlreadyExistsError` when the id or the identifier is
      taken, atomically (two concurrent creates of one slug: one wins);
    - `update` stores name, status, metadata, `updated_at` and
      `encrypted_database_url` (ciphertext: store it as given); a tenant's `id`,
      `identifier` and `created_at` never change; unknown ids raise
      `TenantNotFoundError`, as does `delete`. Given `expected`, it is a
      compare-and-set: it applies only while the stored status and `updated_at`
      still equal `expected`'s, and raises `TenantChangedError` otherwise, so a
      change made from a stale read can never undo a concurrent one;
    - an unreachable backend raises `TenancyUnavailableError` (a clear 503),
      never a driver exception;
    - custom domains (optional: `keeps_domains`): a domain name belongs to one tenant
      at most, atomically (of two tenants adding one name at once, one wins); a tenant
      has at most one primary domain; `delete` removes the tenant's domains with it.

    The manager's registry cache (in memory, per process) is invalidated on every
    change it makes, so a store needs no in-process cache of its own;
    `CachingTenantStore` adds one in Redis that every worker shares.
    """

    async def initialize(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Create what the store needs (tables, connections). Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections. Idempotent."""

    async def problem(self) -> str | None:
        """Why the store, as it stands, cannot serve as the registry; None if it can.

        Read-only (`doctor` asks before anything is created): a store that keeps its
        tenants in something it may find made by another program says what is wrong
        with it, in words an operator can act on.
        """
        return None

    def configure(self, *, pgbouncer: bool) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Settings of the deployment, given by the manager once, before `initialize()`.

        `pgbouncer`: PostgreSQL is reached through PgBouncer in transaction mode, so a
        pool the store opens itself must cache no prepared statements.
        """

    def notify_engine(self) -> AsyncEngine | None:
        """A PostgreSQL engine on which LISTEN/NOTIFY reaches every worker sharing this
        registry, or None. The manager announces tenant changes over it when no
        `redis_url` is configured."""
        return None

    def registry_store(self) -> "TenantStore":
        """The store that keeps the registry itself: this one, or the one a wrapper holds.

        A store in front of another (`CachingTenantStore`) answers with that one's, so
        that code needing the registry's own table (converting a 0.5.0 registry) finds it.
        """
        return self

    # The default keeps the record in this object, which is right for a store that only
    # one process uses; a store that several processes share keeps it with its tenants.
    _channel_record: str | None = None

    async def get_channel_record(self) -> str | None:
        """The invalidation channel this registry's processes use (an opaque string), or None.

        `TenancyManager.initialize()` reads it to refuse a process configured for another
        channel (`fastapi_tenancy.invalidation.record`). The default keeps it in this
        object: override it, and `set_channel_record`, in a store that several processes
        share, to keep it with the tenants.
        """
        return self._channel_record

    async def set_channel_record(self, record: str, *, replace: bool = False) -> str:
        """Record `record` unless one exists (with `replace`, anyway); return the record in force.

        Atomic: of two processes recording at once, one record wins and both get it back.
        """
        if self._channel_record is None or replace:
            self._channel_record = record
        return self._channel_record

    @abstractmethod
    async def get_by_id(self, tenant_id: str) -> Tenant | None:
        """The tenant with this id, or None."""

    @abstractmethod
    async def get_by_identifier(self, identifier: str) -> Tenant | None:
        """The tenant with this slug, or None."""

    async def get_many(self, identifiers: Sequence[str]) -> dict[str, Tenant]:
        """The tenants with these slugs, by slug (unknown ones are left out).

        Used by the registry cache (`TenantLookup`) to refresh many entries at once. The default reads them
        one by one; a store that can read them in one query should override it.
        """
        found: dict[str, Tenant] = {}
        for identifier in identifiers:
            tenant = await self.get_by_identifier(identifier)
            if tenant is not None:
                found[identifier] = tenant
        return found

    async def get_versions(self, identifiers: Sequence[str]) -> dict[str, TenantVersion]:
        """`(id, status, updated_at)` of the tenants with these slugs, by slug (unknown ones left out).

        What the registry cache's refresh-ahead reads for a batch of cached tenants: a
        tenant whose version equals the cached one's is unchanged (every change through a
        store writes a later `updated_at`), so only the others are read whole
        (`get_many`). The status is part of the version, so a suspension is seen even if
        whoever wrote it kept `updated_at`. The default takes them from `get_many`
        (correct, no cheaper); a store that can read these three fields alone should
        override it.
        """
        found = await self.get_many(identifiers)
        return {identifier: version_of(tenant) for identifier, tenant in found.items()}

    async def get_by_ids(self, tenant_ids: Iterable[str]) -> list[Tenant]:
        """The tenants with these ids, in the order given (unknown ids are left out).

        The default reads them one by one; a store that can read them in one query
        should override it.
        """
        found: list[Tenant] = []
        for tenant_id in dict.fromkeys(tenant_ids):
            tenant = await self.get_by_id(tenant_id)
            if tenant is not None:
                found.append(tenant)
        return found

    async def exists(self, tenant_id: str) -> bool:
        """Whether a tenant with this id is registered, whatever its status."""
        return await self.get_by_id(tenant_id) is not None

    @abstractmethod
    async def create(self, tenant: Tenant) -> Tenant:
        """Add a new tenant; raise `TenantAlreadyExistsError` if id or slug is taken."""

    @abstractmethod
    async def update(self, tenant: Tenant, *, expected: Tenant | None = None) -> Tenant:
        """Store the tenant's name, status, metadata and `updated_at` (compare-and-set on `expected`)."""

    @abstractmethod
    async def delete(self, tenant_id: str) -> None:
        """Remove the tenant's record for good (its data is the isolation's business)."""

    @abstractmethod
    async def list(
        self, *, status: TenantStatus | None = None, after: str | None = None, limit: int = 100
    ) -> list[Tenant]:
        """Tenants ordered by identifier, those after the identifier `after` (keyset paging)."""

    async def iterate(self, *, status: TenantStatus | None = None, page: int = 500) -> AsyncIterator[Tenant]:
        """Every tenant (with `status`, if given) in identifier order, read `page` at a time."""
        after: str | None = None
        while True:
            batch = await self.list(status=status, after=after, limit=page)
            for tenant in batch:
                yield tenant
            if len(batch) < page:
                return
            after = batch[-1].identifier

    async def change(
        self, identifier: str, change: Callable[[Tenant], Tenant], *, attempts: int = 10
    ) -> tuple[Tenant, Tenant]:
        """Apply `change` to the stored tenant with compare-and-set; `(before, after)`.

        Read, apply, `update(expected=before)`; when a concurrent change won, read
        again and re-apply, so `change` always sees what is really stored and a stale
        read can never undo a suspension or a delete. `after is before` when `change`
        returned its argument (nothing written). Raises `TenantNotFoundError` for an
        unknown slug, and `TenantChangedError` after `attempts` lost races.
        """
        for _ in range(attempts):
            before = await self.get_by_identifier(identifier)
            if before is None:
                raise TenantNotFoundError(f"no tenant {identifier!r:.80}")
            after = change(before)
            if after is before:
                return before, before
            try:
                return before, await self.update(after, expected=before)
            except TenantChangedError:
                continue
        raise TenantChangedError(f"tenant {identifier!r} kept changing; gave up after {attempts} tries")

    @abstractmethod
    async def count(self, *, status: TenantStatus | None = None) -> int:
        """How many tenants there are (with `status`, if given)."""

    # -- custom domains: optional; a store that keeps them overrides all of these ---------

    keeps_domains: bool = False
    """Whether this store keeps custom domains (`add_domain` and the methods beside it).

    False by default, and then those methods raise `ConfigurationError`: a store written
    before domains existed keeps working for everything else, and the domain strategy
    refuses to start on it. A store that implements them sets it to True.
    """

    async def get_domain(self, name: str) -> Domain | None:
        """The domain `name` (normalised: `validate_domain`) with its tenant's id, or None."""
        raise self._no_domains()

    async def get_by_domain(self, name: str) -> Tenant | None:
        """The tenant that holds the domain `name`, or None; the registry cache reads through it.

        The default reads the domain, then its tenant; a store that can join them in one
        query should override it.
        """
        domain = await self.get_domain(name)
        return None if domain is None else await self.get_by_id(domain.tenant_id)

    async def get_domains(self, tenant_id: str) -> tuple[Domain, ...]:
        """The tenant's domains: the primary one first, then by name (empty for an unknown id)."""
        raise self._no_domains()

    async def add_domain(self, domain: Domain) -> Domain:
        """Give `domain.name` to the tenant `domain.tenant_id`; return the domain as stored.

        Atomic: raises `DomainTakenError` when another tenant holds the name (of two
        tenants adding it at once, one wins), `TenantNotFoundError` for an unknown
        tenant. Adding a name the tenant holds already changes nothing, except that
        `primary=True` makes it the primary domain: the tenant's previous primary domain,
        if any, stays as a plain one, in the same atomic step.
        """
        raise self._no_domains()

    async def remove_domain(self, name: str, *, tenant_id: str) -> None:
        """Take the domain `name` from the tenant `tenant_id`; `DomainNotFoundError` if it is not its."""
        raise self._no_domains()

    def _no_domains(self) -> ConfigurationError:
        return ConfigurationError(
            f"{type(self).__name__} keeps no custom domains: implement get_domain, get_domains, "
            "add_domain and remove_domain, and say keeps_domains = True (see the storage docs)"
        )
