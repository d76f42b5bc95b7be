"""`assert_isolated`: prove, through an app's own routes, that one tenant cannot reach another's data.

An OpenAPI-driven probe: it seeds data as two tenants through the app's POST routes,
then calls every route as tenant A with tenant B's identifiers and looks for B's data
in the answers and for changes in B's own view. It leaves out the app's excluded paths
(they run as no tenant), and removes what it made: its own two tenants, and tenants its
requests registered. `fastapi_tenancy.testing` exports it too.

Needs httpx: `pip install 'fastapi-tenancy[testing]'`.
"""

import json
import re
import uuid
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI

from ._probe_requests import Operation, ProbeRequest, RequestValues, build_request, identifiers_in
from .errors import IsolationError, MissingDependencyError, TenantNotFoundError
from .manager import TenancyManager
from .middleware import TenancyMiddleware, path_covers
from .tenant import Tenant

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("httpx", "testing") from exc

__all__ = ["IsolationReport", "ProbeWarning", "assert_isolated"]

_METHODS = ("get", "post", "put", "patch", "delete")
_PER_ROUTE = 4  # requests per route with identifiers in its path, one per identifier of B
_SKIP_ENTRY = re.compile(r"(?:(?P<method>[A-Za-z]+) +)?(?P<path>/\S*)")


class ProbeWarning(UserWarning):
    """An `assert_isolated` option that had no effect, such as a `skip` entry matching no route."""


@dataclass
class IsolationReport:
    """What `assert_isolated` did: the routes it called, what of B it looked for, what it found."""

    routes: list[str] = field(default_factory=list)
    """`METHOD /path` of every route exercised as tenant A."""
    requests: int = 0
    """HTTP requests made, for both tenants."""
    statuses: dict[int, int] = field(default_factory=dict)
    """How many of tenant A's responses had each status."""
    b_markers: list[str] = field(default_factory=list)
    """Values of B's data, seen in B's own responses, that A must never see."""
    b_identifiers: list[Any] = field(default_factory=list)
    """B's identifiers (ids and keys) that A's requests used."""
    findings: list[str] = field(default_factory=list)
    """Each read or change of B's data by A; empty when isolated."""
    skipped: list[str] = field(default_factory=list)
    """`METHOD /path` of every route left out: on an excluded path, or named by `skip`."""
    removed_tenants: list[str] = field(default_factory=list)
    """Identifiers of the tenants removed afterwards, with their data: the probe's own
    two, and those its requests registered."""


@dataclass(frozen=True)
class _Skip:
    """One `skip` entry: a path prefix, by whole segments like `excluded_paths`, and maybe a method."""

    entry: str
    method: str | None
    path: str

    @classmethod
    def parse(cls, entry: str) -> "_Skip":
        match = _SKIP_ENTRY.fullmatch(entry.strip())
        if match is None:
            raise ValueError(f"skip entry {entry!r}: expected '/path' or 'METHOD /path'")
        method = match["method"]
        return cls(entry, method.lower() if method else None, match["path"].rstrip("/") or "/")

    def covers(self, operation: Operation) -> bool:
        return self.method in (None, operation.method) and path_covers(self.path, operation.path)


def _excluded_paths(app: FastAPI) -> list[str]:
    """The `excluded_paths` of the app's `TenancyMiddleware`: there, requests run as no tenant."""
    paths: list[str] = []
    for middleware in app.user_middleware:
        cls, args, kwargs = middleware
        if isinstance(cls, type) and issubclass(cls, TenancyMiddleware):
            # Built as Starlette builds it, to read the paths exactly as normalised there.
            paths.extend(cls(app, *args, **kwargs).excluded_paths)
    return paths


def _operations(
    app: FastAPI, skips: list[_Skip], excluded: list[str], report: IsolationReport
) -> tuple[list[Operation], dict[str, Any], list[_Skip]]:
    """The routes to call, the schema components, and the `skip` entries that matched none."""
    schema = app.openapi()
    unused = list(skips)
    operations = []
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            spec = item.get(method)
            if spec is None:
                continue
            merged = dict(spec)
            merged["parameters"] = [*item.get("parameters", []), *spec.get("parameters", [])]
            operation = Operation(method, path, merged)
            matching = [s for s in skips if s.covers(operation)]
            unused = [s for s in unused if s not in matching]
            if matching or any(path_covers(prefix, path) for prefix in excluded):
                report.skipped.append(operation.key)
            else:
                operations.append(operation)
    return operations, schema.get("components", {}), unused


class _Caller:
    def __init__(self, client: httpx.AsyncClient, report: IsolationReport) -> None:
        self.client = client
        self.report = report

    async def __call__(self, request: ProbeRequest) -> httpx.Response:
        self.report.requests += 1
        return await self.client.request(
            request.method,
            request.path,
            params=request.params,
            headers=request.headers,
            json=request.json_body,
            data=request.form,
        )


def _path_choices(operation: Operation, ids: list[Any]) -> list[dict[str, Any]]:
    names = operation.path_params
    if not names:
        return [{}]
    return [dict.fromkeys(names, value) for value in ids[:_PER_ROUTE]]


async def _seed(
    operations: list[Operation], call: _Caller, values: RequestValues, identifiers: list[Any]
) -> None:
    """Create data as one tenant through its own POST routes, collecting its identifiers."""
    for operation in sorted((o for o in operations if o.method == "post"), key=lambda o: o.path.count("/")):
        for path_ids in _path_choices(operation, identifiers):
            request = build_request(operation, values, None, path_ids)
            response = await call(request)
            if response.is_success:
                for sent in values.sent_ids:
                    if sent not in identifiers:
                        identifiers.append(sent)
                identifiers_in(_json(response), values.is_identifier, identifiers)
            values.sent_ids.clear()


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


async def _snapshot(
    operations: list[Operation], call: _Caller, values: RequestValues, identifiers: list[Any]
) -> list[tuple[ProbeRequest, int, str]]:
    """B's view of its own data: every GET route, each identifier of B in item routes."""
    snapshot = []
    for operation in (o for o in operations if o.method == "get"):
        for path_ids in _path_choices(operation, identifiers):
            request = build_request(operation, values, identifiers, path_ids)
            response = await call(request)
            identifiers_in(_json(response), values.is_identifier, identifiers)
            snapshot.append((request, response.status_code, response.text))
    return snapshot


def _default_client(app: FastAPI, manager: TenancyManager) -> Callable[[Tenant], httpx.AsyncClient]:
    # Imported when called: testing.py imports this module to export `assert_isolated`.
    from .testing import tenant_client

    return lambda tenant: tenant_client(app, tenant, manager=manager, raise_app_exceptions=False)


async def assert_isolated(
    app: FastAPI,
    manager: TenancyManager,
    tenant_a: Tenant | None = None,
    tenant_b: Tenant | None = None,
    *,
    app_metadata: sa.MetaData | None = None,
    skip: Iterable[str] = (),
    skip_excluded: bool = True,
    markers: Iterable[str] = (),
    identifiers: Iterable[Any] = (),
    client: Callable[[Tenant], httpx.AsyncClient] | None = None,
) -> IsolationReport:
    """Fail (`IsolationError`) if tenant A's requests read or change anything of tenant B.

        report = await assert_isolated(app, manager, app_metadata=Base.metadata)

    Works from the app's OpenAPI schema (and starts the manager if needed). Without
    `tenant_a` and `tenant_b` it registers two fresh tenants with the tables of
    `app_metadata` (and, when `schema_template` is set but missing, the template) and
    removes them, with their data, when it is done; tenants you pass must be fresh (the
    seeded integer ids start at 1 in each) and stay yours.

    1. Both tenants create data through their POST routes, with unique marker
       strings in every text field and overlapping integer ids (A first, then B).
    2. B's own GET requests record what B sees (the snapshot); B's markers that
       appear there, and B's identifiers in it, are what A must not reach.
    3. As A: every GET route, then POST, PUT, PATCH and DELETE, with B's
       identifiers in paths and id fields and fresh values elsewhere. Any of B's
       markers in A's responses is a read of B's data.
    4. B's GET requests are replayed: any difference is a change made by A.

    Routes under the `excluded_paths` of the app's `TenancyMiddleware` run as no
    tenant and are left out (`skip_excluded=False` calls them too). `skip` takes
    `"/path"` or `"METHOD /path"` entries, matched by whole path segments like
    `excluded_paths` (`"/admin"` covers `/admin/users/{id}`); an entry that matches no
    route raises a `ProbeWarning`. `markers` and `identifiers` add values of B's data
    you seeded yourself; `client(tenant)` replaces the default
    `tenant_client(app, tenant, manager=manager)` (e.g. for a custom resolver).
    Fails as well when no data of B is visible to B itself, since then nothing
    would be checked. Whether it passes or fails, tenants registered meanwhile whose
    identifier, name or metadata holds a value the probe made up are removed with
    their data too (a sign-up route it called). Returns the report when isolated.
    """
    if (tenant_a is None) != (tenant_b is None):
        raise TypeError("assert_isolated takes both tenants or neither (it then registers two)")
    report = IsolationReport()
    skips = [_Skip.parse(entry) for entry in ([skip] if isinstance(skip, str) else skip)]
    excluded = _excluded_paths(app) if skip_excluded else []
    operations, components, unused = _operations(app, skips, excluded, report)
    for entry in unused:
        warnings.warn(
            f"assert_isolated: skip entry {entry.entry!r} matches no route of the app's OpenAPI schema",
            ProbeWarning,
            stacklevel=2,
        )
    id_names = {name for o in operations for name in o.path_params}
    a_values = RequestValues("a", components, id_names)
    b_values = RequestValues("b", components, id_names)
    await manager.initialize()  # idempotent
    # What the registry held before: only tenants registered during the run are removed.
    registered = {tenant.identifier async for tenant in manager.store.iterate()}
    own: list[str] = []
    async with AsyncExitStack() as template:
        try:
            if tenant_a is None or tenant_b is None:
                # On a fresh test database the `schema_template` they are cloned from may be missing.
                await template.enter_async_context(_template_schema(manager, app_metadata))
                tenant_a = await _register(manager, "a", app_metadata, own)
                tenant_b = await _register(manager, "b", app_metadata, own)
            make_client = client or _default_client(app, manager)
            await _probe(
                operations, make_client, tenant_a, tenant_b, a_values, b_values, report, markers, identifiers
            )
        except BaseException as exc:
            for error in await _remove(manager, own, registered, (a_values, b_values), report):
                exc.add_note(f"assert_isolated could not remove what it made: {error!r}")
            raise
        errors = await _remove(manager, own, registered, (a_values, b_values), report)
        if errors:
            raise errors[0]
    return report


def _template_schema(
    manager: TenancyManager, metadata: sa.MetaData | None
) -> AbstractAsyncContextManager[bool]:
    from .testing import template_schema  # imported when called, as in _default_client

    return template_schema(manager, metadata)


async def _register(
    manager: TenancyManager, role: str, metadata: sa.MetaData | None, own: list[str]
) -> Tenant:
    identifier = f"probe-{role}-{uuid.uuid4().hex[:12]}"
    own.append(identifier)  # before registering: a half-made tenant is removed too
    return await manager.register_tenant(
        identifier, f"assert_isolated tenant {role.upper()}", app_metadata=metadata
    )


async def _remove(
    manager: TenancyManager,
    own: list[str],
    registered: set[str],
    values: tuple[RequestValues, ...],
    report: IsolationReport,
) -> list[Exception]:
    """Remove, with their data, the probe's own tenants and those its requests registered."""
    made_up = set().union(*(v.generated for v in values))
    doomed = list(own)
    async for tenant in manager.store.iterate():
        if tenant.identifier in registered or tenant.identifier in doomed:
            continue
        # Only tenants carrying the probe's values: one registered meanwhile by anything
        # else (another test on this registry) is left alone.
        seen = json.dumps([tenant.identifier, tenant.name, dict(tenant.metadata)], default=str)
        if any(value in seen for value in made_up):
            doomed.append(tenant.identifier)
    errors: list[Exception] = []
    for identifier in doomed:
        try:
            await manager.delete_tenant(identifier, destroy_data=True)
        except TenantNotFoundError:
            continue  # never registered (its registration failed), or removed by the app
        except Exception as exc:  # the others are still removed
            errors.append(exc)
            continue
        report.removed_tenants.append(identifier)
    return errors


async def _probe(
    operations: list[Operation],
    make_client: Callable[[Tenant], httpx.AsyncClient],
    tenant_a: Tenant,
    tenant_b: Tenant,
    a_values: RequestValues,
    b_values: RequestValues,
    report: IsolationReport,
    markers: Iterable[str],
    identifiers: Iterable[Any],
) -> None:
    """Steps 1 to 4 of `assert_isolated`; raises `IsolationError` with what it found."""
    async with make_client(tenant_a) as a_client, make_client(tenant_b) as b_client:
        as_a, as_b = _Caller(a_client, report), _Caller(b_client, report)
        a_ids: list[Any] = []
        b_ids: list[Any] = list(identifiers)
        await _seed(operations, as_a, a_values, a_ids)
        await _seed(operations, as_b, b_values, b_ids)
        before = await _snapshot(operations, as_b, b_values, b_ids)
        seen = "\n".join(text for _, _, text in before)
        b_markers = sorted({m for m in b_values.markers if m in seen and m not in b_ids} | set(markers))
        report.b_markers, report.b_identifiers = b_markers, b_ids
        if not b_markers:
            raise IsolationError(
                "nothing to check: none of tenant B's data is visible through B's own GET routes "
                "(seed B yourself and pass markers=...)",
                report,
            )
        order = {method: rank for rank, method in enumerate(_METHODS)}
        for operation in sorted(operations, key=lambda o: order[o.method]):
            choices = _path_choices(operation, b_ids)
            if choices:  # a route whose path needs an identifier B has not got is not called
                report.routes.append(operation.key)
            for path_ids in choices:
                request = build_request(operation, a_values, b_ids, path_ids)
                response = await as_a(request)
                report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
                sent = json.dumps(
                    [request.params, request.json_body, request.form, request.path], default=str
                )
                leaked = [m for m in b_markers if m in response.text and m not in sent]
                if leaked:
                    report.findings.append(
                        f"{request.describe()} as tenant A returned tenant B's data {leaked[:3]} "
                        f"(status {response.status_code})"
                    )
        for request, status, text in before:
            response = await as_b(request)
            if (response.status_code, response.text) != (status, text):
                report.findings.append(
                    f"tenant B's {request.describe()} changed after tenant A's requests: "
                    f"{status} {text[:200]!r} became {response.status_code} {response.text[:200]!r}"
                )
    if report.findings:
        raise IsolationError(
            "tenant A reached tenant B's data:\n" + "\n".join(f"- {f}" for f in report.findings), report
        )
