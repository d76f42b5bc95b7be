"""Tenant incarnations: storage bound to the id of the tenant it was made for.

Storage is found by name (the schema `tenant_acme` of the slug `acme`), and a slug
deleted with its data can be registered again, by another customer, under a new
tenant id. A request of the old tenant still in flight, or a process whose cache still
holds it, would then reach the new tenant's storage by that name. So the storage the
library provisions holds a marker, an empty view named `fastapi_tenancy:<tenant id>`
(`base.marker_name()`; a view, which Alembic's autogenerate and `MetaData.reflect()` leave
alone), and a tenant's work runs only where its own marker is:

- PostgreSQL (a schema or a database per tenant): every tenant transaction locks its
  marker in its `BEGIN` message (`lock_marker()`, sent by `_begin`: no round trip of
  its own). PostgreSQL resolves the name when it takes the lock (again, if the catalog
  changed meanwhile), under any isolation level, so the transaction proves at BEGIN
  that the storage is its tenant's; and it holds the lock to its end: `DROP SCHEMA ...
  CASCADE` drops the marker too, so it waits for every open transaction of the tenant,
  also one that has not touched a table yet (`drop_schema()` waits `DESTROY_WAIT`
  seconds, then ends them). `refusal()` turns a failed lock into
  `TenancyUnavailableError` (no such storage, or being dropped: a retry is answered by
  the registry) or `TenantNotFoundError` (the storage is another tenant's).
- MySQL/MariaDB and SQLite, whose connections stay in one database: each new
  connection checks that the marker is there (`database.py`, `sqlite.py`).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import ProvisioningError, TenancyError, TenancyUnavailableError, TenantNotFoundError
from .base import marker_name, quote_identifier

__all__ = [
    "DESTROY_WAIT",
    "MARKERS_IN_SCHEMA",
    "advisory_holders",
    "create_marker",
    "drop_schema",
    "end_after_wait",
    "lock_marker",
    "needs_marker",
    "refusal",
]

DESTROY_WAIT = 5.0
"""Seconds destruction waits for the tenant's open transactions (each time it must wait
for a lock) before it ends them."""

_LOCK = "IN ACCESS SHARE MODE NOWAIT;"
_NO_SCHEMA = "3F000"  # invalid_schema_name
_NO_MARKER = "42P01"  # undefined_table
_LOCK_NOT_AVAILABLE = "55P03"  # NOWAIT, or lock_timeout
_INSUFFICIENT_PRIVILEGE = "42501"
_NO_ROLE = "22023"  # invalid_parameter_value: SET ROLE to a role that is gone
_ATTEMPTS = 3


def create_marker(tenant_id: str, *, schema: str | None = None, quote: str = '"') -> str:
    """`CREATE VIEW` of `tenant_id`'s marker, in `schema` or the connection's current database."""
    name = quote_identifier(marker_name(tenant_id), quote=quote)
    if schema is not None:
        name = f"{quote_identifier(schema, quote=quote)}.{name}"
    return f"CREATE VIEW {name} AS SELECT 1 AS tenant"


def needs_marker(found: Sequence[str], tenant_id: str, where: str) -> bool:
    """Whether storage holding the markers `found` still needs `tenant_id`'s (adoption).

    False when it holds exactly the tenant's; raises `ProvisioningError` when it holds
    another tenant's, which is never taken over.
    """
    if list(found) == [marker_name(tenant_id)]:
        return False
    if found:
        others = ", ".join(found)
        raise ProvisioningError(f"{where} is marked for another tenant ({others}); refusing to adopt it")
    return True


def lock_marker(schema: str, tenant_id: str) -> str:
    """SQL for a `BEGIN` message: lock `tenant_id`'s marker in `schema`, or fail at once.

    NOWAIT: only destruction takes a lock on a marker that conflicts, and a request
    must not hold a pooled connection while it waits (it answers 503 at once).
    """
    return f"LOCK TABLE {quote_identifier(schema)}.{quote_identifier(marker_name(tenant_id))} {_LOCK}"


def refusal(exc: BaseException, setting: str) -> TenancyError | None:
    """What a failed `BEGIN` message with a marker lock means, or None for other failures."""
    if _LOCK not in setting:
        return None
    sqlstate = getattr(exc, "sqlstate", None)
    message = str(getattr(exc, "message", exc))
    if sqlstate == _NO_MARKER:
        # The storage under the tenant's name was made for another tenant: the slug was
        # deleted and registered again.
        return TenantNotFoundError(f"the tenant's storage belongs to another tenant ({message})")
    if sqlstate in (_NO_ROLE, _INSUFFICIENT_PRIVILEGE):
        # Tenant roles (roles.py): the tenant's role, or a grant to it, is missing (dropped
        # with the tenant, or revoked): fail closed until the registry or `doctor` says why.
        return TenancyUnavailableError(f"the tenant's role or its grants are missing ({message})")
    if sqlstate in (_NO_SCHEMA, _LOCK_NOT_AVAILABLE):
        # Gone (deleted, or moved to another tier) or being dropped: the registry answers
        # the retry.
        return TenancyUnavailableError(f"the tenant's storage is gone or being dropped ({message})")
    return None


def _sqlstate(exc: sa_exc.DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


async def end_after_wait(
    conn: AsyncConnection,
    statement: str,
    holders: str,
    params: Mapping[str, Any] | None = None,
) -> None:
    """Run `statement`, which waits for locks, ending the backends in its way if it waits long.

    Inside `conn`'s transaction. Each lock is waited for up to `DESTROY_WAIT` seconds;
    then the backends `holders` selects (`SELECT pid ...`, same `params`) are ended
    with `pg_terminate_backend` (their requests get a 503) and `statement` runs again.
    Raises `TenancyUnavailableError` if it still cannot run, or the role may not end them.
    """
    for attempt in range(_ATTEMPTS):
        try:
            async with conn.begin_nested():
                await conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{round(DESTROY_WAIT * 1000)}ms'")
                await conn.execute(sa.text(statement), dict(params or {}))
                await conn.exec_driver_sql("SET LOCAL lock_timeout TO DEFAULT")
            return
        except sa_exc.DBAPIError as exc:
            if _sqlstate(exc) != _LOCK_NOT_AVAILABLE:
                raise
            if attempt == _ATTEMPTS - 1:
                raise TenancyUnavailableError(
                    f"could not lock what is being destroyed within {DESTROY_WAIT:g} s, {_ATTEMPTS} "
                    "times: transactions that are no tenant's (a migration?) hold it; retry"
                ) from exc
        try:
            async with conn.begin_nested():
                await conn.execute(
                    sa.text(f"SELECT pg_catalog.pg_terminate_backend(h.pid, 1000) FROM ({holders}) AS h"),  # noqa: S608
                    dict(params or {}),
                )
        except sa_exc.DBAPIError as exc:
            if _sqlstate(exc) != _INSUFFICIENT_PRIVILEGE:
                raise
            raise TenancyUnavailableError(
                f"open transactions of the tenant outlasted {DESTROY_WAIT:g} s and this role may not "
                "end them (grant it pg_signal_backend, or retry when they are done)"
            ) from exc


# The markers in schema :schema (a quoted name), and the backends holding a lock on one.
MARKERS_IN_SCHEMA = (
    "SELECT c.relname::text FROM pg_catalog.pg_class c "
    "WHERE c.relnamespace = pg_catalog.to_regnamespace(:schema) AND c.relkind = 'v' "
    "AND c.relname LIKE 'fastapi\\_tenancy:%'"
)
_MARKER_HOLDERS = (
    "SELECT DISTINCT l.pid FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_class c ON c.oid = l.relation "
    "WHERE l.database = (SELECT d.oid FROM pg_catalog.pg_database d "
    "WHERE d.datname = pg_catalog.current_database()) "
    "AND c.relnamespace = pg_catalog.to_regnamespace(:schema) AND c.relkind = 'v' "
    "AND c.relname LIKE 'fastapi\\_tenancy:%' AND l.granted AND l.pid <> pg_catalog.pg_backend_pid()"
)


async def drop_schema(conn: AsyncConnection, schema: str) -> None:
    """`DROP SCHEMA IF EXISTS ... CASCADE` inside `conn`'s transaction, once no transaction
    of its tenant is open.

    The schema's marker is locked first, exclusively (see `end_after_wait`; the backends
    it ends are those holding the marker: open transactions of the tenant, never other
    work on its tables). `DROP` alone would lock the tables before the marker, and
    deadlock with a transaction of the tenant that holds the marker and goes on to read.
    """
    params = {"schema": quote_identifier(schema)}
    markers = (await conn.scalars(sa.text(MARKERS_IN_SCHEMA), params)).all()
    if markers:
        names = ", ".join(f"{quote_identifier(schema)}.{quote_identifier(name)}" for name in markers)
        await end_after_wait(conn, f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE", _MARKER_HOLDERS, params)
    await conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {quote_identifier(schema)} CASCADE"))


def advisory_holders() -> str:
    """`SELECT pid ...` of the backends holding the advisory lock `hashtextextended(:key, 0)`.

    A bigint advisory key shows in `pg_locks` as (classid, objid) = its high and low 32
    bits, with objsubid 1.
    """
    return (
        "SELECT l.pid FROM pg_catalog.pg_locks l, "
        "(SELECT pg_catalog.hashtextextended(:key, 0) AS k) AS key "
        "WHERE l.locktype = 'advisory' AND l.objsubid = 1 "
        "AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d "
        "WHERE d.datname = pg_catalog.current_database()) "
        "AND l.classid = ((key.k >> 32) & 4294967295)::oid AND l.objid = (key.k & 4294967295)::oid "
        "AND l.granted AND l.pid <> pg_catalog.pg_backend_pid()"
    )
