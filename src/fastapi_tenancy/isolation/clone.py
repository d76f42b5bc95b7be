"""Fast provisioning: a new tenant's schema cloned from a template schema kept at the current head.

Running every migration (or `create_all` with dozens of tables) for each sign-up
costs seconds; cloning a ready schema costs one catalog query and one batch of
DDL sent in a single round trip.

`CREATE TABLE ... (LIKE ... INCLUDING ALL)` alone is not a clone: it leaves out
foreign keys, renames indexes and constraints, and its copied defaults still call
`nextval()` on the TEMPLATE's sequences. So the clone is built from the catalog:

* enum types and standalone sequences are created anew in the tenant schema;
* tables copy columns, NOT NULL, identity, generated columns, storage and comments
  (`LIKE` without defaults, constraints or indexes);
* defaults, constraints (primary, unique, check, exclusion, then foreign keys) and
  indexes are re-created under their own names from definitions printed by
  PostgreSQL while the template alone is on the `search_path`, so they name no
  schema and bind to the tenant's own objects when run with the tenant's
  `search_path` (a serial column's default uses the tenant's sequence);
* constraint and index comments, sequence ownership, and the rows of
  `alembic_version` are copied, so the tenant is at the template's revision.

A template holding objects this does not copy (views, functions, triggers,
policies, domains, composite types, partitioned tables) is refused with
`ProvisioningError` rather than half-copied.
"""

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import ProvisioningError

__all__ = ["clone_schema", "schema_catalog"]

_SET_SEARCH_PATH = "SELECT set_config('search_path', $1, true)"

# The template's own objects, found through indexes so that a clone costs the same with
# ten tenant schemas beside the template as with 10,000: nothing in pg_class,
# pg_constraint or pg_type is indexed by schema, and scanning them (as a filter on
# `relnamespace` does) grows with every tenant's tables. Every table, sequence, view,
# type and function records a dependency on its schema in pg_depend (indexed by what
# it references); indexes, constraints, defaults and triggers are then looked up by
# their table's oid. Each lookup also checks the schema, so the dependency only
# narrows what is read.
_TEMPLATE_OBJECTS = """
    t AS (SELECT to_regnamespace(CAST(:t AS text)) AS nsp),
    owned AS MATERIALIZED (
      SELECT d.classid, d.objid FROM pg_depend d, t
       WHERE d.refclassid = CAST('pg_namespace' AS regclass) AND d.refobjid = t.nsp AND d.refobjsubid = 0
    ),
    rels AS MATERIALIZED (
      SELECT c.oid, c.relname, c.relkind, c.relrowsecurity FROM pg_class c, t
       WHERE c.oid = ANY(ARRAY(SELECT objid FROM owned WHERE classid = CAST('pg_class' AS regclass)))
         AND c.relnamespace = t.nsp
    ),
    types AS MATERIALIZED (
      SELECT y.oid, y.typname, y.typtype, y.typrelid FROM pg_type y, t
       WHERE y.oid = ANY(ARRAY(SELECT objid FROM owned WHERE classid = CAST('pg_type' AS regclass)))
         AND y.typnamespace = t.nsp
    ),
    tables AS MATERIALIZED (SELECT oid, relname FROM rels WHERE relkind = 'r'),
    indexes AS MATERIALIZED (
      SELECT i.oid, i.relname, x.indrelid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid, t
       WHERE x.indrelid = ANY(ARRAY(SELECT oid FROM tables)) AND i.relnamespace = t.nsp AND i.relkind = 'i'
    ),
    constraints AS MATERIALIZED (
      SELECT k.oid, k.conname, k.contype, k.conrelid, k.conindid FROM pg_constraint k, t
       WHERE k.conrelid = ANY(ARRAY(SELECT oid FROM tables)) AND k.connamespace = t.nsp
    )"""

# Objects the clone cannot reproduce faithfully.
_UNSUPPORTED = sa.text(
    f"""
    WITH {_TEMPLATE_OBJECTS}
    SELECT 'relation ' || r.relname || ' (kind ' || CAST(r.relkind AS text) || ')' FROM rels r
     WHERE r.relkind IN ('v', 'm', 'f', 'p')
    UNION ALL SELECT 'row level security on ' || r.relname FROM rels r WHERE r.relrowsecurity
    UNION ALL SELECT 'function ' || p.proname FROM pg_proc p, t
     WHERE p.oid = ANY(ARRAY(SELECT objid FROM owned WHERE classid = CAST('pg_proc' AS regclass)))
       AND p.pronamespace = t.nsp
    UNION ALL SELECT 'type ' || y.typname FROM types y WHERE y.typtype IN ('d', 'r', 'm')
    UNION ALL SELECT 'composite type ' || y.typname FROM types y JOIN pg_class c ON c.oid = y.typrelid
     WHERE y.typtype = 'c' AND c.relkind = 'c'
    UNION ALL SELECT 'trigger ' || g.tgname FROM pg_trigger g
     WHERE g.tgrelid = ANY(ARRAY(SELECT oid FROM rels)) AND NOT g.tgisinternal
    """  # noqa: S608  (no input: the template's name is a bound parameter)
)

# Every statement of the clone, in order (phase, then a stable key). Run with only the
# template on the search_path, so every printed definition names no schema.
_CLONE_SCRIPT = sa.text(
    f"""
    WITH {_TEMPLATE_OBJECTS}
    SELECT phase, key, stmt FROM (
      SELECT 1 AS phase, y.typname::text AS key,
             format('CREATE TYPE %I AS ENUM (%s)', y.typname,
                    (SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
                       FROM pg_enum e WHERE e.enumtypid = y.oid)) AS stmt
        FROM types y WHERE y.typtype = 'e'
      UNION ALL
      SELECT 2, c.relname::text,
             format('CREATE SEQUENCE %I AS %s INCREMENT BY %s MINVALUE %s MAXVALUE %s '
                    'START WITH %s CACHE %s %s',
                    c.relname, format_type(s.seqtypid, NULL), s.seqincrement, s.seqmin, s.seqmax,
                    s.seqstart, s.seqcache, CASE WHEN s.seqcycle THEN 'CYCLE' ELSE 'NO CYCLE' END)
        FROM rels c JOIN pg_sequence s ON s.seqrelid = c.oid
       WHERE c.relkind = 'S'
         AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = CAST('pg_class' AS regclass)
                          AND d.objid = c.oid AND d.objsubid = 0 AND d.deptype = 'i')
      UNION ALL
      SELECT 3, c.relname::text,
             format('CREATE TABLE %I (LIKE %I.%I INCLUDING IDENTITY INCLUDING GENERATED INCLUDING STORAGE '
                    'INCLUDING COMMENTS INCLUDING COMPRESSION)', c.relname, CAST(:t AS text), c.relname)
        FROM tables c
      UNION ALL
      -- Enum columns: LIKE copied the template's type; point them at the tenant's own.
      SELECT 4, c.relname || '.' || a.attname,
             format('ALTER TABLE %I ALTER COLUMN %I TYPE %s USING CAST(CAST(%I AS text) AS %s)',
                    c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attname,
                    format_type(a.atttypid, a.atttypmod))
        FROM pg_attribute a JOIN tables c ON c.oid = a.attrelid JOIN types y ON y.oid = a.atttypid
       WHERE a.attrelid = ANY(ARRAY(SELECT oid FROM tables)) AND a.attnum > 0 AND NOT a.attisdropped
         AND y.typtype = 'e'
      UNION ALL
      -- One ALTER TABLE per table for its defaults and its own constraints: far fewer
      -- catalog updates than a statement each.
      SELECT 5, part.relname::text,
             format('ALTER TABLE %I %s', part.relname, string_agg(part.sub, ', ' ORDER BY part.ord, part.key))
        FROM (
          -- Each branch starts from the template's tables: joined to them afterwards, the
          -- definitions would be printed once per table.
          SELECT c.relname, 1 AS ord, a.attname::text AS key,
                 format('ALTER COLUMN %I SET DEFAULT %s', a.attname, pg_get_expr(d.adbin, d.adrelid)) AS sub
            FROM tables c JOIN pg_attrdef d ON d.adrelid = c.oid
            JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
           WHERE a.attgenerated = '' AND a.attidentity = ''
          UNION ALL
          SELECT c.relname, 2, k.conname::text,
                 format('ADD CONSTRAINT %I %s', k.conname, pg_get_constraintdef(k.oid))
            FROM constraints k JOIN tables c ON c.oid = k.conrelid
           WHERE k.contype IN ('p', 'u', 'x', 'c')
        ) AS part
       GROUP BY part.relname
      UNION ALL
      SELECT 6, s.relname::text,
             format('ALTER SEQUENCE %I OWNED BY %I.%I', s.relname, c.relname, a.attname)
        FROM rels s JOIN pg_depend d ON d.classid = CAST('pg_class' AS regclass) AND d.objid = s.oid
        JOIN pg_class c ON c.oid = d.refobjid
        JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
       WHERE s.relkind = 'S' AND d.refclassid = CAST('pg_class' AS regclass) AND d.deptype = 'a'
      UNION ALL
      -- Foreign keys last, when every table they reference has its keys.
      SELECT 8, c.relname::text,
             format('ALTER TABLE %I %s', c.relname, string_agg(
                 format('ADD CONSTRAINT %I %s', k.conname, pg_get_constraintdef(k.oid)),
                 ', ' ORDER BY k.conname))
        FROM constraints k JOIN tables c ON c.oid = k.conrelid
       WHERE k.contype = 'f'
       GROUP BY c.relname
      UNION ALL
      -- pg_get_indexdef always names the table's schema: drop it (exactly, once).
      SELECT 9, i.relname::text,
             replace(pg_get_indexdef(i.oid), ' ON ' || quote_ident(CAST(:t AS text)) || '.', ' ON ')
        FROM indexes i
       WHERE NOT EXISTS (SELECT 1 FROM constraints k WHERE k.conindid = i.oid
                          AND k.conrelid = i.indrelid AND k.contype IN ('p', 'u', 'x'))
      UNION ALL
      SELECT 10, c.relname || '.' || k.conname,
             format('COMMENT ON CONSTRAINT %I ON %I IS %L', k.conname, c.relname, ds.description)
        FROM constraints k JOIN tables c ON c.oid = k.conrelid
        JOIN pg_description ds ON ds.objoid = k.oid AND ds.classoid = CAST('pg_constraint' AS regclass)
      UNION ALL
      SELECT 10, i.relname::text, format('COMMENT ON INDEX %I IS %L', i.relname, ds.description)
        FROM indexes i JOIN pg_description ds ON ds.objoid = i.oid
         AND ds.classoid = CAST('pg_class' AS regclass) AND ds.objsubid = 0
      UNION ALL
      -- LIKE ... INCLUDING COMMENTS copies the columns' comments, not the table's own.
      SELECT 10, c.relname::text, format('COMMENT ON TABLE %I IS %L', c.relname, ds.description)
        FROM tables c JOIN pg_description ds ON ds.objoid = c.oid
         AND ds.classoid = CAST('pg_class' AS regclass) AND ds.objsubid = 0
      UNION ALL
      SELECT 11, 'alembic_version',
             format('INSERT INTO alembic_version SELECT * FROM %I.alembic_version', CAST(:t AS text))
        FROM tables c WHERE c.relname = 'alembic_version'
    ) AS script
    ORDER BY phase, key
    """  # noqa: S608  (no input: the template's name is a bound parameter)
)


async def clone_schema(conn: AsyncConnection, template: str, target: str) -> None:
    """Create schema `target` as a structural copy of `template`, in `conn`'s transaction.

    Raises `ProvisioningError` if `template` does not exist or holds objects the
    clone does not copy. Table rows are not copied, except `alembic_version`'s.
    """
    if not await conn.scalar(sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :n"), {"n": template}):
        raise ProvisioningError(f"template schema {template!r} does not exist")
    unsupported = (await conn.scalars(_UNSUPPORTED, {"t": template})).all()
    if unsupported:
        raise ProvisioningError(
            f"template schema {template!r} holds objects a clone would not copy: {', '.join(unsupported)}"
        )
    # Printed with only the template visible, definitions carry no schema name ...
    await conn.exec_driver_sql(_SET_SEARCH_PATH, (f'"{template}"',))
    statements = [row.stmt for row in await conn.execute(_CLONE_SCRIPT, {"t": template})]
    # ... and run with only the new schema visible, they bind to its objects.
    script = ";\n".join(
        [f'CREATE SCHEMA "{target}"', f"SELECT set_config('search_path', '\"{target}\"', true)", *statements]
    )
    raw = await conn.get_raw_connection()
    # One round trip: asyncpg runs a multi-statement script with the simple query protocol.
    await raw.driver_connection.execute(script)  # type: ignore[union-attr]


_CATALOG: dict[str, str] = {
    "types": """
        SELECT y.typname, array_to_string(ARRAY(SELECT e.enumlabel FROM pg_enum e
               WHERE e.enumtypid = y.oid ORDER BY e.enumsortorder), ',')
          FROM pg_type y WHERE y.typnamespace = to_regnamespace(CAST(:s AS text)) AND y.typtype = 'e'""",
    # Not the tenant's marker (_incarnation.py): whose schema it is, not how it is built.
    "relations": """
        SELECT c.relname, c.relkind, coalesce(obj_description(c.oid, 'pg_class'), '')
          FROM pg_class c WHERE c.relnamespace = to_regnamespace(CAST(:s AS text))
           AND c.relname NOT LIKE 'fastapi\\_tenancy:%'""",
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               a.attidentity, a.attgenerated, coalesce(pg_get_expr(d.adbin, d.adrelid), ''),
               coalesce(col_description(c.oid, a.attnum), '')
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = to_regnamespace(CAST(:s AS text)) AND c.relkind = 'r' AND a.attnum > 0
           AND NOT a.attisdropped""",
    "constraints": """
        SELECT c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid),
               coalesce(obj_description(k.oid, 'pg_constraint'), '')
          FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
         WHERE c.relnamespace = to_regnamespace(CAST(:s AS text))""",
    "indexes": """
        SELECT i.relname,
               replace(pg_get_indexdef(x.indexrelid), ' ON ' || quote_ident(CAST(:s AS text)) || '.', ' ON ')
          FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
         WHERE i.relnamespace = to_regnamespace(CAST(:s AS text))""",
    "sequences": """
        SELECT c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
               s.seqcache, s.seqcycle,
               coalesce((SELECT r.relname || '.' || a.attname || ':' || CAST(d.deptype AS text)
                 FROM pg_depend d
                 JOIN pg_class r ON r.oid = d.refobjid
                 JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                WHERE d.objid = c.oid AND d.deptype IN ('a', 'i')
                  AND d.refclassid = CAST('pg_class' AS regclass)), '')
          FROM pg_class c JOIN pg_sequence s ON s.seqrelid = c.oid
         WHERE c.relnamespace = to_regnamespace(CAST(:s AS text))""",
}


async def schema_catalog(conn: AsyncConnection, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """A schema's structure as sorted rows, for comparing two schemas (e.g. a clone and its template).

    Definitions are printed with only `schema` on the search_path, so they carry
    no schema name and two schemas built alike compare equal.
    """
    await conn.exec_driver_sql(_SET_SEARCH_PATH, (f'"{schema}"',))
    catalog = {}
    for name, query in _CATALOG.items():
        rows = await conn.execute(sa.text(query), {"s": schema})
        catalog[name] = sorted(tuple(row) for row in rows)
    return catalog
