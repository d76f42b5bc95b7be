"""Cross-process cache invalidation: tell every worker that a tenant changed.

`InvalidationChannel` (base) is the contract; `RedisInvalidation` (Redis pub/sub, in
`fastapi_tenancy.invalidation.redis`) and `PostgresInvalidation` (LISTEN/NOTIFY, in
`fastapi_tenancy.invalidation.postgres`) carry the messages. The manager picks one
from the config and starts it in `initialize()`.
"""

from .base import InvalidationChannel

__all__ = ["InvalidationChannel"]
