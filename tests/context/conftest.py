"""The synchronous `redis_url` test_cache.py asks for with `getfixturevalue` from an async fixture."""

import pytest

from ..conftest import REDIS_URL, REQUIRE_SERVICES

_redis_down: list[str] = []


@pytest.fixture
def redis_url() -> str:
    """The shared Redis; every test uses keys and queues under a unique prefix.

    Synchronous, so that async fixtures can ask for it with `getfixturevalue`.
    """
    import redis

    if not _redis_down:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
        try:
            client.ping()
            _redis_down.append("")
        except redis.RedisError as exc:
            _redis_down.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()
    if _redis_down[0]:
        if REQUIRE_SERVICES:
            pytest.fail(f"Redis is required (TENANCY_TEST_REQUIRE_SERVICES=1): {_redis_down[0]}")
        pytest.skip(f"Redis not reachable: {_redis_down[0]}")
    return REDIS_URL
