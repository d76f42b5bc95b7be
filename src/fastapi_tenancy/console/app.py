"""`Console`: the operator console as an ASGI app, and what guards every one of its pages.

Needs Jinja2 (`pip install 'fastapi-tenancy[console]'`), imported here only.
"""

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from ..errors import ConfigurationError, MissingDependencyError, TenancyError
from ..manager import TenancyManager
from ..tenant import Tenant
from .csrf import CSRFGuard
from .fleet import FleetConsole

try:
    import jinja2
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("jinja2", "console") from exc

if TYPE_CHECKING:  # prometheus-client, an extra of its own
    from ..metrics import TenantMetrics
    from .traffic import TrafficSampler

__all__ = ["Console", "OperatorAuth"]

logger = logging.getLogger("fastapi_tenancy.console")

HERE = Path(__file__).parent

# Where the operator dependency leaves the name, for the error pages.
_OPERATOR = "fastapi_tenancy.console.operator"

OperatorAuth = Callable[..., Any]
"""A FastAPI dependency that returns the operator's name (a non-empty `str`), or raises
`HTTPException` (401, 403) for anyone else."""

# Every console response: no script may run (the pages have none), nothing is framed
# (the actions are buttons), forms post only here, and operational data is not cached.
_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class Console:
    """The operator console: the registry, the fleet, the traffic and `doctor`. Shared by all requests.

        app.mount("/_tenancy", manager.console(auth=require_operator))

    An ASGI app; `manager.console(...)` builds one. `auth` is required: a FastAPI
    dependency (with sub-dependencies of its own, such as `HTTPBasic` or your session)
    that returns the operator's name, which every change is audited under (as
    `console:<name>`), and refuses everyone else. Every page and action depends on it.

    `metrics` (a `TenantMetrics`) feeds the traffic page; `app_metadata` (your tables)
    lets operators move tenants between tiers (hybrid isolation); `alembic_config`
    (default: the setting) lets them start fleet upgrades. `csrf_secret` binds the forms'
    tokens to the operator (give every worker the same one). The console reads the
    registry and operational tables only, and never opens a tenant's session.
    """

    def __init__(
        self,
        manager: TenancyManager,
        *,
        auth: OperatorAuth | None,
        metrics: "TenantMetrics | None" = None,
        app_metadata: sa.MetaData | None = None,
        alembic_config: str | Path | None = None,
        csrf_secret: str | bytes | None = None,
        title: str = "fastapi-tenancy",
        page_size: int = 50,
        scan_limit: int = 20_000,
        traffic_interval: float = 10.0,
        traffic_history: int = 360,
    ) -> None:
        # Refused here, at mount time, so that an unguarded console is never served.
        if auth is None:
            raise ConfigurationError(
                "manager.console() needs auth=: a FastAPI dependency that returns the operator's "
                "name and refuses everyone else (the console is never served without one)"
            )
        if not callable(auth):
            raise ConfigurationError(
                f"auth must be a FastAPI dependency (a callable), not {type(auth).__name__}"
            )
        if not 1 <= page_size <= scan_limit:
            raise ConfigurationError("page_size must be at least 1 and at most scan_limit")
        self.manager = manager
        self.auth = auth
        self.metrics = metrics
        self.app_metadata = app_metadata
        self.title = title
        self.page_size = page_size
        self.scan_limit = scan_limit
        self.csrf = CSRFGuard(csrf_secret)
        self.fleet = FleetConsole(manager, alembic_config)
        self.traffic: TrafficSampler | None = None
        if metrics is not None:
            from .traffic import TrafficSampler as Sampler  # noqa: PLC0415 - prometheus-client, there with metrics

            self.traffic = Sampler(metrics, interval=traffic_interval, history=traffic_history)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            # Every value is escaped unless a template says otherwise (none does):
            # tenant names, metadata and error texts are whatever someone typed.
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters["when"] = _when
        self.operator = _operator_dependency(auth)
        self.app = self._build()

    def _build(self) -> FastAPI:
        from .actions import action_routes  # noqa: PLC0415 - they import this module
        from .pages import page_routes  # noqa: PLC0415

        app = FastAPI(title=self.title, docs_url=None, redoc_url=None, openapi_url=None, lifespan=None)
        app.include_router(page_routes(self))
        app.include_router(action_routes(self))

        @app.exception_handler(TenancyError)
        async def tenancy_error(request: Request, exc: TenancyError) -> Response:
            status_code = exc.status_code if exc.status_code >= 400 else 500
            operator = request.scope.get(_OPERATOR)
            if not operator:  # raised before (or by) auth: the public detail only
                return PlainTextResponse(exc.detail, status_code=status_code)
            return self.render(
                request,
                operator,
                "error.html",
                status_code=status_code,
                page_title="Error",
                section="",
                error=str(exc),
            )

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
            operator = request.scope.get(_OPERATOR)
            if not operator:  # auth's own answer (401 with its challenge, 403), as it made it
                return await http_exception_handler(request, exc)
            return self.render(
                request,
                operator,
                "error.html",
                status_code=exc.status_code,
                page_title="Error",
                section="",
                error=str(exc.detail),
            )

        return app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if isinstance(scope.get("state", {}).get("tenant"), Tenant):
                # Mounted where TenancyMiddleware resolves a tenant: keep the console off the
                # tenants' request path (and say how) rather than serve it as one of them.
                await _refuse_inside_tenant(send)
                return
            if self.traffic is not None:
                self.traffic.start()
            send = _with_headers(send)
        await self.app(scope, receive, send)

    async def close(self) -> None:
        """Stop sampling traffic and cancel this process's fleet run (the next one resumes it)."""
        if self.traffic is not None:
            await self.traffic.stop()
        await self.fleet.close()

    def render(
        self, request: Request, operator: str, template: str, *, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        """A page: `template` with the layout's context (operator, form token, the console's base URL)."""
        nonce, new = self.csrf.nonce(request)
        context.setdefault("message", None)
        context.setdefault("error", None)
        context.setdefault("refresh", None)
        html = self.templates.get_template(template).render(
            base=request.scope.get("root_path", ""),
            operator=operator,
            csrf=self.csrf.token(nonce, operator),
            title=self.title,
            **context,
        )
        response = HTMLResponse(html, status_code=status_code)
        if new:
            self.csrf.set_cookie(response, request, nonce)
        return response


def _operator_dependency(auth: OperatorAuth) -> Callable[..., Any]:
    async def operator(request: Request, identity: Annotated[Any, Depends(auth)]) -> str:
        if identity is None or identity == "" or identity is False:
            raise HTTPException(403, "Not an operator")
        if not isinstance(identity, str) or not identity.strip():
            raise TypeError(
                "the console's auth dependency must return the operator's name (a str), "
                f"not {type(identity).__name__}"
            )
        name = identity.strip()[:200]
        request.scope[_OPERATOR] = name
        return name

    return operator


def _when(value: datetime | float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value).astimezone()
    return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _with_headers(send: Send) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *_HEADERS]}
        await send(message)

    return send_with_headers


async def _refuse_inside_tenant(send: Send) -> None:
    body = (
        b"The operator console does not run inside a tenant's request: add its path to "
        b"TenancyMiddleware's excluded_paths, or mount it beside the app."
    )
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": body})
