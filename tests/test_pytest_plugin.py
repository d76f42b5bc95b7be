"""The pytest plugin (`pytest_fastapi_tenancy`), run as users run it: in a pytest of its own."""

import asyncio
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import entry_points
from pathlib import Path

import asyncpg  # noqa: F401 - see below
import pytest

from tests.apps import quickstart_as_written
from tests.conftest import POSTGRES_URL, _postgres_admin, _require

pytest_plugins = ["pytester"]

# `pytester` restores sys.modules after each test: a C extension first imported inside one
# (asyncpg, by the admin connections) would be dropped and imported a second time, which
# crashes the interpreter. Imported above, it is in every snapshot.

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "main.py"

# What a user's project would set (ours sets the same): warnings are errors.
INI = """
[pytest]
asyncio_mode = {mode}
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

APP = """
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_tenancy import TenancyMiddleware
from fastapi_tenancy.dependencies import make_tenant_db_dependency


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


@pytest.fixture
def tenancy_metadata():
    return Base.metadata


@pytest.fixture
def tenancy_app(tenancy_manager):
    app = FastAPI()
    app.add_middleware(TenancyMiddleware, manager=tenancy_manager)
    get_db = make_tenant_db_dependency(tenancy_manager)

    @app.post("/notes")
    async def add(text: str, session: Annotated[AsyncSession, Depends(get_db)]):
        note = Note(text=text)
        session.add(note)
        await session.commit()
        return {"id": note.id, "text": note.text}

    @app.get("/notes")
    async def notes(session: Annotated[AsyncSession, Depends(get_db)]):
        return [{"id": n.id, "text": n.text} for n in (await session.scalars(select(Note))).all()]

    return app
"""

USER_TESTS = """
from fastapi_tenancy.testing import assert_isolated


async def test_two_tenants_with_overlapping_ids(tenancy_tenant_factory, tenancy_client):
    acme = await tenancy_tenant_factory("acme")
    globex = await tenancy_tenant_factory()
    a, g = tenancy_client(acme), tenancy_client(globex)
    assert (await a.post("/notes", params={"text": "acme's"})).json() == {"id": 1, "text": "acme's"}
    assert (await g.post("/notes", params={"text": "globex's"})).json() == {"id": 1, "text": "globex's"}
    assert (await a.get("/notes")).json() == [{"id": 1, "text": "acme's"}]
    assert (await g.get("/notes")).json() == [{"id": 1, "text": "globex's"}]
    assert (await tenancy_client().get("/notes")).status_code == 400
    assert (await tenancy_client("nobody").get("/notes")).status_code == 404


async def test_each_test_has_its_own_registry(tenancy_manager, tenancy_tenant_factory):
    assert await tenancy_manager.list_tenants() == []
    await tenancy_tenant_factory("acme")  # the identifier of the test above is free again


async def test_the_app_is_isolated(tenancy_app, tenancy_manager, tenancy_tenant_factory):
    report = await assert_isolated(
        tenancy_app, tenancy_manager, await tenancy_tenant_factory(), await tenancy_tenant_factory()
    )
    assert report.b_markers
"""


def _outcomes(result: pytest.RunResult) -> dict[str, int]:
    return {k: v for k, v in result.parseoutcomes().items() if k not in ("seconds", "second")}


def test_the_plugin_is_registered_and_imports_nothing_heavy() -> None:
    assert "pytest_fastapi_tenancy" in {e.value for e in entry_points(group="pytest11")}
    code = (
        "import sys; import pytest; before = set(sys.modules)\n"
        "import pytest_fastapi_tenancy\n"
        "heavy = ('fastapi', 'fastapi_tenancy', 'sqlalchemy', 'starlette', 'pydantic', 'httpx',"
        " 'asyncpg', 'aiosqlite', 'aiomysql', 'redis', 'jwt')\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result


def test_a_suite_that_does_not_use_it_is_untouched(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI.format(mode="strict"))
    pytester.makepyfile(
        test_plain="""
        import sys

        def test_plain():
            assert "fastapi_tenancy" not in sys.modules  # nothing imported the library

        def test_nothing_autouse(request):
            assert not [name for name in request.fixturenames if name.startswith("tenancy_")]
        """
    )
    result = pytester.runpytest_subprocess("--strict-config", "--strict-markers", "-W", "error")
    assert _outcomes(result) == {"passed": 2}, result.stdout.str()


def test_the_fixtures_in_memory(pytester: pytest.Pytester) -> None:
    # pytest-asyncio's strict mode (the other runs here use auto mode): the user marks
    # async tests; the plugin's async fixtures need nothing.
    pytester.makeini(INI.format(mode="strict"))
    pytester.makeconftest(APP)
    pytester.makepyfile(test_user="import pytest\npytestmark = pytest.mark.asyncio\n" + USER_TESTS)
    result = pytester.runpytest_subprocess("--strict-config", "--strict-markers")
    assert _outcomes(result) == {"passed": 3}, result.stdout.str()


def test_missing_pieces_are_explained(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI.format(mode="auto"))
    pytester.makepyfile(
        test_no_app="async def test_client(tenancy_client):\n    tenancy_client()\n",
        test_no_server="def test_pg(tenancy_postgres_url):\n    pass\n",
    )
    pytester._monkeypatch.delenv("TENANCY_TEST_POSTGRES_URL", raising=False)
    result = pytester.runpytest_subprocess("-rs")
    assert _outcomes(result) == {"errors": 1, "skipped": 1}, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*define a `tenancy_app` fixture returning your FastAPI app*",
            "*set TENANCY_TEST_POSTGRES_URL to a PostgreSQL server URL*",
        ]
    )


PG_TESTS = """
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

SCHEMAS = []


@pytest.fixture
def tenancy_database_url(tenancy_postgres_url):
    return tenancy_postgres_url


async def _schemas(url):
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        names = set(await conn.scalars(sa.text("SELECT nspname FROM pg_namespace")))
    await engine.dispose()
    return names


async def test_tenants_are_schemas(
    tenancy_tenant_factory, tenancy_client, tenancy_manager, tenancy_postgres_url
):
    with open("database.txt", "w") as out:
        out.write(tenancy_postgres_url.rsplit("/", 1)[1])
    acme, globex = await tenancy_tenant_factory(), await tenancy_tenant_factory()
    SCHEMAS.extend(tenancy_manager.isolation.storage_name(t.identifier) for t in (acme, globex))
    assert set(SCHEMAS) <= await _schemas(tenancy_postgres_url)
    a, g = tenancy_client(acme), tenancy_client(globex)
    assert (await a.post("/notes", params={"text": "acme's"})).json() == {"id": 1, "text": "acme's"}
    assert (await g.post("/notes", params={"text": "globex's"})).json() == {"id": 1, "text": "globex's"}
    assert (await a.get("/notes")).json() == [{"id": 1, "text": "acme's"}]


async def test_the_tenants_of_the_last_test_were_dropped(tenancy_postgres_url):
    assert len(SCHEMAS) == 2
    assert not set(SCHEMAS) & await _schemas(tenancy_postgres_url)
"""


async def _database_exists(name: str) -> bool:
    admin = await _postgres_admin(POSTGRES_URL)
    try:
        return bool(await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await admin.close()


@pytest.mark.postgres
async def test_the_fixtures_on_postgres(pytester: pytest.Pytester) -> None:
    await _require("PostgreSQL", lambda: _postgres_admin(POSTGRES_URL))
    pytester._monkeypatch.setenv("TENANCY_TEST_POSTGRES_URL", POSTGRES_URL)
    pytester.makeini(INI.format(mode="auto"))
    pytester.makeconftest(APP)
    pytester.makepyfile(test_pg=PG_TESTS)
    result = await asyncio.to_thread(pytester.runpytest_subprocess, "-p", "no:randomly")
    assert _outcomes(result) == {"passed": 2}, result.stdout.str()
    database = (pytester.path / "database.txt").read_text()
    assert database.startswith("tenancy_test_")
    assert not await _database_exists(database)  # dropped at the end of the session


# -- the measure: a user's test file runs the Quick Start app for two tenants ------------------

QUICKSTART_TESTS = """
import pytest

from fastapi_tenancy.testing import assert_isolated, run_lifespan
from main import Base, app, manager


@pytest.fixture
def tenancy_app():
    return app


@pytest.fixture
def tenancy_metadata():
    return Base.metadata


@pytest.fixture
async def tenancy_manager():
    async with run_lifespan(app):  # the Quick Start's lifespan starts and closes its manager
        yield manager


@pytest.mark.parametrize("run", range(6))
async def test_orders_of_two_tenants(run, tenancy_tenant_factory, tenancy_client):
    acme, globex = await tenancy_tenant_factory(), await tenancy_tenant_factory()
    a, g = tenancy_client(acme), tenancy_client(globex)
    created = await a.post("/orders", params={"description": "First order"})
    assert created.json() == {"id": 1, "description": "First order"}
    created = await g.post("/orders", params={"description": "Globex order"})
    assert created.json() == {"id": 1, "description": "Globex order"}
    listed = (await a.get("/orders")).json()
    assert listed == {"tenant": acme.identifier, "orders": [{"id": 1, "description": "First order"}]}
    listed = (await g.get("/orders")).json()
    assert listed == {"tenant": globex.identifier, "orders": [{"id": 1, "description": "Globex order"}]}
    assert (await tenancy_client().get("/orders")).status_code == 400


async def test_the_quickstart_app_is_isolated(tenancy_manager, tenancy_tenant_factory):
    acme, globex = await tenancy_tenant_factory(), await tenancy_tenant_factory()
    await assert_isolated(app, tenancy_manager, acme, globex)
"""


@pytest.fixture(params=["postgres", "sqlite"])
def quickstart_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_a_users_quickstart_suite_is_fast_after_the_first_test(
    pytester: pytest.Pytester, quickstart_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(QUICKSTART, pytester.path / "main.py")
    pytester._monkeypatch.setenv("TENANCY_DATABASE_URL", quickstart_database)
    pytester.makeini(INI.format(mode="auto") + "pythonpath = .\n")
    pytester.makepyfile(test_quickstart_user=QUICKSTART_TESTS)
    result = pytester.runpytest_subprocess("--junitxml=times.xml", "-p", "no:randomly")
    assert _outcomes(result) == {"passed": 7}, result.stdout.str()
    # Times per test (setup + call + teardown), reported, never asserted: the machine is shared.
    cases = ET.parse(pytester.path / "times.xml").getroot().iter("testcase")
    times = [(case.get("name", ""), float(case.get("time", "0"))) for case in cases]
    assert len(times) == 7
    backend = re.sub(r"[:+].*", "", quickstart_database)
    with capsys.disabled():
        first, rest = times[0][1], [t for _, t in times[1:]]
        print(
            f"\n[quickstart/{backend}] first test {first * 1000:.0f} ms; later tests "
            f"min {min(rest) * 1000:.0f} / max {max(rest) * 1000:.0f} ms; "
            + ", ".join(f"{name} {t * 1000:.0f} ms" for name, t in times)
        )


# -- the Quick Start as written: its manager built at import, its database URL a literal -----

APP_MANAGER_CONFTEST = """
import pytest

from main import Base, app, manager


@pytest.fixture
def tenancy_app():
    return app


@pytest.fixture
def tenancy_metadata():
    return Base.metadata


@pytest.fixture
def tenancy_app_manager():
    return manager  # the plugin runs it on the test database for each test
"""

APP_MANAGER_TESTS = """
import main
from fastapi_tenancy.testing import assert_isolated

QUICKSTART_URL = "postgresql+asyncpg://postgres:postgres@localhost/myapp"


async def test_two_tenants_with_overlapping_ids(tenancy_manager, tenancy_tenant_factory, tenancy_client):
    assert tenancy_manager is main.manager and tenancy_manager.config.database_url != QUICKSTART_URL
    acme, globex = await tenancy_tenant_factory(), await tenancy_tenant_factory()
    a, g = tenancy_client(acme), tenancy_client(globex)
    assert (await a.post("/orders", params={"description": "acme's"})).json()["id"] == 1
    assert (await g.post("/orders", params={"description": "globex's"})).json()["id"] == 1
    listed = (await a.get("/orders")).json()
    assert listed == {"tenant": acme.identifier, "orders": [{"id": 1, "description": "acme's"}]}
    assert (await tenancy_client().get("/orders")).status_code == 400
    with open("backend.txt", "w") as out:
        out.write(tenancy_manager.config.backend)


async def test_the_app_is_isolated(tenancy_manager):
    report = await assert_isolated(main.app, tenancy_manager, app_metadata=main.Base.metadata)
    assert report.skipped == ["GET /health"] and report.removed_tenants


def test_the_manager_is_restored_between_tests():
    assert main.manager.config.database_url == QUICKSTART_URL
    assert not main.manager._initialized
"""

ON_POSTGRES = """

@pytest.fixture
def tenancy_database_url(tenancy_postgres_url):
    return tenancy_postgres_url
"""

TEMPLATE_TESTS = """
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine


async def test_tenants_are_cloned_from_the_template(tenancy_manager, tenancy_tenant_factory, tenancy_client):
    assert tenancy_manager.config.schema_template == "orders_template"
    acme = await tenancy_tenant_factory()
    created = await tenancy_client(acme).post("/orders", params={"description": "acme's"})
    assert created.json() == {"id": 1, "description": "acme's"}, created.text


async def test_the_template_went_with_the_tenants_of_the_last_test(tenancy_postgres_url):
    engine = create_async_engine(tenancy_postgres_url)
    async with engine.connect() as conn:
        names = set(await conn.scalars(sa.text("SELECT nspname FROM pg_namespace")))
    await engine.dispose()
    assert "orders_template" not in names and not [n for n in names if n.startswith("tenant_")]
"""


def test_an_app_that_builds_its_manager_at_import(pytester: pytest.Pytester) -> None:
    (pytester.path / "main.py").write_text(quickstart_as_written())
    pytester.makeini(INI.format(mode="auto") + "pythonpath = .\n")
    pytester.makeconftest(APP_MANAGER_CONFTEST)
    pytester.makepyfile(test_app_manager=APP_MANAGER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    assert _outcomes(result) == {"passed": 3}, result.stdout.str()
    assert (pytester.path / "backend.txt").read_text() == "sqlite"  # the plugin's default: in memory


@pytest.mark.postgres
@pytest.mark.parametrize("template", [False, True], ids=["no-template", "schema_template"])
async def test_an_app_that_builds_its_manager_at_import_on_postgres(
    pytester: pytest.Pytester, template: bool
) -> None:
    await _require("PostgreSQL", lambda: _postgres_admin(POSTGRES_URL))
    pytester._monkeypatch.setenv("TENANCY_TEST_POSTGRES_URL", POSTGRES_URL)
    main = quickstart_as_written(*(['schema_template="orders_template",'] if template else []))
    (pytester.path / "main.py").write_text(main)
    pytester.makeini(INI.format(mode="auto") + "pythonpath = .\n")
    pytester.makeconftest(APP_MANAGER_CONFTEST + ON_POSTGRES)
    pytester.makepyfile(test_app_manager=APP_MANAGER_TESTS, test_template=TEMPLATE_TESTS if template else "")
    result = await asyncio.to_thread(pytester.runpytest_subprocess, "-p", "no:randomly")
    assert _outcomes(result) == {"passed": 5 if template else 3}, result.stdout.str()
    assert (pytester.path / "backend.txt").read_text() == "postgresql"
