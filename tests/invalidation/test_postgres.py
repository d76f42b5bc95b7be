"""The LISTEN connection ignores URL arguments meant for SQLAlchemy's asyncpg adapter."""

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.invalidation.postgres import PostgresInvalidation


async def test_listen_works_with_a_prepared_statement_cache_size_in_the_url(postgres_url: str) -> None:
    url = f"{postgres_url}?prepared_statement_cache_size=500"
    manager = TenancyManager(TenancyConfig(database_url=url, database_pool_size=2, database_max_overflow=0))
    try:
        await manager.initialize()
        channel = manager.invalidation
        assert isinstance(channel, PostgresInvalidation)
        assert channel.reconnects == 1 and channel.failures == 0  # listening at the first try
    finally:
        await manager.close()
