"""`TenancyManager`: the tenant lifecycle and the request path, over parts built from the config."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.requests import HTTPConnection

from ._utils import unavailable_as_503
from .audit import AuditWriter
from .builder import build_parts
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
from .events import LifecycleEvent, LifecycleEvents
from .invalidation.base import InvalidationChannel
from .isolation.base import Isolation
from .lookup import TenantLookup
from .ratelimit.base import RateLimiter
from .resolution.base import Resolver, ResolverFunc
from .storage.base import TenantStore
from .tenant import Tenant, TenantStatus
from .urls import normalise_database_url

if TYPE_CHECKING:  # needs `cryptography`, an optional extra
    from .encryption import URLCipher

__all__ = ["TenancyManager"]

logger = logging.getLogger("fastapi_tenancy")


class TenancyManager:
    """The composition root: one per application, shared by all its requests.

    Builds the resolver, the isolation strategy, the lookup cache and the
    database engine from `config`, and owns their lifecycles. It is also the
    only way to change tenants, so that every change invalidates the cache.

        manager = TenancyManager(config, SQLAlchemyTenantStore(config.database_url))
        await manager.initialize()
        tenant = await manager.register_tenant("acme-corp", "Acme", app_metadata=Base.metadata)

    `store` defaults to a `SQLAlchemyTenantStore` sharing the manager's engine.
    With `redis_url` set, every change is announced to all workers over Redis
    (else, with the registry in PostgreSQL, over LISTEN/NOTIFY), and with
    `rate_limit_enabled` the middleware asks `rate_limiter` before each request.
    Pass `resolver=` (a `Resolver` or an async function of the request) with
    `resolution_strategy="custom"`, and `isolation=` to supply your own strategy.
    Every lifecycle change is written to the audit log (`audit=`, default a
    `tenancy_audit_log` table in the registry database) and passed to the hooks
    registered on `manager.events`.
    """

    def __init__(
        self,
        config: TenancyConfig | None = None,
        store: TenantStore | None = None,
        *,
        resolver: Resolver | ResolverFunc | None = None,
        isolation: Isolation | None = None,
        audit: AuditWriter | None = None,
    ) -> None:
        self.config = config if config is not None else TenancyConfig()
        parts = build_parts(self.config, store=store, resolver=resolver, isolation=isolation, audit=audit)
        self.engine: AsyncEngine = parts.engine
        # The role that owns the shared tables (rls, hybrid): DDL and the registry run as
        # it, requests as the role of database_url.
        self.owner_engine: AsyncEngine | None = parts.owner_engine
        self.store: TenantStore = parts.store
        self.resolver: Resolver = parts.resolver
        self.cipher: URLCipher | None = parts.cipher
        self.isolation: Isolation = parts.isolation
        self.lookup: TenantLookup = parts.lookup
        self.events: LifecycleEvents = parts.events
        # Redis, when configured, is shared by the invalidation channel and the limiter.
        self.redis: Any = parts.redis
        self.invalidation: InvalidationChannel | None = parts.invalidation
        self.rate_limiter: RateLimiter | None = parts.rate_limiter
        self._lifecycle_lock = asyncio.Lock()
        self._initialized = False

    # -- lifecycle -----------------------------------------------------------------

    async def initialize(self) -> None:
        """Create the registry table and open the pool. Idempotent; call at startup."""
        async with self._lifecycle_lock:
            if self._initialized:
                return
            await self.store.initialize()
            await self.isolation.initialize()
            await self.events.initialize()
            async with unavailable_as_503("database"), self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))  # warm the pool: fail now, not on the first request
            if self.rate_limiter is not None:
                await self.rate_limiter.initialize()
            if self.invalidation is not None:
                # Not fatal when down: the channel retries, dropping the cache meanwhile.
                await self.invalidation.start(self.lookup.invalidate, self.lookup.clear)
            self._initialized = True

    async def close(self) -> None:
        """Close every pool and forget cached tenants. Idempotent; call at shutdown."""
        async with self._lifecycle_lock:
            if self.invalidation is not None:
                await self.invalidation.close()
            if self.rate_limiter is not None:
                await self.rate_limiter.close()
            if self.redis is not None:
                await self.redis.aclose()
            await self.isolation.close()
            await self.events.close()
            await self.store.close()
            await self.engine.dispose()
            if self.owner_engine is not None:
                await self.owner_engine.dispose()
            self.lookup.clear()
            self._initialized = False

    # -- the request path ----------------------------------------------------------

    async def resolve(self, connection: HTTPConnection) -> Tenant:
        """The active tenant a request names; raises the 400/404/403 errors otherwise.

        With `anti_enumeration`, a tenant that is not active is refused exactly like an
        unknown one (404): the same lookup ran either way, only the answer is chosen here.
        """
        identifier = await self.resolver.resolve(connection)
        if not identifier:
            raise TenantResolutionError()
        tenant = await self.lookup.get(identifier)
        if tenant is None:
            raise TenantNotFoundError()
        if tenant.status is not TenantStatus.ACTIVE:
            if self.config.anti_enumeration:
                raise TenantNotFoundError(f"tenant {identifier!r} is {tenant.status.value}")
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
        database_url: str | None = None,
        tier: str | None = None,
    ) -> Tenant:
        """Register a tenant, create its storage and the `app_metadata` tables in it.

        `database_url` (database isolation) puts the tenant's database on another
        server: it is encrypted with `encryption_keys` before it is stored, and only
        the ciphertext is kept on the returned `Tenant`. With hybrid isolation the
        tenant goes to `tier`, or to the tier of its metadata's `plan`
        (`hybrid_plan_tiers`), or to `hybrid_default_tier`; the choice is stored with it.

        The tenant is `provisioning` until its storage is ready, then `active`. If
        provisioning fails, the registration is undone and `ProvisioningError`
        raised: no half-made tenant is left. Raises `InvalidIdentifierError` for a
        slug that cannot be stored and `TenantAlreadyExistsError` for a taken one
        (a soft-deleted tenant keeps its slug until purged).
        """
        self.isolation.storage_name(identifier)  # validates before anything is written
        tier = self.isolation.choose_tier(tier, metadata or {})
        new = Tenant(
            identifier=identifier,
            name=name,
            metadata=metadata or {},
            status=TenantStatus.PROVISIONING,
            encrypted_database_url=None if database_url is None else self._encrypt(database_url),
            tier=tier,
        )
        self.isolation.check(new)
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
        await self._changed(identifier)
        await self.events.emit(LifecycleEvent.REGISTERED, tenant)
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

    def _encrypt(self, database_url: str) -> str:
        if self.cipher is None:
            raise ConfigurationError(
                "a tenant's database_url is encrypted at rest: set encryption_keys "
                "(TENANCY_ENCRYPTION_KEYS) to register one"
            )
        try:
            normalised = normalise_database_url(database_url)
        except ValueError as exc:  # the message names the problem, never the URL
            raise ConfigurationError(f"database_url: {exc}") from None
        return self.cipher.encrypt(normalised)

    async def rotate_encryption_keys(self) -> int:
        """Re-encrypt every tenant's `database_url` under the first of `encryption_keys`.

        Run it after putting a new key first; once it returns, the old keys can be
        removed. Returns how many tenants were re-encrypted (those already under
        the first key are left alone, so running it again is cheap).
        """
        cipher = self.cipher
        if cipher is None:
            raise ConfigurationError("rotate_encryption_keys() needs encryption_keys")

        def rotate(tenant: Tenant) -> Tenant:
            token = tenant.encrypted_database_url
            if token is None or cipher.is_current(token):
                return tenant
            return tenant.with_encrypted_database_url(cipher.rotate(token))

        rotated = 0
        async for tenant in self.store.iterate():
            token = tenant.encrypted_database_url
            if token is not None and not cipher.is_current(token):
                await self._change(tenant.identifier, rotate)
                rotated += 1
        logger.info("re-encrypted the database_url of %d tenants", rotated)
        return rotated

    async def _undo_registration(self, tenant: Tenant) -> None:
        try:
            await self.store.delete(tenant.id)
            await self.events.emit(LifecycleEvent.PURGED, tenant, reason="provisioning failed")
        except Exception:  # the original error matters more; say what is left behind
            logger.exception("could not remove the registry row of failed tenant %s", tenant.identifier)
        finally:
            await self._changed(tenant.identifier)

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
        self,
        tenant: Tenant | str,
        *,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        metadata_patch: Mapping[str, Any] | None = None,
    ) -> Tenant:
        """Change a tenant's name and/or metadata.

        `metadata` replaces the metadata whole. Building it from a tenant read
        earlier (`metadata={**tenant.metadata, "seats": 25}`) is unsafe under
        concurrency: two such updates each start from the old value, and the
        second silently drops the key the first one added.

        `metadata_patch` merges instead, one level deep, into the metadata as
        stored at the moment of writing (re-read and re-applied on every
        compare-and-set retry), so concurrent patches of different keys all
        survive. A key patched to `None` is removed, as in a JSON merge patch
        (RFC 7396) at the top level; nested values are replaced, not merged.
        Giving both `metadata` and `metadata_patch` raises `ConfigurationError`.
        """
        if metadata is not None and metadata_patch is not None:
            raise ConfigurationError("update_tenant takes metadata= or metadata_patch=, not both")
        if metadata_patch is None:
            return await self._change(_slug(tenant), lambda t: t.with_changes(name=name, metadata=metadata))
        patch = dict(metadata_patch)
        return await self._change(_slug(tenant), lambda t: t.with_metadata_patch(patch, name=name))

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
        await self._changed(current.identifier)
        await self.events.emit(LifecycleEvent.PURGED, current)
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
        current = await self.get_tenant(_slug(tenant))
        await self.isolation.remove_old_copy(current)
        logger.warning("removed the old copy of tenant %s", current.identifier)

    async def adopt_storage(self, tenant: Tenant | str) -> None:
        """Mark the storage found under a registered tenant's name as that tenant's.

        Every tenant transaction checks that its schema, database or file holds its own
        tenant's marker (a slug deleted and registered again names storage made for
        someone else: see docs/isolation.md, "Incarnations"); what `register_tenant`
        provisions always does. Storage made otherwise (databases created from a
        template by a script, a schema restored from a dump of another installation,
        storage of a development build without markers) is refused until adopted.
        Refuses (`ProvisioningError`) storage that is missing or marked for another
        tenant; a no-op for storage already marked as the tenant's, and for shared
        tables (row-level security). Adopt only storage you know to be this tenant's.
        """
        current = await self.get_tenant(_slug(tenant))
        await self.isolation.adopt(current)
        logger.warning("tenant %s adopted the storage found under its name", current.identifier)

    async def _change(self, identifier: str, change: Callable[[Tenant], Tenant]) -> Tenant:
        # The store's compare-and-set loop; caches are invalidated whatever the outcome.
        try:
            before, after = await self.store.change(identifier, change)
        finally:
            await self._changed(identifier)
        if after is not before:
            await self.events.changed(before, after)
        return after

    async def _changed(self, identifier: str) -> None:
        # This process's cache at once; every other worker's through the channel.
        self.lookup.invalidate(identifier)
        if self.invalidation is not None:
            await self.invalidation.publish(identifier)


def _slug(tenant: Tenant | str) -> str:
    return tenant.identifier if isinstance(tenant, Tenant) else tenant
