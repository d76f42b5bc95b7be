"""The test app (tests/apps.py) plus the kinds of request the security suite needs:
a route that fails after writing, a slow one, a streaming response and a WebSocket."""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from fastapi_tenancy import TenancyManager, current_tenant
from fastapi_tenancy.dependencies import make_tenant_db_dependency

from ..apps import Order, build_app

__all__ = ["build_security_app"]


def build_security_app(manager: TenancyManager) -> FastAPI:
    """`build_app(manager)` with /raw-commit, /fail, /savepoints, /slow, /stream, /slow-stream
    and /ws added."""
    app = build_app(manager)
    get_db = make_tenant_db_dependency(manager)
    Session = Annotated[AsyncSession, Depends(get_db)]

    @app.post("/raw-commit")
    async def raw_commit(session: Session) -> dict[str, int]:
        # Raw SQL (so the tenant's search_path is set) in a transaction that COMMITS:
        # a session-level setting would outlive it, a transaction-local one cannot.
        count = (await session.execute(sa.text("SELECT count(*) FROM orders"))).scalar_one()
        await session.commit()
        return {"count": int(count)}

    @app.post("/fail")
    async def fail(order_id: int, session: Session, status: int = 0) -> None:
        # Writes (and flushes, so the row is on the server), then fails: with an
        # HTTP error when `status` is given, else with a bug (a 500).
        session.add(Order(id=order_id, description="must-be-rolled-back"))
        await session.flush()
        if status:
            raise HTTPException(status, "refused after a write")
        raise RuntimeError("a bug in the route, after a write")

    @app.post("/savepoints")
    async def savepoints(order_id: int, session: Session) -> dict[str, list[str]]:
        # Raw SQL (it needs the tenant's search_path) inside savepoints that write and are
        # rolled back, and after them: the search_path set inside a savepoint goes with it,
        # and the next raw statement must still run in the tenant. Nothing is committed.
        async def descriptions() -> str:
            query = sa.text("SELECT string_agg(description, ',' ORDER BY id) FROM orders")
            return str((await session.execute(query)).scalar_one())

        seen = []
        outer = await session.begin_nested()
        seen.append(await descriptions())
        session.add(Order(id=order_id, description="in-a-savepoint"))
        await session.flush()
        seen.append(await descriptions())
        inner = await session.begin_nested()
        session.add(Order(id=order_id + 1, description="in-a-nested-savepoint"))
        await session.flush()
        seen.append(await descriptions())
        await inner.rollback()
        seen.append(await descriptions())
        await outer.rollback()
        seen.append(await descriptions())
        await session.commit()
        return {"seen": seen}

    @app.post("/slow")
    async def slow(order_id: int, seconds: float, session: Session) -> dict[str, int]:
        # A write, then a long query, then the commit: cancelled or cut in the middle,
        # the write must never land.
        session.add(Order(id=order_id, description="slow"))
        await session.flush()
        await session.execute(sa.select(sa.func.pg_sleep(seconds)))
        await session.commit()
        return {"id": order_id}

    @app.get("/stream")
    async def stream(session: Session) -> StreamingResponse:
        async def rows() -> AsyncIterator[bytes]:
            result = await session.stream_scalars(sa.select(Order).order_by(Order.id))
            async for order in result:
                yield f"{order.id}:{order.description}\n".encode()

        return StreamingResponse(rows(), media_type="text/plain")

    @app.get("/slow-stream")
    async def slow_stream(session: Session, rounds: int, pause: float = 0.005) -> StreamingResponse:
        # A long stream: each line reads the tenant's rows again on the request's session
        # (raw SQL, so the search_path is in play) and names the tenant in context.
        async def lines() -> AsyncIterator[bytes]:
            for number in range(rounds):
                query = sa.text("SELECT string_agg(description, ',' ORDER BY id) FROM orders")
                rows = (await session.execute(query)).scalar_one()
                yield f"{number}:{current_tenant().identifier}:{rows}\n".encode()
                await asyncio.sleep(pause)

        return StreamingResponse(lines(), media_type="text/plain")

    @app.websocket("/ws")
    async def websocket(socket: WebSocket, session: Session) -> None:
        await socket.accept()
        try:
            while True:
                await socket.receive_text()
                orders = (await session.execute(sa.select(Order).order_by(Order.id))).scalars().all()
                rows: list[dict[str, Any]] = [{"id": o.id, "description": o.description} for o in orders]
                await socket.send_json(rows)
        except WebSocketDisconnect:
            pass

    return app
