"""Running the async library from synchronous Hypothesis tests: a dedicated event loop,
and a fresh database per example."""

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url

from ..conftest import POSTGRES_URL, _postgres_admin, _require

__all__ = ["fresh_database", "new_runner"]


def new_runner() -> asyncio.Runner:
    """An event loop of its own; the global one (pytest-asyncio's) is left alone."""
    return asyncio.Runner(loop_factory=asyncio.new_event_loop)


@contextmanager
def fresh_database(runner: asyncio.Runner, backend: str) -> Iterator[str]:
    """The URL of a new, empty database on `backend` ("postgres" or "sqlite"), removed afterwards."""
    if backend == "sqlite":
        directory = Path(tempfile.mkdtemp(prefix="ft-sm-"))
        try:
            yield f"sqlite+aiosqlite:///{directory / 'app.db'}"
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    runner.run(_require("PostgreSQL", lambda: _postgres_admin(POSTGRES_URL)))
    name = f"ft_sm_{uuid.uuid4().hex[:12]}"
    runner.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        runner.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin(statement: str) -> None:
    admin = await _postgres_admin(POSTGRES_URL)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()
