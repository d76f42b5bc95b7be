"""What `alembic revision --autogenerate` compares: the tenant's own tables, or the shared ones.

Autogenerate reflects the database and compares it with the target `MetaData`. Left to
itself inside a tenant's scope it proposed more than the model diff:

* `op.drop_table('alembic_version')` in every tenant revision: Alembic leaves out the
  version table only when it reflects the version table's schema by name, and a tenant
  migration reflects through its `search_path` (the unnamed default schema);
* every table declared with an explicit schema (a shared table) created in each tenant;
* in `public` (the shared environment, and tenants under row-level security, whose tables
  live there): dropping the registry, the audit log and the other tables of the library,
  and the tables of the other environment.

And a revision it wrote could fail to load: a column type from outside SQLAlchemy
(SQLModel's `AutoString`, for every `str` field) is written by its module path, and
nothing imported that module.

`tenant_filters()` and `shared_filters()` return the `include_name`/`include_object`
hooks (and options) that keep each environment to its own tables, and `render_item()`,
which imports the module of such a type; `env.py` passes them to `context.configure()`,
combined with any hooks of the caller's (both must agree).
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import sqlalchemy as sa

__all__ = ["combine", "render_item", "shared_filters", "tenant_filters"]


Metadata = sa.MetaData | Sequence[sa.MetaData] | None
"""What `target_metadata` may be: one MetaData, several (Alembic accepts a list), or none."""


def _tables(metadata: Metadata) -> list[sa.Table]:
    if metadata is None:
        return []
    every = [metadata] if isinstance(metadata, sa.MetaData) else list(metadata)
    return [table for m in every for table in m.sorted_tables]


def tenant_filters(
    metadata: Metadata, *, shared_column: str | None, excluded: Iterable[str]
) -> dict[str, Any]:
    """Hooks for a tenant migration: the tables without an explicit schema, and nothing else.

    `shared_column` (row-level security: the tenant tables live in the shared schema,
    beside everything else kept there): a table found in the database is the tenants'
    only if the metadata has it or it carries that column; `excluded` names are never
    compared (the library's tables, the version tables).
    """
    skip = frozenset(excluded)
    mine = {t.name for t in _tables(metadata) if t.schema is None}

    def include_name(name: str | None, type_: str, parent_names: dict[str, str | None]) -> bool:
        return not (type_ == "table" and name in skip)

    def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ != "table":
            return True
        if not reflected:
            # Tables with an explicit schema are shared: the shared environment's business.
            return bool(obj.schema is None)
        return shared_column is None or name in mine or shared_column in obj.c

    return {"include_name": include_name, "include_object": include_object, "render_item": render_item}


def render_item(type_: str, obj: Any, autogen_context: Any) -> Literal[False]:
    """Alembic's `render_item` hook: the revision imports the module of each type from outside SQLAlchemy.

    Alembic writes such a type by its module path and leaves it to the revision's imports
    (`sqlmodel.sql.sqltypes.AutoString(length=255)`, then `import sqlmodel.sql.sqltypes`
    in its `${imports}`). Renders nothing itself (False: Alembic's own rendering), and adds
    nothing when `user_module_prefix` says how to write such types instead.
    """
    if type_ == "type" and autogen_context.opts.get("user_module_prefix") is None:
        module = type(obj).__module__
        if module.partition(".")[0] not in ("sqlalchemy", "builtins", "__main__"):
            autogen_context.imports.add(f"import {module}")
    return False


def shared_filters(
    metadata: Metadata,
    *,
    schema: str,
    default_schema: str | None,
    shared_column: str | None,
    excluded: Iterable[str],
) -> dict[str, Any]:
    """Hooks for the shared migrations: the tables declared with `schema=<schema>`, nothing else.

    Reflects `schema` by name (`include_schemas=True`, other schemas filtered out), so the
    metadata's `schema="public"` tables meet their reflection whatever the connection's
    default schema (`default_schema`). Tables without a schema are the tenants', and so,
    under row-level security (`shared_column`), are tables found in the database that
    carry the tenant column and are not in the metadata.
    """
    skip = frozenset(excluded)
    mine = {t.name for t in _tables(metadata) if t.schema == schema}

    def include_name(name: str | None, type_: str, parent_names: dict[str, str | None]) -> bool:
        if type_ == "schema":
            # Alembic names the connection's default schema None.
            return name == schema or (name is None and default_schema == schema)
        return not (type_ == "table" and name in skip)

    def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ != "table":
            return True
        if not reflected:
            return bool(obj.schema == schema)
        return shared_column is None or name in mine or shared_column not in obj.c

    return {
        "include_schemas": True,
        "include_name": include_name,
        "include_object": include_object,
        "render_item": render_item,
    }


def combine(configure: dict[str, Any], filters: dict[str, Any]) -> None:
    """Put `filters` into `configure` (the keyword arguments of `context.configure()`).

    A hook the caller passed too is kept: an object is compared only if both agree; an
    item is rendered by the caller's `render_item` first, by ours if it renders nothing.
    An explicit `include_schemas` of the caller's wins.
    """
    for key, ours in filters.items():
        theirs = configure.get(key)
        if key.startswith("include_") and callable(ours) and callable(theirs):
            configure[key] = _both(ours, theirs)
        elif key == "render_item" and callable(theirs):
            configure[key] = _first_rendered(theirs, ours)
        elif theirs is None:
            configure[key] = ours


def _both(first: Callable[..., bool], second: Callable[..., bool]) -> Callable[..., bool]:
    def both(*args: Any) -> bool:
        return first(*args) and second(*args)

    return both


def _first_rendered(first: Callable[..., Any], second: Callable[..., Any]) -> Callable[..., Any]:
    def render(*args: Any) -> Any:
        rendered = first(*args)
        return second(*args) if rendered is False else rendered

    return render
