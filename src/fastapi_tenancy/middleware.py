"""`TenancyMiddleware`: resolves the tenant of every HTTP and WebSocket request."""

import json
import logging
from collections.abc import Iterable

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._utils import is_outage, is_query_timeout, is_result_type_change
from .context import reset_current_tenant, set_current_tenant
from .errors import TenancyError, TenancyUnavailableError
from .manager import TenancyManager

__all__ = ["TenancyMiddleware", "path_covers", "release_when_response_is_ready"]

logger = logging.getLogger("fastapi_tenancy")

# Where a request's tenant sessions wait for its response (the ASGI scope's "state").
_SESSIONS = "fastapi_tenancy.sessions"
# The messages that end an HTTP response when they carry no `more_body`.
_LAST_MESSAGES = frozenset({"http.response.body", "http.response.pathsend", "http.response.zerocopysend"})

# WebSocket close codes for refused connections (RFC 6455): policy violation, or
# "try again later" when the backend is down.
_WS_POLICY_VIOLATION = 1008
_WS_TRY_AGAIN_LATER = 1013


class TenancyMiddleware:
    """Pure ASGI middleware: every request runs as exactly one active tenant, or is refused.

    Shared by all requests; per-request state lives in the ASGI scope
    (`request.state.tenant`) and a ContextVar, reset when the request ends.

    - `excluded_paths` skip resolution, matched by whole path segments
      (`/health` covers `/health` and `/health/live`, not `/healthz`).
    - FastAPI's docs and OpenAPI URLs are excluded too unless `exclude_docs=False`.
    - Refusals are JSON: 400 `{"detail": "Tenant identifier missing"}`,
      404 `{"detail": "Tenant not found"}`, 403 `{"detail": "Tenant is not active
      (status: suspended)"}`, 429 `{"detail": "Rate limit exceeded for tenant acme"}`
      with `Retry-After` when the manager's rate limiter says so (admitted
      responses carry the `RateLimit-*` headers), 503 when the registry, the
      database or a fail-closed limiter is unreachable (`{"detail": "Database query timed
      out"}` when `statement_timeout` cancels a query).
      Tenancy errors and database outages raised by the app before its response
      starts get the same treatment, on excluded paths too.
    - The sessions of `make_tenant_db_dependency` are closed, and their connections
      given back to the pool, when the response is ready: before its last (for most
      responses, its only) body message is sent, not after the client has read it. A refused WebSocket
      handshake gets the same HTTP response where the server supports the ASGI
      "websocket.http.response" extension, else a close with code 1008 (1013 for 503).

        app.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/health"])
    """

    def __init__(
        self,
        app: ASGIApp,
        manager: TenancyManager,
        excluded_paths: Iterable[str] = (),
        *,
        exclude_docs: bool = True,
    ) -> None:
        self.app = app
        self.manager = manager
        self.excluded_paths = tuple(sorted({_normalise(p) for p in excluded_paths}))
        self.exclude_docs = exclude_docs
        self._docs_paths: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self._excluded(scope):
            # Explicitly no tenant, whatever the task inherited: uvicorn on the asyncio loop
            # starts a pipelined request's task inside the previous request's context, while
            # that request's tenant is still set (CPython gh-140947, uvicorn #2167).
            token = set_current_tenant(None)
            try:
                await _call(self.app, scope, receive, send)
            finally:
                reset_current_tenant(token)
            return
        limiter = self.manager.rate_limiter
        try:
            tenant = await self.manager.resolve(HTTPConnection(scope))
            # Right after resolution: a refused request costs no app work at all.
            decision = None if limiter is None else await limiter.check(tenant)
        except TenancyError as exc:
            await _refuse(scope, send, exc)
            return
        # The strategy may show the app a rewritten scope (the path strategy moves the
        # tenant's segment into root_path); every other strategy hands it on as is.
        scope = self.manager.resolver.app_scope(scope)
        if decision is not None and scope["type"] == "http":
            send = _with_headers(send, decision.headers())
        scope.setdefault("state", {})["tenant"] = tenant
        token = set_current_tenant(tenant)
        try:
            await _call(self.app, scope, receive, send)
        finally:
            reset_current_tenant(token)

    def _excluded(self, scope: Scope) -> bool:
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :] or "/"
        if self.exclude_docs and path in self._docs(scope):
            return True
        return any(path_covers(excluded, path) for excluded in self.excluded_paths)

    def _docs(self, scope: Scope) -> frozenset[str]:
        if self._docs_paths is None:
            # The FastAPI app puts itself in the scope; read its real docs URLs once.
            app = scope.get("app")
            urls = [
                getattr(app, attr, default)
                for attr, default in (
                    ("docs_url", "/docs"),
                    ("redoc_url", "/redoc"),
                    ("openapi_url", "/openapi.json"),
                    ("swagger_ui_oauth2_redirect_url", "/docs/oauth2-redirect"),
                )
            ]
            self._docs_paths = frozenset(url for url in urls if isinstance(url, str) and url)
        return self._docs_paths


def _with_headers(send: Send, extra: dict[str, str]) -> Send:
    """`send` that adds `extra` headers to the response start."""
    encoded = [(name.lower().encode(), value.encode()) for name, value in extra.items()]

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *encoded]}
        await send(message)

    return send_with_headers


def path_covers(prefix: str, path: str) -> bool:
    """Whether `prefix` covers `path` by whole segments, as `excluded_paths` do.

    `/health` covers `/health` and `/health/live`, not `/healthz`; `/` covers nothing
    but itself. `prefix` is normalised (no trailing `/`).
    """
    return path == prefix or (prefix != "/" and path.startswith(prefix + "/"))


def _normalise(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"excluded path {path!r} must start with '/'")
    return path.rstrip("/") or "/"


def release_when_response_is_ready(scope: Scope, session: AsyncSession) -> None:
    """Close `session` once the response of the HTTP request `scope` is ready to send.

    The connection goes back to the pool before the response travels to the client:
    a `yield` dependency would otherwise hold it until the client has read the whole
    response, so that once clients outnumber the pool, requests also wait on each
    other's network writes. A streaming response releases it before its last chunk.
    Without `TenancyMiddleware` nothing happens early (the dependency's exit closes it).
    """
    if scope["type"] == "http":
        scope.setdefault("state", {}).setdefault(_SESSIONS, []).append(session)


async def _release(scope: Scope) -> None:
    sessions = scope.get("state", {}).pop(_SESSIONS, None)
    for session in sessions or ():
        try:
            # Rolls back what the route left uncommitted, as the dependency's exit would.
            await session.close()
        except Exception:  # the response is ready: send it; the pool drops a broken connection
            logger.warning("closing a tenant session before its response failed", exc_info=True)


async def _call(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run the app; a tenancy error or a database outage before the response starts is refused."""
    started = False

    async def send_tracking(message: Message) -> None:
        nonlocal started
        started = True
        if message["type"] in _LAST_MESSAGES and not message.get("more_body", False):
            await _release(scope)
        await send(message)

    try:
        await app(scope, receive, send_tracking)
    except TenancyError as exc:
        if started:
            raise
        await _refuse(scope, send, exc)
    except Exception as exc:
        if started:
            raise
        if is_outage(exc):
            await _refuse(scope, send, TenancyUnavailableError(f"database unavailable: {type(exc).__name__}"))
        elif is_query_timeout(exc):
            # Retryable like an outage, but told apart from "no connection to be had".
            error = TenancyUnavailableError("database query timed out", detail="Database query timed out")
            await _refuse(scope, send, error)
        elif is_result_type_change(exc):
            # The driver dropped its cached statements: a retry succeeds.
            await _refuse(scope, send, TenancyUnavailableError("tables changed under a cached statement"))
        else:
            raise


async def _refuse(scope: Scope, send: Send, exc: TenancyError) -> None:
    # json.dumps' default separators give exactly the documented bodies,
    # e.g. {"detail": "Tenant not found"}.
    body = json.dumps({"detail": exc.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.status_code == 503:
        headers.append((b"retry-after", b"1"))
    headers.extend(
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in exc.headers.items()
    )
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif "websocket.http.response" in scope.get("extensions", {}):
        # The server can answer the handshake with a real HTTP response: the same JSON.
        await send({"type": "websocket.http.response.start", "status": exc.status_code, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        # Otherwise close before accepting (servers turn this into an HTTP 403).
        code = _WS_TRY_AGAIN_LATER if exc.status_code == 503 else _WS_POLICY_VIOLATION
        await send({"type": "websocket.close", "code": code, "reason": exc.detail})
