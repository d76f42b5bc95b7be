"""The pytest plugin's fixtures pointed at this app, on PostgreSQL.

Set TENANCY_TEST_POSTGRES_URL to a server the test user may create databases on
(`postgresql://postgres@localhost/postgres`): the plugin makes one database for the
session, each test's tenants are schemas in it. Without it, the tests are skipped.
"""

import os

# Before the app is imported: its TenancyConfig reads these from the environment. The
# database is never reached: the plugin runs the app's manager on its test database.
os.environ.setdefault("TENANCY_DATABASE_URL", "postgresql+asyncpg://app@localhost/fullstack")
os.environ.setdefault("TENANCY_JWT_SECRET", "a-test-only-signing-key-of-32-bytes-or-more")

import pytest
from fastapi_tenancy import TenancyManager
from sqlmodel import SQLModel

from app.main import app, manager


@pytest.fixture
def tenancy_database_url(tenancy_postgres_url: str) -> str:
    return tenancy_postgres_url


@pytest.fixture
def tenancy_app():
    return app


@pytest.fixture
def tenancy_app_manager() -> TenancyManager:
    return manager  # built at import: the plugin runs it on the test database, then restores it


@pytest.fixture
def tenancy_metadata():
    return SQLModel.metadata  # a new tenant's tables, then stamped at head (alembic_config)
