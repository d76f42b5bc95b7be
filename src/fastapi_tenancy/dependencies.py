"""FastAPI dependencies: the current tenant, a session scoped to it, the verified token's claims."""

import functools
import inspect
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Annotated, Any, TypeVar, overload

from fastapi import Depends, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection
from starlette.types import Scope

from .context import _current as _current_tenant  # the ContextVar itself: no call per request
from .errors import TenantMismatchError, TenantResolutionError
from .manager import TenancyManager
from .middleware import close_with_request
from .resolution.claims import verified_token
from .tenant import Tenant

__all__ = [
    "CurrentTenant",
    "TokenClaims",
    "get_current_tenant",
    "get_token_claims",
    "make_tenant_db_dependency",
]


async def get_current_tenant() -> Tenant:
    """The tenant of this request (set by `TenancyMiddleware`).

    Async on purpose: FastAPI runs sync dependencies in a thread pool, a hop per
    request for what is one ContextVar read. On a path the middleware skipped,
    it answers 400 instead of running the route without a tenant.
    """
    tenant = _current_tenant.get()
    if tenant is None:
        raise HTTPException(status_code=400, detail=TenantResolutionError.detail)
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
"""`tenant: CurrentTenant` in a route's parameters is the request's tenant."""


async def get_token_claims(connection: HTTPConnection) -> dict[str, Any]:
    """The claims of the bearer token that named this request's tenant, as the JWT strategy verified them.

    Read from the request, not decoded again. 401 `Not authenticated` (with
    `WWW-Authenticate: Bearer`) when no token was verified: no token, an excluded
    path, or a chain that resolved the tenant before reaching the token. 403
    `Tenant mismatch` when the token names no tenant, or another one than the
    request runs as (a chain in `first` mode whose header named it): such a
    token was not issued for this tenant.
    """
    token = verified_token(connection.scope)
    if token is None:
        raise HTTPException(
            status_code=401, detail="Not authenticated", headers={"WWW-Authenticate": "Bearer"}
        )
    tenant = _current_tenant.get()
    if tenant is None or token.tenant != tenant.identifier:
        raise HTTPException(status_code=403, detail=TenantMismatchError.detail)
    return token.claims


TokenClaims = Annotated[dict[str, Any], Depends(get_token_claims)]
"""`claims: TokenClaims` in a route's parameters: the verified claims of the request's token."""

_Session = TypeVar("_Session", bound=AsyncSession)


@overload
def make_tenant_db_dependency(
    manager: TenancyManager,
) -> Callable[[HTTPConnection], Awaitable[AsyncSession]]: ...
@overload
def make_tenant_db_dependency(
    manager: TenancyManager, *, session_class: type[_Session]
) -> Callable[[HTTPConnection], Awaitable[_Session]]: ...
def make_tenant_db_dependency(
    manager: TenancyManager, *, session_class: type[AsyncSession] = AsyncSession
) -> Callable[[HTTPConnection], Awaitable[Any]]:
    """A dependency giving an `AsyncSession` that reaches only the request tenant's data.

        get_db = make_tenant_db_dependency(manager)

        @app.get("/orders")
        async def orders(session: Annotated[AsyncSession, Depends(get_db)]): ...

    The session is not begun (so `async with session.begin()` works); commit
    explicitly, and anything uncommitted is rolled back when the request ends.
    `session_class`: an `AsyncSession` subclass to yield instead, scoped the same way
    (SQLModel's `sqlmodel.ext.asyncio.session.AsyncSession`, for `session.exec()`).

    Its connection goes back to the pool as soon as the route's response is ready,
    before the response is sent (see `TenancyMiddleware`); a streaming response keeps
    it until its last chunk, and so does a route where a yield dependency of FastAPI's
    default ("request") scope takes the session: that dependency may still use it after
    the response (commit after its `yield`). It is a plain `async def` dependency, not a
    `yield` one (FastAPI wraps each of those in context managers and a cancel scope, on
    every request): `TenancyMiddleware` closes the session, or, without the middleware,
    FastAPI's exit stack when the request ends.

    Routes that use it are `async def`: a `def` route runs in a thread, where the
    session's methods return coroutines nobody awaits, so its request fails with a
    `TypeError` that says so instead (sync ORM code runs in `await session.run_sync(fn)`).
    """
    # (route, endpoint) ids -> (route, endpoint, release early?), for the routes already
    # checked (an `async def` endpoint): one dictionary lookup per request after the first
    # (by id: an endpoint may be unhashable; kept, so that their ids are not reused).
    checked: dict[tuple[int, int], tuple[object, object, bool]] = {}

    async def get_tenant_db(connection: HTTPConnection) -> AsyncSession:
        scope = connection.scope
        route, endpoint = scope.get("route"), scope.get("endpoint")
        known = checked.get((id(route), id(endpoint)))
        if known is None or known[0] is not route or known[1] is not endpoint:
            _refuse_sync_endpoint(scope)
            early = not _used_after_the_response(route, get_tenant_db)
            known = checked[id(route), id(endpoint)] = (route, endpoint, early)
        # The tenant read here, not declared as a `CurrentTenant` sub-dependency (that
        # costs FastAPI a second dependency solve per request). The middleware has just
        # resolved it as active, so this skips the registry re-check of
        # `manager.session()`: nothing but the session itself on the request path.
        tenant = _current_tenant.get() or _overridden_tenant(scope)
        if tenant is None:
            raise HTTPException(status_code=400, detail=TenantResolutionError.detail)
        session = await manager.isolation.session(tenant, session_class=session_class)
        # A plain dependency, not a `yield` one: the middleware closes the session (FastAPI
        # wraps each yield dependency in context managers and a cancel scope, a cost on
        # every request); without the middleware, FastAPI's exit stack of the request.
        if not close_with_request(scope, session, early=known[2]):
            _close_at_exit(scope, session)
        return session

    return get_tenant_db


def _overridden_tenant(scope: Scope) -> Tenant | None:
    """The tenant of `testing.override_tenant` on the app of `scope`, for a route that takes no
    `CurrentTenant` (whose override would otherwise have set the current tenant)."""
    overrides = getattr(scope.get("app"), "dependency_overrides", None)
    override = overrides.get(get_current_tenant) if overrides else None
    tenant = getattr(override, "overridden_tenant", None)
    return tenant if isinstance(tenant, Tenant) else None


def _close_at_exit(scope: Scope, session: AsyncSession) -> None:
    """Close `session` with FastAPI's exit stack of the request (no `TenancyMiddleware`)."""
    stack = scope.get("fastapi_inner_astack")
    if not isinstance(stack, AsyncExitStack):
        raise RuntimeError(
            "make_tenant_db_dependency() is a FastAPI dependency: take it with Depends() in a "
            "route of a FastAPI app (with TenancyMiddleware), or use `manager.session(tenant)`"
        )
    stack.push_async_callback(session.close)


def _used_after_the_response(route: object, dependency: Callable[..., Any]) -> bool:
    """Whether a yield dependency of `route` that FastAPI ends after the response takes `dependency`.

    A yield dependency of the default ("request") scope runs its exit code after the
    response is sent; one that takes the session, directly or through others, may use it
    there (`yield session` then `await session.commit()`: the unit-of-work pattern). Closing
    the session before the response would roll back what it is about to commit, and its
    commit would then commit nothing: such routes keep the session until the dependency
    ends, as FastAPI would. `Depends(..., scope="function")` ends before the response.
    """

    def late(dependant: Any, inside: bool) -> bool:
        for sub in dependant.dependencies:
            if sub.call is dependency:
                if inside:
                    return True
                continue
            if late(sub, inside or (_is_generator(sub.call) and getattr(sub, "scope", None) != "function")):
                return True
        return False

    dependant = getattr(route, "dependant", None)
    return dependant is not None and late(dependant, False)


def _is_generator(call: object) -> bool:
    while isinstance(call, functools.partial):
        call = call.func
    if inspect.isclass(call):
        return False  # FastAPI calls it for an instance: no exit code
    if not inspect.isfunction(call) and not inspect.ismethod(call):
        call = getattr(call, "__call__", None)  # noqa: B004  (a class instance used as a dependency)
    call = inspect.unwrap(call) if callable(call) else call
    return inspect.isasyncgenfunction(call) or inspect.isgeneratorfunction(call)


def _refuse_sync_endpoint(scope: Scope) -> None:
    """Raise `TypeError` when the route of `scope` is a plain `def` function.

    FastAPI runs such a route in a worker thread: each `await`-able method of the async
    session returns a coroutine there, never run, and the route answers 200 with
    `"<coroutine object ...>"` in its body, or an empty list where rows were. Refused
    loudly instead, on every request of the route, before any session is made.
    """
    endpoint = scope.get("endpoint")
    call = endpoint
    while isinstance(call, functools.partial):
        call = call.func
    if not inspect.isfunction(call) and not inspect.ismethod(call):
        return  # a class or a callable object: FastAPI decides how to run it; not ours to guess
    if inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(inspect.unwrap(call)):
        return
    route = scope.get("route")
    where = f"{getattr(route, 'path', '?')} ({getattr(call, '__qualname__', call)})"
    raise TypeError(
        f"the route {where} is a `def` function, but it depends on the async tenant session of "
        "make_tenant_db_dependency(): FastAPI runs it in a thread, where the session's methods "
        "return coroutines that never run. Declare it `async def` and await the session's methods; "
        "sync ORM code runs with `await session.run_sync(fn)`."
    )
