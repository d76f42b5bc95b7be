"""`tenancy_app.py` (the Quick Start configured by `TENANCY_*`) plus one slow route.

`GET /slow` holds a pooled connection for `BENCH_SLOW_SECONDS` (default 0.1) inside the
tenant's transaction, as a slow report query would: `noisy.py` floods it as one hot
tenant while quiet tenants call `GET /orders`.
"""

import os
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession
from tenancy_app import app, get_db  # benchmarks/ is the app directory

SLOW_SECONDS = float(os.environ.get("BENCH_SLOW_SECONDS", "0.1"))

__all__ = ["app"]


@app.get("/slow")
async def slow(session: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, float]:
    await session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": SLOW_SECONDS})
    return {"slept": SLOW_SECONDS}
