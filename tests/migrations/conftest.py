"""Fixtures for the migration tests: an Alembic project from the package template, and a manager."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fastapi_tenancy import TenancyConfig, TenancyManager
from tests.isolation.conftest import roles  # noqa: F401 - a fixture: an owner and an application role

from .projects import make_project


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture
async def manager(postgres_url: str) -> AsyncIterator[TenancyManager]:
    manager = TenancyManager(TenancyConfig(database_url=postgres_url, database_pool_size=2))
    await manager.initialize()
    yield manager
    await manager.close()
