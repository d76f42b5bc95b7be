"""`TenancyManager`: builds the parts from the config and runs the tenant lifecycle."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.requests import HTTPConnection

from ._utils import create_engine, unavailable_as_503
from .config import TenancyConfig
from .context import current_tenant
from .errors import (
    ConfigurationError,
    ProvisioningError,
    TenancyError,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantInactiveError,
    TenantNotFoundError,
    TenantResolutionError,
)
from .isolation.base import Isolation
from .isolation.hybrid import HybridIsolation
from .isolation.rls import RLSIsolation
from .isolation.schema import SchemaIsolation
from .isolation.sqlite import SQLiteFileIsolation
from .lookup import TenantLookup
from .resolution.base import Resolver, ResolverFunc, as_resolver
from .resolution.header import HeaderResolver
from .storage.base import TenantStore
from .storage.database import SQLAlchemyTenantStore
from .tenant import Tenant, TenantStatus

__all__ = ["TenancyManager"]

logger = logging.getLogger("fastapi_tenancy")

_CHANGE_ATTEMPTS = 10


class TenancyManager:
    """The composition root: one per application, shared by all its requests.

    Builds the resolver, the isolation strategy, the lookup cache and the
    database engine from `config`, and owns their lifecycles. It is also the
    only way to change tenants, so that every change invalidates the cache.

        manager = TenancyManager(config, SQLAlchemyTenantStore(config.database_url))
        await manager.initialize()
        tenant = await manager.register_tenant("acme-corp", "Acme", app_metadata=Base.metadata)

    `store` defaults to a `SQLAlchemyTenantStore` sharing the manager's engine.
    Pass `resolver=` (a `Resolver` or an async function of the request) with
    `resolution_strategy="custom"`, and `isolation=` to supply your own strategy.
    """

    def __init__(
        self,
        config: TenancyConfig | None = None,
        store: TenantStore | None = None,
        *,
        resolver: Resolver | ResolverFunc | None = None,
        isolation: Isolation | None = None,
    ) -> None:
        self.config = config if config is not None else TenancyConfig()
        # PostgreSQL connections start with an empty search_path (fail closed), except
        # behind PgBouncer, which does not pass startup parameters on.
        self._empty_search_path = self.config.backend == "postgresql" and not self.config.database_pgbouncer
        self.engine: AsyncEngine = create_engine(
            self.config.database_url,
            pool_size=self.config.database_pool_size,
            max_overflow=self.config.database_max_overflow,
            pool_timeout=self.config.database_pool_timeout,
            pool_recycle=self.config.database_pool_recycle,
            pool_pre_ping=self.config.database_pool_pre_ping,
            echo=self.config.database_echo,
            pgbouncer=self.config.database_pgbouncer,
            empty_search_path=self._empty_search_path,
        )
        # The role that owns the shared tables (rls, hybrid): DDL and the registry run as
        # it, requests as the role of database_url, which therefore cannot read the
        # registry (every tenant's name and metadata) even with raw SQL.
        self.owner_engine: AsyncEngine | None = None
        if self.config.database_owner_url is not None:
            self.owner_engine = create_engine(
                self.config.database_owner_url,
                pool_size=2,
                max_overflow=2,
                pool_timeout=self.config.database_pool_timeout,
                pool_recycle=self.config.database_pool_recycle,
                pool_pre_ping=self.config.database_pool_pre_ping,
                echo=self.config.database_echo,
                pgbouncer=self.config.database_pgbouncer,
            )
        # The engine's connections resolve no unqualified name, so a registry sharing
        # it names its schema.
        default_store_schema = "public" if self._empty_search_path or self.owner_engine else None
        self.store = (
            store
            if store is not None
            else SQLAlchemyTenantStore(self.owner_engine or self.engine, schema=default_store_schema)
        )
        self.resolver = self._build_resolver(resolver)
        self.isolation = isolation if isolation is not None else self._build_isolation()
        self.lookup = TenantLookup(
            self.store,
            ttl=self.config.cache_ttl,
            max_size=self.config.cache_max_size,
            negative_ttl=self.config.negative_cache_ttl,
            negative_max_size=self.config.negative_cache_max_size,
        )
        self._lifecycle_lock = asyncio.Lock()
        self._initialized = False

    def _build_resolver(self, resolver: Resolver | ResolverFunc | None) -> Resolver:
        strategy = self.config.resolution_strategy
        if strategy == "custom":
            if resolver is None:
                raise ConfigurationError("resolution_strategy='custom' needs TenancyManager(resolver=...)")
            return as_resolver(resolver)
        if resolver is not None:
            raise ConfigurationError(
                f"a resolver was passed but resolution_strategy is {strategy!r}; "
                "set resolution_strategy='custom' to use it"
            )
        return HeaderResolver(self.config.tenant_header_name)

    def _build_isolation(self) -> Isolation:
        config = self.config
        if config.backend == "sqlite":
            return SQLiteFileIsolation(
                config.database_url,
                prefix=config.schema_prefix,
                max_engines=config.max_cached_engines,
                echo=config.database_echo,
            )
        if config.isolation_strategy == "schema":
            return SchemaIsolation(
                self.engine,
                prefix=config.schema_prefix,
                max_cached_binds=config.cache_max_size,
                empty_search_path=self._empty_search_path,
            )
        assert self.owner_engine is not None  # the config requires it for rls and hybrid
        rls = RLSIsolation(
            self.engine,
            self.owner_engine,
            column=config.rls_tenant_column,
            namespace=config.rls_setting_namespace,
            prefix=config.schema_prefix,
            max_cached_binds=config.cache_max_size,
        )
        if config.isolation_strategy == "rls":
            return rls
        schema = SchemaIsolation(
            self.engine,
            prefix=config.schema_prefix,
            max_cached_binds=config.cache_max_size,
            empty_search_path=self._empty_search_path,
            ddl_engine=self.owner_engine,
        )
        return HybridIsolation(
            {"schema": schema, "rls": rls},
            default_tier=config.hybrid_default_tier,
            plan_tiers=config.hybrid_plan_tiers,
            column=config.rls_tenant_column,
        )

    # -- lifecycle -----------------------------------------------------------------

    async def initialize(self) -> None:
        """Create the registry table and open the pool. Idempotent; call at startup."""
        async with self._lifecycle_lock:
            if self._initialized:
                return
            await self.store.initialize()
            await self.isolation.initialize()
            async with unavailable_as_503("database"), self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))  # warm the pool: fail now, not on the first request
            self._initialized = True

    async def close(self) -> None:
        """Close every pool and forget cached tenants. Idempotent; call at shutdown."""
        async with self._lifecycle_lock:
            await self.isolation.close()
            await self.store.close()
            await self.engine.dispose()
            if self.owner_engine is not None:
                await self.owner_engine.dispose()
            self.lookup.clear()
            self._initialized = False

    # -- the request path ----------------------------------------------------------

    async def resolve(self, connection: HTTPConnection) -> Tenant:
        """The active tenant a request names; raises the 400/404/403 errors otherwise."""
        identifier = await self.resolver.resolve(connection)
        if not identifier:
            raise TenantResolutionError()
        tenant = await self.lookup.get(identifier)
        if tenant is None:
            raise TenantNotFoundError()
        if tenant.status is not TenantStatus.ACTIVE:
            raise TenantInactiveError(tenant.status.value)
        return tenant

    @asynccontextmanager
    async def session(self, tenant: Tenant | None = None) -> AsyncIterator[AsyncSession]:
        """An `AsyncSession` that reaches only `tenant`'s data (default: the current tenant).

        Not begun: use it directly (it begins on first use) or with
        `async with session.begin()`. Uncommitted work is rolled back on exit.
        The tenant's status is checked against the registry (through the lookup
        cache), not the `Tenant` object passed in: a job holding a record from
        before a suspension is refused, and so is one whose tenant was purged and
        its slug registered again by someone else.
        """
        if tenant is None:
            tenant = current_tenant()
        current = await self.lookup.get(tenant.identifier)
        if current is None or current.id != tenant.id:
            raise TenantNotFoundError(f"tenant {tenant.identifier!r} no longer exists")
        if current.status is not TenantStatus.ACTIVE:
            raise TenantInactiveError(current.status.value)
        session = await self.isolation.session(current)
        async with session:
            yield session

    # -- lifecycle of tenants ------------------------------------------------------

    async def register_tenant(
        self,
        identifier: str,
        name: str,
        *,
        app_metadata: sa.MetaData | None = None,
        metadata: Mapping[str, Any] | None = None,
        tier: str | None = None,
    ) -> Tenant:
        """Register a tenant, create its storage and the `app_metadata` tables in it.

        With hybrid isolation the tenant goes to `tier`, or to the tier of its
        metadata's `plan` (`hybrid_plan_tiers`), or to `hybrid_default_tier`; the
        choice is stored with it.

        The tenant is `provisioning` until its storage is ready, then `active`. If
        provisioning fails, the registration is undone and `ProvisioningError`
        raised: no half-made tenant is left. Raises `InvalidIdentifierError` for a
        slug that cannot be stored and `TenantAlreadyExistsError` for a taken one
        (a soft-deleted tenant keeps its slug until purged).
        """
        self.isolation.storage_name(identifier)  # validates before anything is written
        if isinstance(self.isolation, HybridIsolation):
            tier = self.isolation.choose_tier(tier, metadata or {})
        elif tier is not None:
            raise ConfigurationError(f"tier={tier!r} needs isolation_strategy='hybrid'")
        new = Tenant(
            identifier=identifier,
            name=name,
            metadata=metadata or {},
            status=TenantStatus.PROVISIONING,
            tier=tier,
        )
        try:
            tenant = await self.store.create(new)
        except TenantAlreadyExistsError as exc:
            holder = await self.store.get_by_identifier(identifier)
            if holder is not None and holder.status is TenantStatus.DELETED:
                raise TenantAlreadyExistsError(
                    f"{identifier!r} belongs to a deleted tenant whose data is kept; purge it first "
                    "with delete_tenant(..., destroy_data=True)"
                ) from exc
            raise
        self.lookup.invalidate(identifier)
        try:
            await self.isolation.provision(tenant, app_metadata)
        except BaseException as exc:
            await self._undo_registration(tenant)
            if isinstance(exc, TenancyError | asyncio.CancelledError) or not isinstance(exc, Exception):
                raise
            raise ProvisioningError(f"could not provision tenant {identifier!r}: {exc}") from exc
        # A delete that landed during provisioning wins: deleted -> active is refused.
        active = await self._change(identifier, lambda t: t.with_status(TenantStatus.ACTIVE))
        logger.info("registered tenant %s", identifier)
        return active

    async def _undo_registration(self, tenant: Tenant) -> None:
        try:
            await self.store.delete(tenant.id)
        except Exception:  # the original error matters more; say what is left behind
            logger.exception("could not remove the registry row of failed tenant %s", tenant.identifier)
        finally:
            self.lookup.invalidate(tenant.identifier)

    async def get_tenant(self, identifier: str) -> Tenant:
        """The tenant with this identifier, read from the registry (not the cache)."""
        tenant = await self.store.get_by_identifier(identifier)
        if tenant is None:
            raise TenantNotFoundError(f"no tenant {identifier!r:.80}")
        return tenant

    async def get_tenant_by_id(self, tenant_id: str) -> Tenant:
        """The tenant with this id, read from the registry."""
        tenant = await self.store.get_by_id(tenant_id)
        if tenant is None:
            raise TenantNotFoundError(f"no tenant with id {tenant_id!r:.80}")
        return tenant

    async def list_tenants(
        self, *, status: TenantStatus | None = None, after: str | None = None, limit: int = 100
    ) -> list[Tenant]:
        """Tenants ordered by identifier; page with `after=<last identifier seen>`."""
        return await self.store.list(status=status, after=after, limit=limit)

    async def update_tenant(
        self, tenant: Tenant | str, *, name: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> Tenant:
        """Change a tenant's name and/or metadata (replaced whole)."""
        return await self._change(_slug(tenant), lambda t: t.with_changes(name=name, metadata=metadata))

    async def suspend_tenant(self, tenant: Tenant | str) -> Tenant:
        """Stop serving a tenant (403) and keep its data. Reversible with `activate_tenant`."""
        return await self._change(_slug(tenant), lambda t: t.with_status(TenantStatus.SUSPENDED))

    async def activate_tenant(self, tenant: Tenant | str) -> Tenant:
        """Serve a suspended tenant again."""
        return await self._change(_slug(tenant), lambda t: t.with_status(TenantStatus.ACTIVE))

    async def delete_tenant(self, tenant: Tenant | str, *, destroy_data: bool = False) -> None:
        """Delete a tenant: soft by default, or for good with `destroy_data=True`.

        Soft: the tenant is marked `deleted` (403 from then on), its data kept and
        its slug reserved, so nobody else can register it and see that data.
        `destroy_data=True` drops the tenant's schema (or file) with every row in
        it and removes it from the registry, then frees the slug. Irreversible,
        and logged as such at WARNING.
        """
        current = await self._change(
            _slug(tenant),
            lambda t: t if t.status is TenantStatus.DELETED else t.with_status(TenantStatus.DELETED),
        )
        if not destroy_data:
            logger.info("soft-deleted tenant %s (data kept)", current.identifier)
            return
        await self.isolation.destroy(current)
        await self.store.delete(current.id)
        self.lookup.invalidate(current.identifier)
        logger.warning("destroyed tenant %s and all of its data", current.identifier)

    async def move_tenant(self, tenant: Tenant | str, tier: str, *, app_metadata: sa.MetaData) -> Tenant:
        """Move a live tenant to another tier (hybrid isolation): copy, then switch atomically.

        Copies the rows of `app_metadata`'s tables into the new tier while holding
        the tenant's writes (see `HybridIsolation.move`), then switches the stored
        tier with a compare-and-set; this process routes the tenant to the new tier
        at once, others when their cache expires (`cache_ttl`), answering 503 or
        failing in between, never serving the old copy. The old copy is kept until
        `remove_old_copy`. Raises `TenantChangedError` if the tenant was moved or
        deleted meanwhile.
        """
        isolation = self.isolation
        if not isinstance(isolation, HybridIsolation):
            raise ConfigurationError("move_tenant needs isolation_strategy='hybrid'")
        current = await self.get_tenant(_slug(tenant))
        if current.status is not TenantStatus.ACTIVE:
            raise TenantInactiveError(current.status.value)

        def switch(stored: Tenant) -> Tenant:
            if stored.id != current.id or stored.tier != current.tier:
                raise TenantChangedError(f"tenant {stored.identifier!r} changed during the move")
            return stored.with_tier(tier)

        with isolation.moving(current):
            await isolation.move(current, tier, app_metadata)
            moved = await self._change(current.identifier, switch)
        logger.info("moved tenant %s from tier %s to %s", current.identifier, current.tier, tier)
        return moved

    async def remove_old_copy(self, tenant: Tenant | str) -> None:
        """Delete the copy a `move_tenant` left in the tenant's previous tier. Irreversible."""
        isolation = self.isolation
        if not isinstance(isolation, HybridIsolation):
            raise ConfigurationError("remove_old_copy needs isolation_strategy='hybrid'")
        current = await self.get_tenant(_slug(tenant))
        await isolation.remove_old_copy(current)
        logger.warning("removed the old copy of tenant %s", current.identifier)

    async def _change(self, identifier: str, change: Callable[[Tenant], Tenant]) -> Tenant:
        # Read, apply, compare-and-set; on a concurrent change re-read and re-apply,
        # so the lifecycle rules are checked against what is really stored and a
        # stale read can never undo a suspension or a delete.
        for _ in range(_CHANGE_ATTEMPTS):
            current = await self.get_tenant(identifier)
            changed = change(current)
            if changed is current:
                return current
            try:
                saved = await self.store.update(changed, expected=current)
            except TenantChangedError:
                continue
            finally:
                self.lookup.invalidate(identifier)
            return saved
        raise TenantChangedError(
            f"tenant {identifier!r} kept changing; gave up after {_CHANGE_ATTEMPTS} tries"
        )


def _slug(tenant: Tenant | str) -> str:
    return tenant.identifier if isinstance(tenant, Tenant) else tenant
