"""`TenantAdmin`: reading, changing and removing tenants, and the change every other service makes.

Every change goes through the store's compare-and-set loop (`TenantStore.change()`),
then invalidates the registry cache of this process and, over the invalidation
channel, of every other worker, and is passed to the lifecycle hooks: `change()`,
`change_of()` and `announce()` here are that path, for this module and for the services
built on it (`registration.py`, `maintenance.py`, `moves.py`, `custom_domains.py`).
Applications reach them all through the `TenancyManager` methods of the same names.
"""

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, TenantNotFoundError
from .events import LifecycleEvent, LifecycleEvents
from .invalidation.base import InvalidationChannel
from .isolation.base import Isolation
from .lookup import TenantLookup
from .storage.base import TenantStore
from .tenant import Tenant, TenantStatus

if TYPE_CHECKING:  # optional extra: `cryptography`
    from .encryption import URLCipher

__all__ = ["TenantAdmin", "only"]

logger = logging.getLogger("fastapi_tenancy")


class TenantAdmin:
    """Tenant administration over one manager's parts; safe to share between tasks.

    Holds no state of its own: concurrent changes are serialised by the store's
    compare-and-set, so two workers' admins may change the same tenant at once.
    The manager builds one (`manager.admin`) and its tenant methods call it, or a
    service over it, so that every change invalidates the cache its requests read through.
    """

    def __init__(
        self,
        *,
        store: TenantStore,
        isolation: Isolation,
        lookup: TenantLookup,
        events: LifecycleEvents,
        invalidation: InvalidationChannel | None = None,
        cipher: "URLCipher | None" = None,
    ) -> None:
        self.store = store
        self.isolation = isolation
        self.lookup = lookup
        self.events = events
        self.invalidation = invalidation
        self.cipher = cipher

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
                await self.change(tenant.identifier, rotate)
                rotated += 1
        logger.info("re-encrypted the database_url of %d tenants", rotated)
        return rotated

    # -- reads -----------------------------------------------------------------------

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

    # -- changes -----------------------------------------------------------------------

    async def update_tenant(
        self,
        tenant: Tenant | str | None = None,
        *,
        tenant_id: str | None = None,
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

        Like the other changes, it takes a `Tenant`, an identifier, or an id as
        `tenant_id=` (never guessed from the string: a UUID is a valid identifier too).
        """
        if metadata is not None and metadata_patch is not None:
            raise ConfigurationError("update_tenant takes metadata= or metadata_patch=, not both")
        if metadata_patch is None:
            return await self.change_of(
                "update_tenant", tenant, tenant_id, lambda t: t.with_changes(name=name, metadata=metadata)
            )
        patch = dict(metadata_patch)
        return await self.change_of(
            "update_tenant", tenant, tenant_id, lambda t: t.with_metadata_patch(patch, name=name)
        )

    async def suspend_tenant(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Stop serving a tenant (403) and keep its data. Reversible with `activate_tenant`.

        The tenant is a `Tenant`, an identifier, or an id given as `tenant_id=`.
        """
        return await self.change_of(
            "suspend_tenant", tenant, tenant_id, lambda t: t.with_status(TenantStatus.SUSPENDED)
        )

    async def activate_tenant(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Serve a suspended tenant again."""
        return await self.change_of(
            "activate_tenant", tenant, tenant_id, lambda t: t.with_status(TenantStatus.ACTIVE)
        )

    async def delete_tenant(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None, destroy_data: bool = False
    ) -> None:
        """Delete a tenant: soft by default, or for good with `destroy_data=True`.

        Soft: the tenant is marked `deleted` (403 from then on), its data kept and
        its slug reserved, so nobody else can register it and see that data.
        `destroy_data=True` drops the tenant's schema (or file) with every row in
        it and removes it from the registry, then frees the slug. Irreversible,
        and logged as such at WARNING.
        """
        current = await self.change_of(
            "delete_tenant",
            tenant,
            tenant_id,
            lambda t: t if t.status is TenantStatus.DELETED else t.with_status(TenantStatus.DELETED),
        )
        if not destroy_data:
            logger.info("soft-deleted tenant %s (data kept)", current.identifier)
            return
        await self.isolation.destroy(current)
        # The store removes the tenant's domains with it; every worker must forget them too.
        domains = await self.store.get_domains(current.id) if self.store.keeps_domains else ()
        await self.store.delete(current.id)
        await self.announce(current.identifier)
        for domain in domains:
            await self.announce(domain.name)
        await self.events.emit(LifecycleEvent.PURGED, current)
        logger.warning("destroyed tenant %s and all of its data", current.identifier)

    async def change_of(
        self,
        method: str,
        tenant: Tenant | str | None,
        tenant_id: str | None,
        change: Callable[[Tenant], Tenant],
    ) -> Tenant:
        """`change()` on a tenant named as the public methods take it: object, identifier or `tenant_id`.

        `method` names the public method in the errors. A `Tenant` (or an id) names one
        incarnation: the change does not reach a tenant registered under its slug since.
        """
        if (tenant is None) == (tenant_id is None):
            raise TypeError(
                f"{method}() takes a tenant or an identifier, or tenant_id=, and only one of them"
            )
        if isinstance(tenant, Tenant):
            # A record read earlier names one incarnation: if its slug was purged and
            # registered again since, the change must not reach the new holder.
            return await self.change(tenant.identifier, only(tenant.id, change))
        if tenant_id is None:
            assert tenant is not None  # checked above
            try:
                return await self.change(tenant, change)
            except TenantNotFoundError as exc:
                raise await self._not_an_identifier(method, tenant) from exc
        # The slug found by id could have been purged and registered again since.
        target = await self.get_tenant_by_id(tenant_id)
        return await self.change(target.identifier, only(tenant_id, change))

    async def _not_an_identifier(self, method: str, tenant: Tenant | str) -> TenantNotFoundError:
        # Only on this failure path: 0.5.0 took ids where we take identifiers; say so.
        owner = await self.store.get_by_id(tenant) if isinstance(tenant, str) else None
        if owner is None:
            return TenantNotFoundError(f"no tenant {_slug(tenant)!r:.80}")
        return TenantNotFoundError(
            f"{tenant!r:.80} is the id of tenant {owner.identifier!r}, not an identifier: "
            f"call {method}({owner.identifier!r}) or {method}(tenant_id=...)"
        )

    async def adopt_storage(self, tenant: Tenant | str) -> bool:
        """Mark the storage found under a registered tenant's name as that tenant's.

        Every tenant transaction checks that its schema, database or file holds its own
        tenant's marker (a slug deleted and registered again names storage made for
        someone else: see docs/isolation.md, "Incarnations"); what `register_tenant`
        provisions always does. Storage made otherwise (databases created from a
        template by a script, a schema restored from a dump of another installation,
        storage of a development build without markers) is refused until adopted.
        Refuses (`ProvisioningError`) storage that is missing or marked for another
        tenant. True when it marked the storage; False for storage already marked as
        the tenant's, and for shared tables (row-level security), which need no
        marker. Adopt only storage you know to be this tenant's.
        """
        current = await self.current(tenant)
        marked = await self.isolation.adopt(current)
        if marked:
            logger.warning("tenant %s adopted the storage found under its name", current.identifier)
        return marked

    # -- the change path, for this module and the services built on it ----------------------

    async def current(self, tenant: Tenant | str) -> Tenant:
        """The tenant as stored now; `TenantNotFoundError` for a `Tenant` whose incarnation was purged."""
        current = await self.get_tenant(_slug(tenant))
        if isinstance(tenant, Tenant) and current.id != tenant.id:
            raise TenantNotFoundError(f"tenant {tenant.identifier!r} no longer exists")
        return current

    async def change(self, identifier: str, change: Callable[[Tenant], Tenant]) -> Tenant:
        """Apply `change` with the store's compare-and-set loop, announce it, pass it to the hooks.

        Every worker's registry cache forgets the tenant whatever the outcome.
        """
        try:
            before, after = await self.store.change(identifier, change)
        finally:
            await self.announce(identifier)
        if after is not before:
            await self.events.changed(before, after)
        return after

    async def announce(self, identifier: str) -> None:
        """Forget `identifier` (a slug or a domain) in this process's registry cache and every worker's."""
        self.lookup.invalidate(identifier)
        if self.invalidation is not None:
            await self.invalidation.publish(identifier)


def only(tenant_id: str, change: Callable[[Tenant], Tenant]) -> Callable[[Tenant], Tenant]:
    """`change`, applied only while the slug still belongs to `tenant_id`."""

    def guarded(stored: Tenant) -> Tenant:
        if stored.id != tenant_id:
            raise TenantNotFoundError(f"no tenant with id {tenant_id!r:.80}")
        return change(stored)

    return guarded


def _slug(tenant: Tenant | str) -> str:
    return tenant.identifier if isinstance(tenant, Tenant) else tenant
