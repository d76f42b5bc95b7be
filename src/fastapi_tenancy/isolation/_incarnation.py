"""Tenant incarnations on PostgreSQL: whose storage a transaction is bound to.

Storage is named after the tenant's slug, and a slug deleted with its data can be
registered again, by another customer, under a new tenant id. A request of the old
tenant still in flight would then reach the new tenant's schema or database by its
name. So storage carries the id of the tenant it was made for (a `COMMENT`, written
when it is provisioned), and every tenant transaction checks it in its `BEGIN`
message (`isolation/_begin.py`): no round trip of its own. A transaction of another
incarnation fails there, before any statement of the route, with `INCARNATION_SQLSTATE`,
which `_begin` turns into `TenantNotFoundError` (the tenant it belongs to is gone), or
into `TenancyUnavailableError` when the storage is missing (moved to another tier,
or being deleted: a retry is answered by the registry).
Storage made before this check existed has no comment and is accepted.

A schema's check also takes a shared advisory lock for the transaction; `destroy`
takes it exclusively before `DROP SCHEMA`, which would otherwise not wait for a
transaction that has not touched the schema's tables yet. (`DROP DATABASE ... WITH
(FORCE)` ends the other connections itself.)
"""

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from .base import quote_identifier

__all__ = [
    "ANOTHER_TENANT",
    "INCARNATION_SQLSTATE",
    "database_check",
    "mark_incarnation",
    "schema_check",
    "wait_for_transactions",
]

INCARNATION_SQLSTATE = "3F000"  # invalid_schema_name: what the failing cast raises
ANOTHER_TENANT = "fastapi-tenancy: this storage belongs to another tenant"
_LOCK_NOT_AVAILABLE = "55P03"
DESTROY_WAIT = "5s"
"""How long `destroy` waits for the tenant's open transactions before ending them."""


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _lock_key(storage: str) -> str:
    return f"pg_catalog.hashtextextended({_literal('fastapi_tenancy.storage:' + storage)}, 0)"


def _refuse_unless(marked: str, tenant_id: str) -> str:
    # A cast of a name that is no schema fails (3F000) with the name in its message.
    # Not constant-folded: the comment is read when the statement runs.
    ident = _literal(tenant_id)
    return (
        f"CAST(CASE WHEN coalesce({marked}, {ident}) = {ident} THEN 'pg_catalog' "
        f"ELSE {_literal(quote_identifier(ANOTHER_TENANT))} END AS pg_catalog.regnamespace)"
    )


def schema_check(schema: str, tenant_id: str) -> str:
    """SQL for a `BEGIN` message: lock `schema` shared, refuse it unless it is `tenant_id`'s."""
    name = _literal(quote_identifier(schema))
    marked = f"pg_catalog.obj_description({name}::pg_catalog.regnamespace, 'pg_namespace')"
    lock = f"pg_catalog.pg_advisory_xact_lock_shared({_lock_key(schema)})"
    return f"SELECT {lock}, {_refuse_unless(marked, tenant_id)};"


def database_check(tenant_id: str) -> str:
    """SQL for a `BEGIN` message: refuse the current database unless it is `tenant_id`'s."""
    marked = (
        "pg_catalog.shobj_description((SELECT oid FROM pg_catalog.pg_database "
        "WHERE datname = pg_catalog.current_database()), 'pg_database')"
    )
    return f"SELECT {_refuse_unless(marked, tenant_id)};"


def mark_incarnation(kind: str, quoted_name: str, tenant_id: str) -> str:
    """`COMMENT ON {kind}` naming the tenant the storage was made for."""
    return f"COMMENT ON {kind} {quoted_name} IS {_literal(tenant_id)}"


async def wait_for_transactions(conn: AsyncConnection, schema: str) -> None:
    """Inside `conn`'s transaction: wait for the open transactions of `schema`'s tenant.

    Waits up to `DESTROY_WAIT`, then ends the backends still holding them
    (`pg_terminate_backend`: their requests get a 503), and takes the lock, held until
    `conn` commits the drop.
    """
    lock = f"SELECT pg_catalog.pg_advisory_xact_lock({_lock_key(schema)})"
    try:
        async with conn.begin_nested():
            await conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{DESTROY_WAIT}'")
            await conn.exec_driver_sql(lock)
            await conn.exec_driver_sql("SET LOCAL lock_timeout TO DEFAULT")
            return
    except sa_exc.DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
            raise
    # A bigint advisory key is (classid, objid) = (high, low) 32 bits, objsubid 1.
    await conn.exec_driver_sql(
        f"SELECT pg_catalog.pg_terminate_backend(l.pid) FROM pg_catalog.pg_locks l, "  # noqa: S608 - a quoted name
        f"(SELECT {_lock_key(schema)} AS k) key WHERE l.locktype = 'advisory' AND l.objsubid = 1 "
        "AND l.classid = ((key.k >> 32) & 4294967295)::oid AND l.objid = (key.k & 4294967295)::oid "
        "AND l.pid <> pg_catalog.pg_backend_pid()"
    )
    await conn.exec_driver_sql(lock)
