"""The console's actions (POST): suspend, activate, delete, move a tenant (and remove the copy a
move left behind); start a fleet upgrade.

Each one goes through the manager's public methods, as code would, inside
`acting_as("console:<operator>")`, so the audit log names who did it; each is refused
without a valid CSRF token (`csrf.py`). A change that works answers with a redirect to
a page (post/redirect/get), one that does not with the page and what went wrong.
"""

import re
from typing import TYPE_CHECKING, Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from ..errors import (
    ConfigurationError,
    FleetBusyError,
    InvalidTransitionError,
    ProvisioningError,
    TenantChangedError,
    TenantInactiveError,
)
from ..events import acting_as
from ..tenant import validate_identifier
from .pages import tenant_page, tiers

if TYPE_CHECKING:
    from .app import Console

__all__ = ["action_routes", "read_form"]

_MAX_FORM = 16 * 1024
# An Alembic revision to upgrade to, as a form may name it: head, an id, branch@id, +2.
_REVISION = re.compile(r"[A-Za-z0-9+][A-Za-z0-9_@:+.-]{0,63}")
# What a refused change says: the reason is the operator's to read (and is escaped).
_CONFLICTS = (
    InvalidTransitionError,
    TenantChangedError,
    TenantInactiveError,
    ConfigurationError,
    ProvisioningError,
)


async def read_form(request: Request) -> dict[str, str]:
    """The fields of a URL-encoded form (the first value of each), at most 16 KiB of it."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "expected a form (application/x-www-form-urlencoded)")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM:
            raise HTTPException(413, "form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=20)
    return {name: values[0] for name, values in fields.items()}


def action_routes(console: "Console") -> APIRouter:
    router = APIRouter()
    manager = console.manager
    Operator = Annotated[str, Depends(console.operator)]

    async def checked(request: Request, operator: str) -> dict[str, str]:
        form = await read_form(request)
        problem = console.csrf.problem(request, form.get("csrf", ""), operator)
        if problem is not None:
            raise HTTPException(403, f"Refused: {problem}.")
        return form

    def to_tenant(request: Request, identifier: str, done: str) -> Response:
        base = request.scope.get("root_path", "")
        return RedirectResponse(f"{base}/tenants/{identifier}?done={done}", status_code=303)

    async def refused(
        request: Request, operator: str, identifier: str, exc: Exception, confirm: str = ""
    ) -> Response:
        return await tenant_page(
            console, request, operator, identifier, error=str(exc), status_code=409, confirm=confirm
        )

    @router.post("/tenants/{identifier}/suspend")
    async def suspend(request: Request, identifier: str, who: Operator) -> Response:
        await checked(request, who)
        validate_identifier(identifier)
        try:
            with acting_as(f"console:{who}"):
                await manager.suspend_tenant(identifier)
        except _CONFLICTS as exc:
            return await refused(request, who, identifier, exc)
        return to_tenant(request, identifier, "suspended")

    @router.post("/tenants/{identifier}/activate")
    async def activate(request: Request, identifier: str, who: Operator) -> Response:
        await checked(request, who)
        validate_identifier(identifier)
        try:
            with acting_as(f"console:{who}"):
                await manager.activate_tenant(identifier)
        except _CONFLICTS as exc:
            return await refused(request, who, identifier, exc)
        return to_tenant(request, identifier, "activated")

    @router.post("/tenants/{identifier}/delete")
    async def delete(request: Request, identifier: str, who: Operator) -> Response:
        form = await checked(request, who)
        validate_identifier(identifier)
        typed = form.get("confirm", "").strip()
        if typed != identifier:
            # The browser checks the same (pattern=) before sending; this is the rule.
            error = ValueError(f"Not deleted: type the identifier {identifier} exactly to confirm.")
            return await refused(request, who, identifier, error, confirm=typed)
        destroy = form.get("destroy") == "yes"
        try:
            with acting_as(f"console:{who}"):
                await manager.delete_tenant(identifier, destroy_data=destroy)
        except _CONFLICTS as exc:
            return await refused(request, who, identifier, exc)
        base = request.scope.get("root_path", "")
        if destroy:
            return RedirectResponse(f"{base}/tenants?done=purged", status_code=303)
        return to_tenant(request, identifier, "deleted")

    @router.post("/tenants/{identifier}/move")
    async def move(request: Request, identifier: str, who: Operator) -> Response:
        form = await checked(request, who)
        validate_identifier(identifier)
        tier = form.get("tier", "")
        if console.app_metadata is None or tier not in tiers(console):
            raise HTTPException(
                400, "moving needs hybrid isolation, the console's app_metadata and a known tier"
            )
        try:
            with acting_as(f"console:{who}"):
                await manager.move_tenant(identifier, tier, app_metadata=console.app_metadata)
        except _CONFLICTS as exc:
            return await refused(request, who, identifier, exc)
        return to_tenant(request, identifier, "moved")

    @router.post("/tenants/{identifier}/remove-old-copy")
    async def remove_old_copy(request: Request, identifier: str, who: Operator) -> Response:
        form = await checked(request, who)
        validate_identifier(identifier)
        if not tiers(console):
            raise HTTPException(400, "only hybrid isolation keeps an old copy after a move")
        if form.get("confirm") != "yes":
            error = ValueError("Not removed: tick the box to confirm.")
            return await refused(request, who, identifier, error)
        try:
            with acting_as(f"console:{who}"):
                await manager.remove_old_copy(identifier)
        except _CONFLICTS as exc:
            return await refused(request, who, identifier, exc)
        return to_tenant(request, identifier, "old-copy-removed")

    @router.post("/fleet/upgrade")
    async def upgrade(request: Request, who: Operator) -> Response:
        form = await checked(request, who)
        target = form.get("target", "head").strip() or "head"
        if _REVISION.fullmatch(target) is None:
            raise HTTPException(400, "target: an Alembic revision (head, an id, ...)")
        canary = _number(form.get("canary", "0"), "canary", 0, 10_000)
        concurrency = _number(form.get("concurrency", "2"), "concurrency", 1, 32)
        problem = console.fleet.unavailable()
        if problem is not None:
            raise HTTPException(409, problem)
        if await console.fleet.in_progress():
            raise HTTPException(
                409, "A fleet migration is running against this database; wait for it to end."
            )
        try:
            console.fleet.start(f"console:{who}", target=target, canary=canary, concurrency=concurrency)
        except FleetBusyError as exc:
            raise HTTPException(409, str(exc)) from None
        base = request.scope.get("root_path", "")
        return RedirectResponse(f"{base}/fleet?done=started", status_code=303)

    return router


def _number(value: str, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise HTTPException(400, f"{name}: a whole number") from None
    if not low <= number <= high:
        raise HTTPException(400, f"{name}: from {low} to {high}")
    return number
