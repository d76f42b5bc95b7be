"""`TenantAdmin`: registering, reading, changing and removing tenants.

Every change goes through the store's compare-and-set loop (`TenantStore.change()`),
then invalidates the registry cache of this process and, over the invalidation
channel, of every other worker, and is passed to the lifecycle hooks. Applications
reach it through the `TenancyManager` methods of the same names.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .errors import (
    ConfigurationError,
    ProvisioningError,
    TenancyError,
    TenantAlreadyExistsError,
    TenantChangedError,
    TenantInactiveError,
    TenantNotFoundError,
)
from .events import LifecycleEvent, LifecycleEvents
from .invalidation.base import InvalidationChannel
from .isolation.base import Isolation
from .lookup import TenantLookup
from .provisioning import ProvisioningJob, ProvisioningPipeline
from .storage.base import TenantStore
from .tenant import Tenant, TenantStatus
from .urls import normalise_database_url

if TYPE_CHECKING:  # optional extras: `cryptography`; Alembic (the migrations extra)
    from .encryption import URLCipher
    from .migrations.stamp import Stamper

__all__ = ["TenantAdmin"]

logger = logging.getLogger("fastapi_tenancy")


class TenantAdmin:
    """Tenant administration over one manager's parts; safe to share between tasks.

    Holds no state of its own: concurrent changes are serialised by the store's
    compare-and-set, so two workers' admins may change the same tenant at once.
    The manager builds one (`manager.admin`) and its tenant methods call it, so
    that every change invalidates the cache its requests read through.
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
        stamper: "Stamper | None" = None,
        provisioning: ProvisioningPipeline | None = None,
    ) -> None:
        self.store = store
        self.isolation = isolation
        self.lookup = lookup
        self.events = events
        self.invalidation = invalidation
        self.cipher = cipher
        # Set when migrations are configured (alembic_config): new tenants start at head.
        self.stamper = stamper
        # The application's steps after the storage exists, and the background registrations.
        self.provisioning = provisioning if provisioning is not None else ProvisioningPipeline()

    # -- registration --------------------------------------------------------------

    async def register_tenant(
        self,
        identifier: str,
        name: str,
        *,
        app_metadata: sa.MetaData | None = None,
        metadata: Mapping[str, Any] | None = None,
        database_url: str | None = None,
        tier: str | None = None,
        background: bool = False,
    ) -> Tenant:
        """Register a tenant, create its storage and the `app_metadata` tables in it.

        `database_url` (database isolation) puts the tenant's database on another
        server: it is encrypted with `encryption_keys` before it is stored, and only
        the ciphertext is kept on the returned `Tenant`. With hybrid isolation the
        tenant goes to `tier`, or to the tier of its metadata's `plan`
        (`hybrid_plan_tiers`), or to `hybrid_default_tier`; the choice is stored with it.

        The tenant is `provisioning` until its storage is ready and the steps of
        `provisioning` (the `ProvisioningPipeline`: seed data, a first user, ...) have
        run, then `active`. If any of that fails, the registration is undone and
        `ProvisioningError` raised: no half-made tenant is left. Raises
        `InvalidIdentifierError` for a slug that cannot be stored and
        `TenantAlreadyExistsError` for a taken one (a soft-deleted tenant keeps its slug
        until purged).

        `background=True` returns as soon as the tenant is registered, still
        `provisioning`, and queues the rest in this process (`provisioning.job(identifier)`
        follows it); a failure then undoes the registration as well, and is logged.

        With `alembic_config` set, provisioning ends at the head revision: storage made
        from `app_metadata` is stamped at head, storage with no tables is migrated to
        head, and a revision the storage already has (a clone of the template) is kept
        (see `fastapi_tenancy.migrations.stamp`).
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
        if background:
            self.provisioning.start(identifier, lambda job: self._complete(tenant, app_metadata, job))
            return tenant
        return await self._complete(tenant, app_metadata)

    async def _complete(
        self, tenant: Tenant, app_metadata: sa.MetaData | None, job: ProvisioningJob | None = None
    ) -> Tenant:
        """The rest of a registration: storage, version stamp, steps, then `active`; undone on failure."""
        identifier = tenant.identifier
        try:
            await self._provision(tenant, app_metadata, job)
        except BaseException as exc:
            await self._undo_registration(tenant, exc, job)
            if isinstance(exc, TenancyError | asyncio.CancelledError) or not isinstance(exc, Exception):
                raise
            raise ProvisioningError(f"could not provision tenant {identifier!r}: {exc}") from exc
        # A delete that landed during provisioning wins: deleted -> active is refused.
        active = await self._change(identifier, lambda t: t.with_status(TenantStatus.ACTIVE))
        logger.info("registered tenant %s", identifier)
        return active

    async def _provision(
        self, tenant: Tenant, app_metadata: sa.MetaData | None, job: ProvisioningJob | None = None
    ) -> None:
        await self.isolation.provision(tenant, app_metadata)
        try:
            if self.stamper is not None:
                outcome = await self.stamper.after_provision(self.isolation, tenant)
                logger.info("tenant %s: version table %s", tenant.identifier, _OUTCOMES[outcome])
            if self.provisioning.steps:
                await self.provisioning.run(tenant, self.isolation, job=job)
        except BaseException:
            # The storage made above goes too, so that the slug can be registered again.
            await asyncio.shield(self._destroy_quietly(tenant))
            raise

    async def seed_tenant(self, tenant: Tenant | str, *, steps: Iterable[str] | None = None) -> list[str]:
        """Run the provisioning steps (all, or those named in `steps`) for an existing tenant.

        For a tenant registered before a step was added, or to seed one again (write
        steps so that a second run does no harm). Runs in the tenant's scope, as at
        registration, for a tenant that is active, in maintenance or suspended; a failing
        step raises `ProvisioningError` after the `undo` of the steps before it, and the
        tenant stays as it is. Returns the names of the steps that ran; audited as `seeded`.
        """
        chosen = self.provisioning.select(steps)
        if not chosen:
            raise ConfigurationError(
                "no provisioning steps to run: add them to manager.provisioning (with the CLI, name "
                "the application's manager with --app module:attribute)"
            )
        current = await self._current(tenant)
        if current.status not in (TenantStatus.ACTIVE, TenantStatus.MAINTENANCE, TenantStatus.SUSPENDED):
            raise TenantInactiveError(current.status.value)
        ran = await self.provisioning.run(current, self.isolation, steps=chosen)
        await self.events.emit(LifecycleEvent.SEEDED, current, steps=ran)
        logger.info("seeded tenant %s: %s", current.identifier, ", ".join(ran))
        return ran

    async def _destroy_quietly(self, tenant: Tenant) -> None:
        try:
            await self.isolation.destroy(tenant)
        except Exception:  # the original error matters more; say what is left behind
            logger.exception("could not remove the storage of failed tenant %s", tenant.identifier)

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

    async def _undo_registration(
        self, tenant: Tenant, error: BaseException, job: ProvisioningJob | None = None
    ) -> None:
        details = {"reason": "provisioning failed", "error": type(error).__name__}
        if job is not None and job.step is not None:
            details["step"] = job.step
        if job is not None:
            # Nobody awaits a background registration: its failure is told here.
            logger.error(
                "background registration of tenant %s failed and was undone: %s", tenant.identifier, error
            )
        try:
            await self.store.delete(tenant.id)
            await self.events.emit(LifecycleEvent.PURGED, tenant, **details)
        except Exception:  # the original error matters more; say what is left behind
            logger.exception("could not remove the registry row of failed tenant %s", tenant.identifier)
        finally:
            await self._changed(tenant.identifier)

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
            return await self._change_of(
                "update_tenant", tenant, tenant_id, lambda t: t.with_changes(name=name, metadata=metadata)
            )
        patch = dict(metadata_patch)
        return await self._change_of(
            "update_tenant", tenant, tenant_id, lambda t: t.with_metadata_patch(patch, name=name)
        )

    async def suspend_tenant(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Stop serving a tenant (403) and keep its data. Reversible with `activate_tenant`.

        The tenant is a `Tenant`, an identifier, or an id given as `tenant_id=`.
        """
        return await self._change_of(
            "suspend_tenant", tenant, tenant_id, lambda t: t.with_status(TenantStatus.SUSPENDED)
        )

    async def activate_tenant(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Serve a suspended tenant again."""
        return await self._change_of(
            "activate_tenant", tenant, tenant_id, lambda t: t.with_status(TenantStatus.ACTIVE)
        )

    # -- maintenance ---------------------------------------------------------------------

    async def start_maintenance(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Hold off an active tenant's requests (503, `Retry-After`) while operators work on it.

        The tenant's status becomes `maintenance`; every worker refuses its requests once
        the change reaches it (at once here, over the invalidation channel elsewhere).
        Its jobs wait too (ARQ and Celery retry them later). A tenant already in
        maintenance stays so; a suspended, deleted or provisioning one raises
        `InvalidTransitionError`. End it with `end_maintenance`.
        """
        return await self._change_of("start_maintenance", tenant, tenant_id, _into_maintenance)

    async def end_maintenance(
        self, tenant: Tenant | str | None = None, *, tenant_id: str | None = None
    ) -> Tenant:
        """Serve a tenant in maintenance again; a tenant in any other status is left as it is.

        A suspension or deletion made during the maintenance stands.
        """
        return await self._change_of("end_maintenance", tenant, tenant_id, _out_of_maintenance)

    @asynccontextmanager
    async def maintenance(self, tenant: Tenant | str) -> AsyncIterator[Tenant]:
        """Hold `tenant` in maintenance for the block (a fleet migration, a tier move).

        Only an active tenant is put into maintenance, and only that one is made active
        again afterwards, whatever the block raised. One already in maintenance (an
        operator's) stays in it after the block; a suspended or deleted one is left as
        it is (it is not served anyway). A suspension or deletion made during the block
        stands. Yields the tenant as the block starts.
        """
        entered = False

        def enter(stored: Tenant) -> Tenant:
            nonlocal entered  # re-run on every compare-and-set retry: the last run counts
            entered = stored.status is TenantStatus.ACTIVE
            return stored.with_status(TenantStatus.MAINTENANCE) if entered else stored

        current = await self._change_of("maintenance", tenant, None, enter)
        try:
            yield current
        finally:
            if entered:
                # Shielded: a cancelled run must not leave the tenant refusing its requests.
                await asyncio.shield(self._leave_maintenance(current))

    async def _leave_maintenance(self, tenant: Tenant) -> None:
        try:
            await self._change(tenant.identifier, _only(tenant.id, _out_of_maintenance))
        except TenantNotFoundError:
            pass  # purged meanwhile: nothing left to serve
        except Exception:  # the block's own outcome matters more; say what is left behind
            logger.exception(
                "tenant %s is still in maintenance: end it with `fastapi-tenancy tenants maintenance "
                "off %s` (or manager.end_maintenance)",
                tenant.identifier,
                tenant.identifier,
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
        current = await self._change_of(
            "delete_tenant",
            tenant,
            tenant_id,
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

    async def _change_of(
        self,
        method: str,
        tenant: Tenant | str | None,
        tenant_id: str | None,
        change: Callable[[Tenant], Tenant],
    ) -> Tenant:
        """`_change` on the tenant named as the public methods take it: object, identifier or id."""
        if (tenant is None) == (tenant_id is None):
            raise TypeError(
                f"{method}() takes a tenant or an identifier, or tenant_id=, and only one of them"
            )
        if isinstance(tenant, Tenant):
            # A record read earlier names one incarnation: if its slug was purged and
            # registered again since, the change must not reach the new holder.
            return await self._change(tenant.identifier, _only(tenant.id, change))
        if tenant_id is None:
            assert tenant is not None  # checked above
            try:
                return await self._change(tenant, change)
            except TenantNotFoundError as exc:
                raise await self._not_an_identifier(method, tenant) from exc
        # The slug found by id could have been purged and registered again since.
        target = await self.get_tenant_by_id(tenant_id)
        return await self._change(target.identifier, _only(tenant_id, change))

    async def _not_an_identifier(self, method: str, tenant: Tenant | str) -> TenantNotFoundError:
        # Only on this failure path: 0.5.0 took ids where we take identifiers; say so.
        owner = await self.store.get_by_id(tenant) if isinstance(tenant, str) else None
        if owner is None:
            return TenantNotFoundError(f"no tenant {_slug(tenant)!r:.80}")
        return TenantNotFoundError(
            f"{tenant!r:.80} is the id of tenant {owner.identifier!r}, not an identifier: "
            f"call {method}({owner.identifier!r}) or {method}(tenant_id=...)"
        )

    # -- moving between tiers (hybrid isolation) ---------------------------------------

    async def move_tenant(
        self, tenant: Tenant | str, tier: str, *, app_metadata: sa.MetaData, maintenance: bool = False
    ) -> Tenant:
        """Move a live tenant to another tier (hybrid isolation): copy, then switch atomically.

        Copies the rows of `app_metadata`'s tables into the new tier while holding
        the tenant's writes (see `HybridIsolation.move`), then switches the stored
        tier with a compare-and-set; this process routes the tenant to the new tier
        at once, others when their cache expires (`cache_ttl`), answering 503 or
        failing in between, never serving the old copy. The old copy is kept until
        `remove_old_copy`. Raises `TenantChangedError` if the tenant was moved or
        deleted meanwhile.

        `maintenance=True` holds the tenant in maintenance for the whole move: every
        worker answers its requests 503 with `Retry-After` (not only this process's
        writers wait), and it is active again when the move ends, moved or not. A
        tenant an operator put in maintenance beforehand can be moved too.
        """
        if maintenance:
            async with self.maintenance(tenant) as held:
                return await self.move_tenant(held, tier, app_metadata=app_metadata)
        isolation = self.isolation
        current = await self._current(tenant)
        if current.status not in (TenantStatus.ACTIVE, TenantStatus.MAINTENANCE):
            raise TenantInactiveError(current.status.value)

        def switch(stored: Tenant) -> Tenant:
            if stored.id != current.id or stored.tier != current.tier:
                raise TenantChangedError(f"tenant {stored.identifier!r} changed during the move")
            return stored.with_tier(tier)

        with isolation.moving(current):
            await isolation.move(current, tier, app_metadata)
            moved = await self._change(current.identifier, switch)
        logger.info("moved tenant %s from tier %s to %s", current.identifier, current.tier, tier)
        if self.stamper is not None:
            # The new copy was made from app_metadata: at head, like a registration. The
            # move stands either way; a failure here shows in `doctor`.
            try:
                await self.stamper.after_provision(isolation, moved)
            except Exception:
                logger.exception("could not stamp the version table of moved tenant %s", moved.identifier)
        return moved

    async def remove_old_copy(self, tenant: Tenant | str) -> None:
        """Delete the copy a `move_tenant` left in the tenant's previous tier. Irreversible."""
        current = await self._current(tenant)
        await self.isolation.remove_old_copy(current)
        logger.warning("removed the old copy of tenant %s", current.identifier)

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
        current = await self._current(tenant)
        marked = await self.isolation.adopt(current)
        if marked:
            logger.warning("tenant %s adopted the storage found under its name", current.identifier)
        return marked

    async def _current(self, tenant: Tenant | str) -> Tenant:
        # As stored now; a `Tenant` of an incarnation since purged is not found.
        current = await self.get_tenant(_slug(tenant))
        if isinstance(tenant, Tenant) and current.id != tenant.id:
            raise TenantNotFoundError(f"tenant {tenant.identifier!r} no longer exists")
        return current

    # -- announcing changes --------------------------------------------------------------

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


_OUTCOMES = {"kept": "kept as provisioned", "stamped": "stamped at head", "migrated": "migrated to head"}


def _into_maintenance(stored: Tenant) -> Tenant:
    if stored.status is TenantStatus.MAINTENANCE:
        return stored
    return stored.with_status(TenantStatus.MAINTENANCE)


def _out_of_maintenance(stored: Tenant) -> Tenant:
    if stored.status is TenantStatus.MAINTENANCE:
        return stored.with_status(TenantStatus.ACTIVE)
    return stored


def _only(tenant_id: str, change: Callable[[Tenant], Tenant]) -> Callable[[Tenant], Tenant]:
    """`change`, applied only while the slug still belongs to `tenant_id`."""

    def guarded(stored: Tenant) -> Tenant:
        if stored.id != tenant_id:
            raise TenantNotFoundError(f"no tenant with id {tenant_id!r:.80}")
        return change(stored)

    return guarded


def _slug(tenant: Tenant | str) -> str:
    return tenant.identifier if isinstance(tenant, Tenant) else tenant
