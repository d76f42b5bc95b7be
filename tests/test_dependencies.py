"""The session dependency gives its connection back when the response is ready, before it is
sent, and everything a route relies on behaves as before: commits, rollbacks, exceptions,
streaming bodies, background tasks and WebSockets. Observed through pool checkouts, on
PostgreSQL (schema isolation) and on SQLite files."""

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI, WebSocket
from fastapi.responses import StreamingResponse
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import Pool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyMiddleware
from fastapi_tenancy.dependencies import make_tenant_db_dependency

from .apps import Base, Order
from .asgi import websocket

TENANTS = {"alpha": {1: "alpha-1", 2: "alpha-2"}, "beta": {1: "beta-1", 3: "beta-3"}}


class Checkouts:
    """Connections checked out of every pool in the process, counted by pool events."""

    def __init__(self) -> None:
        self.out = 0

    def checkout(self, *_: Any) -> None:
        self.out += 1

    def checkin(self, *_: Any) -> None:
        self.out -= 1


@pytest.fixture
def checkouts() -> Iterator[Checkouts]:
    counter = Checkouts()
    event.listen(Pool, "checkout", counter.checkout)
    event.listen(Pool, "checkin", counter.checkin)
    yield counter
    event.remove(Pool, "checkout", counter.checkout)
    event.remove(Pool, "checkin", counter.checkin)


@pytest.fixture(params=["postgres", "sqlite"])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
async def manager(url: str) -> AsyncIterator[TenancyManager]:
    manager = TenancyManager(TenancyConfig(database_url=url, database_pool_size=1, database_max_overflow=0))
    await manager.initialize()
    for slug, rows in TENANTS.items():
        tenant = await manager.register_tenant(slug, slug, app_metadata=Base.metadata)
        async with manager.session(tenant) as session:
            session.add_all(Order(id=key, description=text) for key, text in rows.items())
            await session.commit()
    yield manager
    await manager.close()


class BodyWatch:
    """An outer ASGI layer noting, at each body message, how many connections are out."""

    def __init__(self, app: ASGIApp, counter: Checkouts) -> None:
        self.app, self.counter = app, counter
        self.seen: list[tuple[bool, int]] = []  # (more_body, connections out)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watching(message: Message) -> None:
            if message["type"] == "http.response.body":
                self.seen.append((bool(message.get("more_body", False)), self.counter.out))
            await send(message)

        await self.app(scope, receive, watching)


def _app(manager: TenancyManager) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)
    Session = Annotated[AsyncSession, Depends(make_tenant_db_dependency(manager))]

    async def descriptions(session: AsyncSession) -> list[str]:
        return list((await session.execute(sa.select(Order.description).order_by(Order.id))).scalars())

    @app.get("/orders")
    async def orders(session: Session) -> list[str]:
        return await descriptions(session)

    @app.post("/orders/{key}")
    async def add(key: int, session: Session, commit: bool = True, fail: bool = False) -> str:
        session.add(Order(id=key, description=f"new-{key}"))
        if commit:
            await session.commit()
        if fail:
            raise RuntimeError("the route fails after its commit")
        return "ok"

    async def unit_of_work(session: Session) -> AsyncIterator[AsyncSession]:
        yield session
        await session.commit()  # the route's writes, committed when the dependency ends

    class Orders:  # a repository: a plain dependency holding the session
        def __init__(self, session: Session) -> None:
            self.session = session

    async def unit_of_orders(orders: Annotated[Orders, Depends()]) -> AsyncIterator[Orders]:
        yield orders
        await orders.session.commit()

    @app.post("/unit/{key}")  # FastAPI's default scope: the commit runs after the response
    async def in_unit(key: int, session: Annotated[AsyncSession, Depends(unit_of_work)]) -> list[str]:
        session.add(Order(id=key, description=f"unit-{key}"))
        return await descriptions(session)

    @app.post("/unit-of-orders/{key}")
    async def in_unit_of_orders(key: int, orders: Annotated[Orders, Depends(unit_of_orders)]) -> list[str]:
        orders.session.add(Order(id=key, description=f"unit-{key}"))
        return await descriptions(orders.session)

    @app.post("/function-unit/{key}")  # ends before the response
    async def in_function_unit(
        key: int, session: Annotated[AsyncSession, Depends(unit_of_work, scope="function")]
    ) -> list[str]:
        session.add(Order(id=key, description=f"unit-{key}"))
        return await descriptions(session)

    @app.get("/stream")
    async def stream(session: Session) -> StreamingResponse:
        async def lines() -> AsyncIterator[str]:
            for _ in range(3):  # the database read again for every chunk, while streaming
                yield ",".join(await descriptions(session)) + "\n"
                await asyncio.sleep(0)

        return StreamingResponse(lines())

    @app.post("/later/{key}")
    async def later(key: int, tasks: BackgroundTasks, session: Session) -> list[str]:
        async def write() -> None:  # after the response: a session of its own
            async with manager.session() as own:
                own.add(Order(id=key, description=f"later-{key}"))
                await own.commit()

        tasks.add_task(write)
        return await descriptions(session)

    @app.websocket("/ws")
    async def socket(websocket: WebSocket, session: Session) -> None:
        await websocket.accept()
        await websocket.send_json(await descriptions(session))
        await websocket.close()

    return app


@pytest.fixture
def watch(manager: TenancyManager, checkouts: Checkouts) -> BodyWatch:
    return BodyWatch(_app(manager), checkouts)


async def _call(watch: BodyWatch, method: str, path: str, tenant: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=watch, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.request(method, path, headers={"X-Tenant-ID": tenant})


async def test_the_connection_is_back_before_the_response_is_sent(
    watch: BodyWatch, checkouts: Checkouts
) -> None:
    for tenant, rows in TENANTS.items():
        response = await _call(watch, "GET", "/orders", tenant)
        assert response.json() == list(rows.values()), response.text
    assert watch.seen == [(False, 0), (False, 0)]
    assert checkouts.out == 0


async def test_commits_stay_and_uncommitted_work_is_rolled_back(
    watch: BodyWatch, checkouts: Checkouts
) -> None:
    assert (await _call(watch, "POST", "/orders/7", "alpha")).status_code == 200
    assert (await _call(watch, "POST", "/orders/8?commit=false", "alpha")).status_code == 200
    assert (await _call(watch, "GET", "/orders", "alpha")).json() == ["alpha-1", "alpha-2", "new-7"]
    assert (await _call(watch, "GET", "/orders", "beta")).json() == ["beta-1", "beta-3"]
    assert [out for _, out in watch.seen] == [0, 0, 0, 0]


async def test_an_exception_after_a_commit_keeps_the_commit(watch: BodyWatch, checkouts: Checkouts) -> None:
    response = await _call(watch, "POST", "/orders/9?fail=true", "beta")
    assert response.status_code == 500
    assert (await _call(watch, "GET", "/orders", "beta")).json() == ["beta-1", "beta-3", "new-9"]
    assert checkouts.out == 0


@pytest.mark.parametrize(
    ("path", "out_when_sent"),
    [("/unit", 1), ("/unit-of-orders", 1), ("/function-unit", 0)],
    ids=["request-scope", "through-a-repository", "function-scope"],
)
async def test_a_dependency_committing_after_its_yield_keeps_its_commit(
    watch: BodyWatch, checkouts: Checkouts, path: str, out_when_sent: int
) -> None:
    response = await _call(watch, "POST", f"{path}/6", "alpha")
    assert response.json() == ["alpha-1", "alpha-2", "unit-6"], response.text
    # A request-scoped dependency commits after the response: the session stays open for
    # it, as it did before; one of function scope has committed before the response.
    assert watch.seen == [(False, out_when_sent)]
    assert (await _call(watch, "GET", "/orders", "alpha")).json() == ["alpha-1", "alpha-2", "unit-6"]
    assert (await _call(watch, "GET", "/orders", "beta")).json() == ["beta-1", "beta-3"]
    assert checkouts.out == 0


async def test_a_streaming_body_reads_on_its_session_until_its_last_chunk(
    watch: BodyWatch, checkouts: Checkouts
) -> None:
    response = await _call(watch, "GET", "/stream", "beta")
    assert response.text == "beta-1,beta-3\n" * 3
    more, out = zip(*watch.seen, strict=True)
    assert more[-1] is False and out[-1] == 0  # released before the last message
    assert all(count == 1 for flag, count in watch.seen if flag)  # held while streaming
    assert checkouts.out == 0


async def test_background_tasks_use_their_own_session(watch: BodyWatch, checkouts: Checkouts) -> None:
    assert (await _call(watch, "POST", "/later/5", "alpha")).json() == ["alpha-1", "alpha-2"]
    assert (await _call(watch, "GET", "/orders", "alpha")).json() == ["alpha-1", "alpha-2", "later-5"]
    assert (await _call(watch, "GET", "/orders", "beta")).json() == ["beta-1", "beta-3"]
    assert checkouts.out == 0


async def test_websocket_routes_take_the_session_as_before(
    manager: TenancyManager, checkouts: Checkouts
) -> None:
    app = _app(manager)
    for tenant, rows in TENANTS.items():
        sent = await websocket(app, [("X-Tenant-ID", tenant)])
        assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
        assert json.loads(sent[1]["text"]) == list(rows.values())
    assert checkouts.out == 0


# -- `def` routes and sync ORM code -------------------------------------------------------


def _sync_app(manager: TenancyManager) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=manager)
    Session = Annotated[AsyncSession, Depends(make_tenant_db_dependency(manager))]

    @app.get("/sync/orders")
    def sync_orders(session: Session) -> str:  # what a user might write: the session is async
        return str(session.execute(sa.select(Order.description)))

    async def repository(session: Session) -> AsyncSession:
        return session

    @app.get("/sync/nested")
    def sync_nested(session: Annotated[AsyncSession, Depends(repository)]) -> str:
        return str(session.execute(sa.select(Order.description)))

    @app.get("/orders")
    async def orders(session: Session) -> list[str]:
        return list((await session.execute(sa.select(Order.description).order_by(Order.id))).scalars())

    @app.get("/run-sync/orders")
    async def run_sync_orders(session: Session) -> list[str]:
        def read(sync: sa.orm.Session) -> list[str]:  # sync ORM code, the tenant's session
            return [o.description for o in sync.scalars(sa.select(Order).order_by(Order.id))]

        return await session.run_sync(read)

    return app


@pytest.mark.parametrize("path", ["/sync/orders", "/sync/nested"], ids=["direct", "through-a-dependency"])
async def test_a_def_route_taking_the_session_fails_loudly_on_every_request(
    manager: TenancyManager, checkouts: Checkouts, path: str
) -> None:
    transport = httpx.ASGITransport(app=_sync_app(manager))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(2):  # not only the first
            with pytest.raises(TypeError, match=r"the route /sync/\w+ \(.*sync_\w+\) is a `def` function"):
                await client.get(path, headers={"X-Tenant-ID": "alpha"})
        assert checkouts.out == 0  # refused before any session was made
        # The async routes of the same dependency still work.
        response = await client.get("/orders", headers={"X-Tenant-ID": "beta"})
        assert response.json() == ["beta-1", "beta-3"]


async def test_sync_orm_code_runs_in_run_sync_on_the_tenants_session(
    manager: TenancyManager, checkouts: Checkouts
) -> None:
    transport = httpx.ASGITransport(app=_sync_app(manager))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(3):
            for tenant, rows in TENANTS.items():
                response = await client.get("/run-sync/orders", headers={"X-Tenant-ID": tenant})
                assert response.json() == list(rows.values()), response.text
    assert checkouts.out == 0


async def test_without_the_middleware_the_session_ends_with_the_request(
    manager: TenancyManager, checkouts: Checkouts
) -> None:
    """`override_tenant` tests run the app without `TenancyMiddleware`: FastAPI's exit stack
    of the request closes the session (a plain dependency, not a `yield` one)."""
    from starlette.requests import Request

    from fastapi_tenancy.testing import override_tenant

    get_db = make_tenant_db_dependency(manager)
    app = FastAPI()

    @app.post("/orders/{key}")
    async def add(key: int, session: Annotated[AsyncSession, Depends(get_db)], commit: bool = True) -> int:
        session.add(Order(id=key, description=f"new-{key}"))
        await (session.commit() if commit else session.flush())
        return checkouts.out

    transport = httpx.ASGITransport(app=app)
    with override_tenant(app, await manager.get_tenant("alpha")):
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/orders/11")).json() == 0  # committed: given back already
            assert (await client.post("/orders/12?commit=false")).json() == 1  # held to the end
    assert checkouts.out == 0
    async with manager.session(await manager.get_tenant("alpha")) as session:
        rows = (await session.execute(sa.select(Order.id).order_by(Order.id))).scalars().all()
    assert rows == [1, 2, 11]  # 12 was never committed: rolled back when the request ended

    # Outside a FastAPI request there is no one to close it: refused, nothing opened.
    from fastapi_tenancy.context import reset_current_tenant, set_current_tenant

    token = set_current_tenant(await manager.get_tenant("alpha"))
    try:
        with pytest.raises(RuntimeError, match="Depends"):
            await get_db(Request({"type": "http", "headers": [], "state": {}}))
    finally:
        reset_current_tenant(token)
    assert checkouts.out == 0
