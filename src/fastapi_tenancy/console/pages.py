"""The console's pages (GET): tenants, one tenant, the fleet, a run, revisions, traffic, doctor.

Each reads the registry and operational tables through the manager; none opens a
tenant's session, so none can show a tenant's own data.
"""

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from ..audit import SQLAuditWriter
from ..doctor import run_checks
from ..errors import TenantNotFoundError
from ..tenant import Tenant, TenantStatus, thaw, validate_identifier
from .search import TenantFilter, search_tenants, server_of

if TYPE_CHECKING:
    from .app import Console

__all__ = ["DONE", "page_routes", "tenant_page"]

# What a redirect after an action says, by a fixed key: a query string carries no text
# of its own into a page.
DONE = {
    "suspended": "Suspended: the application refuses this tenant's requests (403) until it is activated.",
    "activated": "Activated: the application serves this tenant again.",
    "deleted": "Deleted. Its data is kept and its identifier reserved until it is purged.",
    "purged": "Deleted with all of its data.",
    "moved": "Moved to its new tier. The old copy is kept until it is removed.",
    "old-copy-removed": "The copy a move left in another tier is removed.",
    "started": "Fleet upgrade started.",
}

# A fleet run's outcomes per tenant (migrations.results.Outcome, without importing Alembic).
_OUTCOMES = ("ok", "failed", "skipped")
_TIERS = ("schema", "database", "rls")


def tiers(console: "Console") -> list[str]:
    """The tiers tenants can be in (hybrid isolation), else none."""
    return list(_TIERS) if console.manager.config.isolation_strategy == "hybrid" else []


def page_routes(console: "Console") -> APIRouter:
    router = APIRouter()
    manager = console.manager
    Operator = Annotated[str, Depends(console.operator)]

    @router.get("/")
    async def home(request: Request, who: Operator) -> Response:
        return RedirectResponse(request.scope.get("root_path", "") + "/tenants", status_code=303)

    @router.get("/static/console.css")
    async def stylesheet(who: Operator) -> Response:
        return Response(_STATIC["console.css"], media_type="text/css")

    @router.get("/static/icon.svg")
    async def icon(who: Operator) -> Response:
        # Named by every page, so that the browser does not ask the app for /favicon.ico.
        return Response(_STATIC["icon.svg"], media_type="image/svg+xml")

    @router.get("/tenants")
    async def tenants(request: Request, who: Operator) -> Response:
        params = request.query_params
        where = TenantFilter(
            text=params.get("q", "").strip()[:100],
            status=_status(params.get("status")),
            tier=params.get("tier", "")[:32],
            plan=params.get("plan", "")[:100],
            server=params.get("server", "")[:200],
        )
        after = params.get("after") or None
        if after is not None and len(after) > 200:
            raise HTTPException(400, "after is too long")
        page = await search_tenants(
            manager, where, after=after, page_size=console.page_size, scan_limit=console.scan_limit
        )
        counts = {status.value: await manager.store.count(status=status) for status in TenantStatus}
        filters = {
            "q": where.text,
            "status": "" if where.status is None else where.status.value,
            "tier": where.tier,
            "plan": where.plan,
            "server": where.server,
        }
        kept = {key: value for key, value in filters.items() if value}
        plans = sorted({*manager.config.rate_limit_plans, *manager.config.hybrid_plan_tiers})
        return console.render(
            request,
            who,
            "tenants.html",
            page_title="Tenants",
            section="tenants",
            message=DONE.get(params.get("done", "")),
            page=page,
            after=after,
            filters=filters,
            counts=counts,
            total=sum(counts.values()),
            statuses=[status.value for status in TenantStatus],
            tiers=tiers(console),
            plans=plans,
            # Tenants live on several servers only with a database each (or a hybrid tier of them).
            servers=manager.config.isolation_strategy in ("database", "hybrid"),
            filtered=bool(kept),
            show_tier=bool(tiers(console)) or any(tenant.tier for tenant in page.tenants),
            next_query=urlencode({**kept, "after": page.after}) if page.after else None,
            first_query=urlencode(kept),
        )

    @router.get("/tenants/{identifier}")
    async def tenant(request: Request, identifier: str, who: Operator) -> Response:
        return await tenant_page(
            console, request, who, identifier, message=DONE.get(request.query_params.get("done", ""))
        )

    @router.get("/fleet")
    async def fleet(request: Request, who: Operator) -> Response:
        problem = console.fleet.unavailable()
        runs = await console.fleet.runs(10)
        live = await console.fleet.in_progress()
        job = console.fleet.job
        return console.render(
            request,
            who,
            "fleet.html",
            page_title="Fleet migrations",
            section="fleet",
            message=DONE.get(request.query_params.get("done", "")),
            problem=problem,
            runs=runs,
            live=live,
            job=job,
            refresh=3 if live or console.fleet.running else None,
        )

    @router.get("/fleet/revisions")
    async def revisions(request: Request, who: Operator) -> Response:
        problem = console.fleet.unavailable()
        rows = [] if problem else await console.fleet.revisions()
        by_revision = Counter(
            ("none" if row.versions is None else ",".join(row.versions), row.at_target) for row in rows
        )
        behind = [row for row in rows if not row.at_target]
        return console.render(
            request,
            who,
            "revisions.html",
            page_title="Revisions",
            section="fleet",
            problem=problem,
            total=len(rows),
            by_revision=sorted(by_revision.items(), key=lambda item: (item[0][1], -item[1])),
            behind=behind[:200],
            behind_count=len(behind),
        )

    @router.get("/fleet/runs/{run_id}")
    async def run(request: Request, run_id: str, who: Operator) -> Response:
        if not (0 < len(run_id) <= 64 and run_id.isalnum()):
            raise HTTPException(404, "No such run")
        found = await console.fleet.run(run_id)
        if found is None:
            raise HTTPException(404, "No such run")
        params = request.query_params
        status = params.get("status") or None
        if status is not None and status not in _OUTCOMES:
            raise HTTPException(400, f"status must be one of {', '.join(_OUTCOMES)}")
        after = params.get("after") or None
        results = await console.fleet.results(run_id, status=status, after=after, limit=200)
        live = found.status == "running" and await console.fleet.in_progress()
        next_after = results[-1].tenant if len(results) == 200 else None
        job = console.fleet.job
        planned = job.planned if job is not None and job.run_id in (None, run_id) and live else None
        return console.render(
            request,
            who,
            "run.html",
            page_title=f"Run {run_id[:8]}",
            section="fleet",
            run=found,
            results=results,
            status=status,
            outcomes=_OUTCOMES,
            live=live,
            planned=planned,
            next_query=urlencode({"status": status or "", "after": next_after}) if next_after else None,
            refresh=3 if live else None,
        )

    @router.get("/traffic")
    async def traffic(request: Request, who: Operator) -> Response:
        sampler = console.traffic
        rows, charts = [], []
        if sampler is not None:
            sampler.sample()
            rows = sampler.rows()
            # Tenants only: requests of no tenant (refusals, excluded paths such as this
            # console) stay in the table.
            busiest = [row.label for row in rows if row.totals.requests and not row.anonymous][:5]
            charts = sampler.charts(busiest) if busiest and len(sampler.samples) > 1 else []
        limiter = manager.rate_limiter
        return console.render(
            request,
            who,
            "traffic.html",
            page_title="Traffic",
            section="traffic",
            enabled=sampler is not None,
            counts_refusals=limiter is None or bool(limiter.on_refused),
            interval=None if sampler is None else sampler.interval,
            samples=0 if sampler is None else len(sampler.samples),
            rows=rows,
            charts=charts,
            geometry=None if sampler is None else sampler.geometry,
            refresh=None if sampler is None else max(int(sampler.interval), 5),
        )

    @router.get("/doctor")
    async def doctor(request: Request, who: Operator) -> Response:
        results = await run_checks(manager)
        return console.render(
            request,
            who,
            "doctor.html",
            page_title="Doctor",
            section="doctor",
            results=results,
            failed=sum(r.status == "fail" for r in results),
            warned=sum(r.status == "warn" for r in results),
        )

    return router


async def tenant_page(
    console: "Console",
    request: Request,
    operator: str,
    identifier: str,
    *,
    message: str | None = None,
    error: str | None = None,
    status_code: int = 200,
    confirm: str = "",
) -> Response:
    """One tenant: its record, where it lives, its quota and traffic, its history and the actions."""
    manager = console.manager
    try:
        validate_identifier(identifier)
    except ValueError:
        raise TenantNotFoundError(f"no tenant {identifier!r:.80}") from None
    tenant = await manager.get_tenant(identifier)
    limiter = manager.rate_limiter
    limits = usage = None
    if limiter is not None:
        limits = limiter.limits(tenant)
        usage = await limiter.usage(tenant)
    audit = manager.events.audit
    history = (
        await audit.entries(tenant_id=tenant.id, limit=50) if isinstance(audit, SQLAuditWriter) else None
    )
    charts = []
    sampler = console.traffic
    if sampler is not None and len(sampler.samples) > 1 and identifier in sampler.samples[-1][1]:
        charts = sampler.charts([identifier])
    return console.render(
        request,
        operator,
        "tenant.html",
        status_code=status_code,
        page_title=tenant.name,
        section="tenants",
        message=message,
        error=error,
        tenant=tenant,
        facts=_facts(console, tenant),
        revision=await _revision(console, tenant),
        metadata=json.dumps(thaw(tenant.metadata), indent=2, sort_keys=True, ensure_ascii=False),
        limits=limits,
        usage=usage,
        history=history,
        charts=charts,
        geometry=None if sampler is None else sampler.geometry,
        tiers=[tier for tier in tiers(console) if tier != tenant.tier]
        if console.app_metadata is not None
        else [],
        hybrid=bool(tiers(console)),
        confirm=confirm,
    )


def _facts(console: "Console", tenant: Tenant) -> list[tuple[str, str]]:
    """Where the tenant's data lives: its storage and, if it has one, its own server."""
    isolation = console.manager.isolation
    facts = []
    try:
        storage = isolation.expected_storage(tenant)
        if storage is not None:
            facts.append(("Storage", f"{storage[0]} {storage[1]}"))
        url = isolation.migration_url(tenant)
        if url is not None:
            facts.append(("Server", f"{server_of(console.manager, tenant)}, database {url.database or ''}"))
    except Exception as exc:  # a tenant with no known tier, an undecryptable URL: say so
        facts.append(("Storage", f"unknown ({type(exc).__name__}: {exc})"))
    return facts


async def _revision(console: "Console", tenant: Tenant) -> str | None:
    if console.fleet.unavailable() is not None or tenant.status is TenantStatus.DELETED:
        return None
    try:
        rows = await console.fleet.revisions([tenant.identifier])
    except Exception as exc:  # the page stands without it
        return f"unknown ({type(exc).__name__})"
    for row in rows:
        if row.tenant == tenant.identifier:
            label = "none (never migrated)" if row.versions is None else ", ".join(row.versions)
            return f"{label} (at head)" if row.at_target else label
    return "shared tables (row-level security)" if rows else None


def _status(value: str | None) -> TenantStatus | None:
    if not value:
        return None
    try:
        return TenantStatus(value)
    except ValueError:
        raise HTTPException(
            400, f"unknown status; one of {', '.join(s.value for s in TenantStatus)}"
        ) from None


_STATIC = {
    name: (Path(__file__).parent / "static" / name).read_bytes() for name in ("console.css", "icon.svg")
}
