"""A `Tenant` as flat strings: the form the Redis registry and the Redis cache keep.

Private to the storage family. Fields are taken from the `Tenant` dataclass, so a field
added to `Tenant` is stored by both without changes here.
"""

import json
from collections.abc import Mapping
from dataclasses import fields
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from ..tenant import Tenant, TenantStatus, thaw

__all__ = ["decode", "encode", "pairs", "stamp"]

# The fields a tenant keeps for life; every other dataclass field is "mutable" and is
# stored as one JSON document, so fields added to `Tenant` flow through unchanged.
_FIXED = ("id", "identifier", "created_at")
_DATETIMES = frozenset(f.name for f in fields(Tenant) if f.type in (datetime, datetime | None))


def stamp(value: datetime) -> str:
    """`value` as an ISO 8601 string in UTC (what the registry's scripts compare)."""
    return value.astimezone(UTC).isoformat()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return stamp(value)
    if isinstance(value, Enum):
        return value.value
    return thaw(value)


def encode(tenant: Tenant) -> dict[str, str]:
    """The tenant as flat strings: fixed fields, status, updated_at and the rest as JSON."""
    rest = {
        f.name: _plain(getattr(tenant, f.name))
        for f in fields(tenant)
        if f.name not in _FIXED and f.name not in ("status", "updated_at")
    }
    return {
        "id": tenant.id,
        "identifier": tenant.identifier,
        "created_at": stamp(tenant.created_at),
        "status": tenant.status.value,
        "updated_at": stamp(tenant.updated_at),
        "fields": json.dumps(rest, separators=(",", ":")),
    }


def decode(record: Mapping[str, str]) -> Tenant:
    """The `Tenant` that `encode` turned into `record`."""
    values: dict[str, Any] = json.loads(record["fields"])
    values.update(
        id=record["id"],
        identifier=record["identifier"],
        created_at=record["created_at"],
        status=TenantStatus(record["status"]),
        updated_at=record["updated_at"],
    )
    for name in _DATETIMES:
        if isinstance(values.get(name), str):
            values[name] = datetime.fromisoformat(values[name])
    known = {f.name for f in fields(Tenant)}
    # A field removed from Tenant since the record was written is ignored, not fatal.
    return Tenant(**{k: v for k, v in values.items() if k in known})


def pairs(flat: list[str]) -> dict[str, str]:
    """`[k1, v1, k2, v2, ...]` (what `HGETALL` answers inside a script) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
