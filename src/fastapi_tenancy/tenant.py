"""The `Tenant` record, its status lifecycle and the identifier rules."""

import re
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from .errors import InvalidIdentifierError, InvalidTransitionError

__all__ = [
    "IDENTIFIER_MAX_LENGTH",
    "FrozenDict",
    "Tenant",
    "TenantStatus",
    "freeze",
    "thaw",
    "validate_identifier",
]

IDENTIFIER_MAX_LENGTH = 63

# Lower-case letters, digits and inner hyphens only. The alphabet has no "_" on
# purpose: storage names replace "-" with "_", and with "_" absent from slugs that
# replacement is a bijection, so two slugs can never map to one schema or file
# ("acme-corp" -> acme_corp, "acme--corp" -> acme__corp). No case folding either:
# "Acme" is refused rather than silently merged with "acme".
_IDENTIFIER = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def validate_identifier(identifier: str) -> str:
    """Return `identifier` if it is a well-formed tenant slug, else raise.

    Called before any lookup or DDL, so hostile input never reaches a query or a
    cache key. Raises `InvalidIdentifierError` (a `ValueError`).
    """
    if not isinstance(identifier, str) or _IDENTIFIER.fullmatch(identifier) is None:
        # repr() of at most 80 chars: the value is attacker-controlled.
        raise InvalidIdentifierError(
            f"invalid tenant identifier {identifier!r:.80}: use 1-63 lower-case letters, "
            "digits and inner hyphens"
        )
    return identifier


class TenantStatus(StrEnum):
    """Where a tenant is in its lifecycle. Only `active` tenants are served.

    `maintenance` is a pause an operator (or the fleet runner, or a tier move) puts an
    active tenant in: its requests get a 503 with `Retry-After` until it is active again.
    """

    PROVISIONING = "provisioning"
    ACTIVE = "active"
    MAINTENANCE = "maintenance"
    SUSPENDED = "suspended"
    DELETED = "deleted"


# The lifecycle, as a table. A deleted tenant is final: its slug stays reserved
# until its data is destroyed, so a new customer can never inherit old rows.
_TRANSITIONS: dict[TenantStatus, frozenset[TenantStatus]] = {
    TenantStatus.PROVISIONING: frozenset({TenantStatus.ACTIVE, TenantStatus.DELETED}),
    TenantStatus.ACTIVE: frozenset({TenantStatus.MAINTENANCE, TenantStatus.SUSPENDED, TenantStatus.DELETED}),
    # Maintenance ends in `active`; a suspension or deletion meanwhile wins over it.
    TenantStatus.MAINTENANCE: frozenset({TenantStatus.ACTIVE, TenantStatus.SUSPENDED, TenantStatus.DELETED}),
    TenantStatus.SUSPENDED: frozenset({TenantStatus.ACTIVE, TenantStatus.DELETED}),
    TenantStatus.DELETED: frozenset(),
}


class FrozenDict(Mapping[str, Any]):
    """A read-only, hashable mapping; nested dicts and lists are frozen too."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        # Keys interned: thousands of cached tenants with the same keys ("plan", ...) keep one
        # copy of each, where every registry read would otherwise bring its own.
        self._data: dict[str, Any] = {sys.intern(str(k)): freeze(v) for k, v in (data or {}).items()}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        # Equal to the plain JSON-shaped value it was made from (and to what a store
        # gives back): frozen tuples compare as the lists they were, so
        # `FrozenDict({"tags": ["a"]}) == {"tags": ["a"]}`.
        if isinstance(other, FrozenDict):
            return self._data == other._data
        if isinstance(other, Mapping):
            return bool(_comparable(self) == _comparable(other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (thaw(self),))


_NO_METADATA = FrozenDict()


def freeze(value: Any) -> Any:
    """Return an immutable copy of JSON-like data (dict → FrozenDict, list → tuple)."""
    if isinstance(value, FrozenDict):
        return value
    if isinstance(value, Mapping):
        return FrozenDict(value)
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if isinstance(value, set | frozenset):
        return frozenset(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Return plain, JSON-serialisable data from `freeze`d data."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    if isinstance(value, frozenset | set):
        return [thaw(v) for v in value]
    return value


def _comparable(value: Any) -> Any:
    # What `FrozenDict.__eq__` compares: tuples and lists alike as lists, mappings as
    # dicts, at any depth. Sets stay sets (their members are hashable already).
    if isinstance(value, Mapping):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_comparable(v) for v in value]
    return value


def _require_text(field_name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"tenant {field_name} must be a non-empty string, got {value!r:.80}")


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Tenant:
    """One customer of the application. Immutable: change it through the manager.

    `id` is opaque and never reused; `identifier` is the slug clients send
    (`acme-corp`). `metadata` is a deep-frozen mapping, so a route cannot change
    the cached record other requests see. `encrypted_database_url` is the tenant's
    own database server (database isolation), as ciphertext only: stores keep it as
    they get it, and only the isolation strategy decrypts it, to connect.
    `tier` names where a tenant's data lives under hybrid isolation (`schema`,
    `database`, `rls`); None under a single strategy.

    `metadata` compares equal to the plain dicts and lists it was made from
    (`tenant.metadata == {"tags": ["a"]}`), though a nested list reads back as a
    tuple. An empty or blank `id` or `name` raises `ValueError`, as a malformed
    `identifier` raises `InvalidIdentifierError` (also a `ValueError`).
    """

    identifier: str
    name: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: TenantStatus = TenantStatus.PROVISIONING
    metadata: Mapping[str, Any] = field(default_factory=lambda: _NO_METADATA)
    tier: str | None = None
    created_at: datetime = field(default_factory=_now)
    updated_at: datetime = field(default_factory=_now)
    # Ciphertext, yet still kept out of repr(): it is long, and says nothing useful.
    encrypted_database_url: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        validate_identifier(self.identifier)
        _require_text("id", self.id)
        _require_text("name", self.name)
        if not isinstance(self.metadata, FrozenDict):
            # One shared empty mapping: thousands of cached tenants without metadata
            # then add no object for the garbage collector to walk.
            object.__setattr__(self, "metadata", FrozenDict(self.metadata) if self.metadata else _NO_METADATA)
        object.__setattr__(self, "status", TenantStatus(self.status))

    @property
    def is_active(self) -> bool:
        """True when requests for this tenant may be served."""
        return self.status is TenantStatus.ACTIVE

    def can_become(self, status: TenantStatus) -> bool:
        """True when the lifecycle allows moving from the current status to `status`."""
        return status in _TRANSITIONS[self.status]

    def with_status(self, status: TenantStatus) -> "Tenant":
        """Return a copy in `status`; raise `InvalidTransitionError` if not allowed."""
        status = TenantStatus(status)
        if not self.can_become(status):
            raise InvalidTransitionError(
                f"tenant {self.identifier!r} cannot go from {self.status} to {status}"
            )
        return replace(self, status=status, updated_at=self._next_stamp())

    def with_changes(self, *, name: str | None = None, metadata: Mapping[str, Any] | None = None) -> "Tenant":
        """Return a copy with a new name and/or metadata (metadata is replaced whole)."""
        return replace(
            self,
            name=self.name if name is None else name,
            metadata=self.metadata if metadata is None else FrozenDict(metadata),
            updated_at=self._next_stamp(),
        )

    def with_metadata_patch(self, patch: Mapping[str, Any], *, name: str | None = None) -> "Tenant":
        """Return a copy with `patch` merged into the metadata, one level deep.

        A key patched to `None` is removed, as in a JSON merge patch (RFC 7396) at the
        top level; nested values are replaced, not merged.
        """
        merged = {**self.metadata, **patch}
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
        return self.with_changes(name=name, metadata=merged)

    def with_encrypted_database_url(self, token: str | None) -> "Tenant":
        """Return a copy holding `token` (e.g. after re-encryption under a new key)."""
        return replace(self, encrypted_database_url=token, updated_at=self._next_stamp())

    def with_tier(self, tier: str) -> "Tenant":
        """Return a copy placed in `tier` (hybrid isolation; see `TenancyManager.move_tenant`)."""
        return replace(self, tier=tier, updated_at=self._next_stamp())

    def _next_stamp(self) -> datetime:
        # Strictly later than the current one: `updated_at` is the version stores
        # compare-and-set on, so two changes must never share a value.
        return max(_now(), self.updated_at + timedelta(microseconds=1))
