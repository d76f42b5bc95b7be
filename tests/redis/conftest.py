"""Fixtures of the Redis tests: a redis-server of the test's own."""

import shutil
from collections.abc import AsyncIterator

import pytest

from .servers import OwnRedis


@pytest.fixture
async def own_redis() -> AsyncIterator[OwnRedis]:
    """A throwaway redis-server (never the shared one), stopped after the test."""
    redis = OwnRedis()
    await redis.start()
    try:
        yield redis
    finally:
        await redis.kill()
        shutil.rmtree(redis.workdir, ignore_errors=True)
