"""Fixtures of the security suite: one app factory per isolation strategy.

A strategy is a way of keeping tenants apart that the library supports today;
each test takes `pooled_app` (strategies whose tenants share a pool of
PostgreSQL connections) or `any_app` (all of them) and is run once per strategy.
Strategies landing later (RLS, database per tenant) add an entry to STRATEGIES.
"""

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import pytest

from ..isolation.test_matrix import Env, two_tenants
from .app import build_security_app


@dataclass(frozen=True)
class Strategy:
    """How to get a database for the strategy (a fixture) and the settings that select it."""

    url_fixture: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    shares_pool: bool = True  # tenants' sessions use connections of the manager's one pool


STRATEGIES: dict[str, Strategy] = {
    "schema-postgres": Strategy("postgres_url"),
    "schema-pgbouncer": Strategy("pgbouncer_url", {"database_pgbouncer": True}),
    "file-sqlite": Strategy("sqlite_url", shares_pool=False),
}
POOLED = [name for name, strategy in STRATEGIES.items() if strategy.shares_pool]

AppFactory = Callable[..., AbstractAsyncContextManager[Env]]


def _factory(request: pytest.FixtureRequest) -> AppFactory:
    strategy = STRATEGIES[request.param]
    url = str(request.getfixturevalue(strategy.url_fixture))

    def make(**settings: Any) -> AbstractAsyncContextManager[Env]:
        """Tenants alpha and beta (overlapping ids) behind the security app, pool of one."""
        return two_tenants(
            url,
            build=build_security_app,
            raise_app_exceptions=False,
            **{**strategy.settings, **settings},
        )

    return make


@pytest.fixture(params=POOLED)
def pooled_app(request: pytest.FixtureRequest) -> AppFactory:
    """An app factory for each strategy whose tenants share a pool of PostgreSQL connections."""
    return _factory(request)


@pytest.fixture(params=list(STRATEGIES))
def any_app(request: pytest.FixtureRequest) -> AppFactory:
    """An app factory for each strategy."""
    return _factory(request)
