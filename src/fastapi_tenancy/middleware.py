"""`TenancyMiddleware`: resolves the tenant of every HTTP and WebSocket request."""

import asyncio
import json
import logging
from collections.abc import Callable, Iterable

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._utils import is_outage, is_query_timeout, is_result_type_change, path_covers, path_prefixes
from .concurrency import TenantConcurrencyGate
from .context import _current as _current_tenant  # the ContextVar itself: no call per request
from .errors import TenancyError, TenancyUnavailableError
from .manager import TenancyManager
from .openapi import tenant_openapi
from .tenant import Tenant

__all__ = ["TenancyMiddleware", "close_with_request", "path_covers"]

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
    - The app's `/openapi.json` shows how to name the tenant on every tenant route
      (`fastapi_tenancy.openapi.tenant_openapi`), so `/docs` can call them; `openapi=False`
      serves the app's schema as it is.
    - Refusals are JSON: 400 `{"detail": "Tenant identifier missing"}`,
      404 `{"detail": "Tenant not found"}`, 403 `{"detail": "Tenant is not active
      (status: suspended)"}`, 429 `{"detail": "Rate limit exceeded for tenant acme"}`
      with `Retry-After` when the manager's rate limiter says so (admitted
      responses carry the `RateLimit-*` headers), 429 `{"detail": "Too many concurrent
      requests for tenant acme"}` when `tenant_max_concurrent_requests` of its requests
      are in flight and none ends within `tenant_concurrency_wait`, 503 with `Retry-After` and the
      configured `maintenance_message` for a tenant in maintenance, 503 when the registry, the
      database or a fail-closed limiter is unreachable (`{"detail": "Database query timed
      out"}` when `statement_timeout` cancels a query).
      Tenancy errors and database outages raised by the app before its response
      starts get the same treatment, on excluded paths too.
    - The sessions of `make_tenant_db_dependency` are closed, and their connections
      given back to the pool, when the response is ready: before its last (for most
      responses, its only) body message is sent, not after the client has read it (its
      docstring names the routes that keep them longer). A refused WebSocket
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
        openapi: bool = True,
    ) -> None:
        self.app = app
        self.manager = manager
        self.excluded_paths = path_prefixes(excluded_paths)
        # The same test as `path_covers` over every prefix, as two C-level checks per request.
        self._excluded_exact = frozenset(self.excluded_paths)
        self._excluded_under = tuple(prefix + "/" for prefix in self.excluded_paths if prefix != "/")
        self.exclude_docs = exclude_docs
        self.openapi = openapi
        self._docs_paths: frozenset[str] | None = None
        self._openapi_url: str | None = None
        # The app's last schema body and what it became: shared by all requests, and
        # replaced whole (one assignment), so a request reads one pair or the other.
        self._documented: tuple[bytes, bytes] | None = None
        config = manager.config
        cap = config.tenant_max_concurrent_requests
        self._gate = None if cap is None else TenantConcurrencyGate(cap, config.tenant_concurrency_wait)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if scope.get("root_path"):
            path = _route_path(scope)
        docs = self._docs_paths
        if docs is None:
            docs = self._docs(scope)
        if self.openapi and path == self._openapi_url and kind == "http":
            send = _with_body(send, self._document)
            # A compressing middleware inside this one would hide the JSON from us; one
            # outside it still compresses what we send.
            headers = [header for header in scope["headers"] if header[0] != b"accept-encoding"]
            scope = {**scope, "headers": headers}
        gate = None
        tenant: Tenant | None
        if (
            (self.exclude_docs and path in docs)
            or path in self._excluded_exact
            or path.startswith(self._excluded_under)
        ):
            # Explicitly no tenant, whatever the task inherited: uvicorn on the asyncio loop
            # starts a pipelined request's task inside the previous request's context, while
            # that request's tenant is still set (CPython gh-140947, uvicorn #2167).
            tenant = None
        else:
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
            if decision is not None and kind == "http":
                send = _with_headers(send, decision.headers())
            gate = self._gate if kind == "http" else None
            if gate is not None:
                try:
                    await gate.acquire(tenant)
                except TenancyError as exc:
                    await _refuse(scope, send, exc)
                    return
        # The tenant sessions of this request (`close_with_request`): (session, early).
        sessions: list[tuple[AsyncSession, bool]] = []
        if tenant is not None:
            state = scope.setdefault("state", {})
            state["tenant"] = tenant
            state[_SESSIONS] = sessions
        started = False

        # One frame for the whole request (no helper coroutine between this one and the
        # app): every await of the app resumes through each frame above it.
        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = True
            if sessions and message["type"] in _LAST_MESSAGES and not message.get("more_body", False):
                await _close(sessions, early_only=True)
            await send(message)

        token = _current_tenant.set(tenant)
        try:
            await self.app(scope, receive, send_tracking)
        except TenancyError as exc:
            if started:
                raise
            await _refuse(scope, send, exc)
        except Exception as exc:
            if started:
                raise
            error = _unavailable(exc)
            if error is None:
                raise
            await _refuse(scope, send, error)
        finally:
            if sessions:
                # What the response did not release: sessions that a yield dependency
                # still used after it, a WebSocket's, or those of a request that failed.
                await _close(sessions, early_only=False)
            _current_tenant.reset(token)
            if gate is not None and tenant is not None:
                gate.release(tenant)

    def _docs(self, scope: Scope) -> frozenset[str]:
        if self._docs_paths is None:
            # The FastAPI app puts itself in the scope; read its real docs URLs once.
            app = scope.get("app")
            openapi_url = getattr(app, "openapi_url", None)
            self._openapi_url = openapi_url if isinstance(openapi_url, str) and openapi_url else None
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

    def _document(self, body: bytes) -> bytes:
        """The app's OpenAPI JSON with the tenant on every tenant route (the same body: once)."""
        documented = self._documented
        if documented is not None and documented[0] == body:
            return documented[1]
        try:
            schema = json.loads(body)
        except ValueError:
            return body  # not the JSON FastAPI serves: not ours to change
        if not isinstance(schema, dict):
            return body
        schema = tenant_openapi(schema, self.manager.resolver, excluded_paths=self.excluded_paths)
        # FastAPI's own JSONResponse encoding.
        result = json.dumps(schema, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        self._documented = (body, result)
        return result


def _with_headers(send: Send, extra: dict[str, str]) -> Send:
    """`send` that adds `extra` headers to the response start."""
    encoded = [(name.lower().encode(), value.encode()) for name, value in extra.items()]

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *encoded]}
        await send(message)

    return send_with_headers


def _route_path(scope: Scope) -> str:
    """The path the app routes on: the request's path without the app's `root_path`."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :] or "/"
    return path


def _with_body(send: Send, rewrite: Callable[[bytes], bytes]) -> Send:
    """`send` that passes a successful, uncompressed JSON response's body through `rewrite`.

    The response start is held back until the whole body is there, so that its
    `content-length` can be set to the new length. Anything else passes unchanged.
    """
    start: Message | None = None
    chunks: list[bytes] = []

    async def send_rewritten(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", ()))
            json_body = headers.get(b"content-type", b"").startswith(b"application/json")
            if message["status"] == 200 and json_body and b"content-encoding" not in headers:
                start = message
                return
        elif message["type"] == "http.response.body" and start is not None:
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = rewrite(b"".join(chunks))
            kept = [(name, value) for name, value in start.get("headers", ()) if name != b"content-length"]
            await send({**start, "headers": [*kept, (b"content-length", str(len(body)).encode())]})
            message = {"type": "http.response.body", "body": body}
        await send(message)

    return send_rewritten


def close_with_request(scope: Scope, session: AsyncSession, *, early: bool) -> bool:
    """Have `TenancyMiddleware` close `session` when the request `scope` is done with it.

    `early`: once the HTTP response is ready to send, before it travels to the client (a
    `yield` dependency would otherwise hold the connection until the client has read the
    whole response, so that once clients outnumber the pool, requests also wait on each
    other's network writes); a streaming response releases it before its last chunk.
    Otherwise, and for WebSockets, when the request ends. Closing rolls back what is
    uncommitted. False when no `TenancyMiddleware` runs this request (nothing was done).
    """
    state = scope.get("state")
    sessions = None if state is None else state.get(_SESSIONS)
    if sessions is None:
        return False
    sessions.append((session, early and scope["type"] == "http"))
    return True


async def _close(sessions: list[tuple[AsyncSession, bool]], *, early_only: bool) -> None:
    kept = []
    for session, early in sessions:
        if early_only and not early:
            kept.append((session, early))
            continue
        try:
            # Rolls back what the route left uncommitted, as the dependency's exit would;
            # shielded at the end of a request, which may be ending by cancellation.
            await (session.close() if early_only else asyncio.shield(session.close()))
        except Exception:  # the response is ready: send it; the pool drops a broken connection
            logger.warning("closing a tenant session failed", exc_info=True)
    sessions[:] = kept


def _unavailable(exc: Exception) -> TenancyError | None:
    """The refusal for an app error raised before its response started, or None (re-raise)."""
    if is_outage(exc):
        return TenancyUnavailableError(f"database unavailable: {type(exc).__name__}")
    if is_query_timeout(exc):
        # Retryable like an outage, but told apart from "no connection to be had".
        return TenancyUnavailableError("database query timed out", detail="Database query timed out")
    if is_result_type_change(exc):
        # The driver dropped its cached statements: a retry succeeds.
        return TenancyUnavailableError("tables changed under a cached statement")
    return None


async def _refuse(scope: Scope, send: Send, exc: TenancyError) -> None:
    # json.dumps' default separators give exactly the documented bodies,
    # e.g. {"detail": "Tenant not found"}.
    body = json.dumps({"detail": exc.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.status_code == 503 and "retry-after" not in exc.headers:
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
