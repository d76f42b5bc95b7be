"""The app the multi-worker tests serve: `uvicorn tests.workers.app:app --workers 2`.

Configured entirely from `TENANCY_*` variables. Every response says which worker
process answered (`X-Worker-Pid`), so a test can tell the two workers apart.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyMiddleware, current_tenant

manager = TenancyManager(TenancyConfig())


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await manager.initialize()
    yield
    await manager.close()


api = FastAPI(lifespan=lifespan)
api.add_middleware(TenancyMiddleware, manager=manager, excluded_paths=["/health"])


@api.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}


@api.get("/whoami")
async def whoami() -> dict[str, object]:
    return {"pid": os.getpid(), "tenant": current_tenant().identifier}


_PID = str(os.getpid()).encode()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """`api`, with the worker's pid on every response (refusals included)."""

    async def send_with_pid(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"x-worker-pid", _PID)]}
        await send(message)

    await api(scope, receive, send_with_pid)
