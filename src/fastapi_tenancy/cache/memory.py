"""`MemoryCacheBackend`: a bounded in-process LRU, for one process or for tests."""

import time
from collections import OrderedDict

from .base import CacheBackend

__all__ = ["MemoryCacheBackend"]


class MemoryCacheBackend(CacheBackend):
    """Entries in this process's memory. Safe for concurrent use within one event loop.

    At most `max_entries` entries (least recently used evicted first). Each process
    has its own: use `RedisCacheBackend` when several workers must see one cache
    and one invalidation.
    """

    def __init__(self, *, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._versions: dict[str, int] = {}
        self._entries: OrderedDict[tuple[str, int, str], tuple[bytes, float | None]] = OrderedDict()

    def _key(self, namespace: str, key: str) -> tuple[str, int, str]:
        return namespace, self._versions.get(namespace, 0), key

    async def get(self, namespace: str, key: str) -> bytes | None:
        full = self._key(namespace, key)
        entry = self._entries.get(full)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and expires <= time.monotonic():
            del self._entries[full]
            return None
        self._entries.move_to_end(full)
        return value

    async def set(self, namespace: str, key: str, value: bytes, ttl: float | None) -> None:
        full = self._key(namespace, key)
        self._entries[full] = (value, None if ttl is None else time.monotonic() + ttl)
        self._entries.move_to_end(full)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def delete(self, namespace: str, key: str) -> None:
        self._entries.pop(self._key(namespace, key), None)

    async def invalidate(self, namespace: str) -> None:
        # One step: the version is part of every key, so nothing set before is found.
        version = self._versions.get(namespace, 0)
        self._versions[namespace] = version + 1
        # Free the memory now too; only this namespace's old version is touched.
        for full in [k for k in self._entries if k[0] == namespace and k[1] == version]:
            del self._entries[full]
