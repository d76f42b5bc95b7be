"""Coming from fastapi-tenancy 0.5.0: its setting names and top-level names, mapped to ours.

0.5.0 is the library this one succeeds under the same import name. A 0.5.0 setting
whose meaning is exactly one of ours is translated, with a `DeprecationWarning` (and a
log line, since servers hide those warnings) naming our setting; every other 0.5.0
setting is refused with an error that names what to use instead. None is silently
ignored: 0.5.0 ignored unknown variables, so `TENANCY_ENABLE_RATE_LIMITING=true` would
otherwise leave rate limiting off without a word. A 0.5.0 top-level name with no
counterpart here raises an `ImportError` saying what replaced it.

All of this runs once, when the configuration is built or the name imported; nothing
here is on the request path. docs/coming-from-0.5.md has the whole story.
"""

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

__all__ = [
    "LEGACY_NAMES",
    "LEGACY_SETTINGS",
    "Refused",
    "Renamed",
    "legacy_import_error",
    "translate_legacy_settings",
]

logger = logging.getLogger("fastapi_tenancy")

_BOOL = TypeAdapter(bool)


@dataclass(frozen=True)
class Renamed:
    """A 0.5.0 setting that means exactly one of ours: `setting`, its value through `convert`.

    `setting` None: we always behave as the setting asks, so there is nothing to set.
    `convert` raises `ValueError` for a value with no exact counterpart.
    """

    setting: str | None
    convert: Callable[[Any], Any] | None = None
    note: str = ""


@dataclass(frozen=True)
class Refused:
    """A 0.5.0 setting with no exact counterpart; `reason` names what to use instead."""

    reason: str


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _negated(value: Any) -> bool:
    return not _BOOL.validate_python(value)


def _only_true(replacement: str) -> Callable[[Any], Any]:
    # A switch whose `true` is how we always behave, and whose `false` we cannot do.
    def convert(value: Any) -> Any:
        if not _BOOL.validate_python(value):
            raise ValueError(replacement)
        return value

    return convert


def _tier(value: Any) -> Any:
    if str(value) not in ("schema", "database", "rls"):
        raise ValueError("hybrid_default_tier is one of 'schema', 'database' and 'rls'")
    return str(value)


def _default_status(value: Any) -> Any:
    if str(value) != "active":
        raise ValueError("tenants become active once their storage exists: register, then suspend_tenant()")
    return value


LEGACY_SETTINGS: Mapping[str, Renamed | Refused] = {
    "enable_rate_limiting": Renamed("rate_limit_enabled"),
    "rate_limit_per_minute": Renamed(
        "rate_limit_requests", note="it was the limit per rate_limit_window_seconds, whatever its name"
    ),
    "rate_limit_window_seconds": Renamed("rate_limit_window"),
    "rate_limit_fail_closed": Renamed(
        "rate_limit_fail_open", _negated, "the value is inverted; refused requests get 503, not 429"
    ),
    "jwt_algorithm": Renamed("jwt_algorithms", _as_list, "it takes a list: ['HS256']"),
    "l1_cache_max_size": Renamed("cache_max_size"),
    "l1_cache_ttl_seconds": Renamed("cache_ttl"),
    "standard_isolation_strategy": Renamed(
        "hybrid_default_tier",
        _tier,
        note="the tier of tenants registered without tier= or a plan in hybrid_plan_tiers",
    ),
    "enable_audit_logging": Renamed(
        None,
        _only_true("every tenant change is audited; pass TenancyManager(audit=...) a writer of your own"),
        "every tenant change is audited (TenancyManager(audit=...)); remove the setting",
    ),
    "default_tenant_status": Renamed(None, _default_status, "tenants are active once their storage exists"),
    # 0.5.0 had no such setting (its README named it, and 0.5.0 ignored it): a value taken
    # now would change a limit that was never applied.
    "rate_limit_max_requests": Refused(
        "fastapi-tenancy 0.5.0 never read it; the requests allowed per window are rate_limit_requests"
    ),
    "database_url_template": Refused(
        "with isolation_strategy='database' each tenant's database is named schema_prefix + identifier "
        "on the server of database_url; register a tenant on another server with "
        "register_tenant(database_url=...)"
    ),
    "enable_encryption": Refused(
        "set encryption_keys (Fernet keys) to encrypt tenants' database_url; values 0.5.0 "
        "encrypted ('enc::...') must be decrypted with 0.5.0 first"
    ),
    "encryption_key": Refused(
        "encryption_keys takes Fernet keys (Fernet.generate_key()), not a passphrase; "
        "metadata keys are not encrypted"
    ),
    "premium_tenants": Refused(
        "a hybrid tenant's tier is stored with it: register_tenant(tier=...), or hybrid_plan_tiers "
        "by its metadata plan; move_tenant() changes it"
    ),
    "premium_isolation_strategy": Refused(
        "tiers are chosen per tenant: register_tenant(tier=...) or hybrid_plan_tiers"
    ),
    "max_tenants": Refused(
        "fastapi-tenancy 0.5.0 never enforced it; check manager.store.count() in your sign-up code"
    ),
    "allow_tenant_registration": Refused(
        "fastapi-tenancy 0.5.0 never read it; tenants are registered only by your code"
    ),
    "enable_query_logging": Refused(
        "fastapi-tenancy 0.5.0 never read it; database_echo logs every statement"
    ),
    "slow_query_threshold_ms": Refused(
        "fastapi-tenancy 0.5.0 never read it; use PostgreSQL's log_min_duration_statement or tracing"
    ),
    "public_schema": Refused(
        "a tenant session never falls back to a shared schema (0.5.0 never read the setting)"
    ),
    "enable_metrics": Refused(
        "fastapi-tenancy 0.5.0 only echoed it; metrics are fastapi_tenancy.metrics (the prometheus extra)"
    ),
    "enable_soft_delete": Refused(
        "delete_tenant() is soft unless destroy_data=True, which then really drops the data "
        "(0.5.0 ignored destroy_data under its default)"
    ),
}
"""Every 0.5.0 setting we do not share, by name: translated (`Renamed`) or refused."""

# 0.5.0 cached tenant records in memory when either switch was on, and read the store on
# every request otherwise: our registry cache is always on, `cache_ttl=0` switches it off.
_CACHE_SWITCHES = ("cache_enabled", "l1_cache_enabled")


def translate_legacy_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` (setting name -> value) with 0.5.0 names replaced by ours.

    Warns once per translated name; raises `ValueError` naming every refused one, and
    any 0.5.0 name given together with the setting it maps to.
    """
    result = {name: value for name, value in values.items() if name not in LEGACY_SETTINGS}
    for name in _CACHE_SWITCHES:
        result.pop(name, None)
    problems: list[str] = []
    notices: list[str] = []  # warned about only if nothing is refused

    def assign(old: str, new: str, value: Any, note: str, message: str = "") -> None:
        if new in result:
            problems.append(f"{old} is the fastapi-tenancy 0.5.0 name of {new}, and both are set: keep {new}")
            return
        result[new] = value
        notices.append(
            _notice(
                message
                or f"{old} is the fastapi-tenancy 0.5.0 name of {new}: rename it (TENANCY_{new.upper()})",
                note,
            )
        )

    switches = [name for name in _CACHE_SWITCHES if name in values]
    if switches:
        try:
            on = any(_BOOL.validate_python(values[name]) for name in switches)
        except ValueError:
            problems.append(f"{' and '.join(switches)}: not a boolean")
        else:
            if on:
                notices.append(
                    f"{' and '.join(switches)}: the registry cache is always on (cache_ttl); remove it"
                )
            else:
                names = " and ".join(f"{name}=false" for name in switches)
                message = f"{names}: the fastapi-tenancy 0.5.0 way of saying cache_ttl=0; set that instead"
                assign(
                    switches[0],
                    "cache_ttl",
                    0.0,
                    "no registry cache: every request reads the registry",
                    message,
                )
    for old, rule in LEGACY_SETTINGS.items():
        if old not in values:
            continue
        if isinstance(rule, Refused):
            problems.append(f"{old} (fastapi-tenancy 0.5.0) has no exact counterpart: {rule.reason}")
            continue
        try:
            value = values[old] if rule.convert is None else rule.convert(values[old])
        except ValueError as exc:
            problems.append(
                f"{old}={values[old]!r:.40} (fastapi-tenancy 0.5.0) has no exact counterpart: {exc}"
            )
            continue
        if rule.setting is None:
            notices.append(_notice(f"{old} is a fastapi-tenancy 0.5.0 setting", rule.note))
        else:
            assign(old, rule.setting, value, rule.note)
    if problems:
        raise ValueError("; ".join(problems) + " (see docs/coming-from-0.5.md)")
    for notice in notices:
        logger.warning("%s", notice)
        warnings.warn(notice, DeprecationWarning, stacklevel=2)
    return result


def _notice(message: str, note: str) -> str:
    return f"{message} ({note})" if note else message


# -- 0.5.0's top-level names that have no counterpart at the root ---------------------------

_ISOLATION = (
    "isolation_strategy={!r} builds it (fastapi_tenancy.isolation); "
    "TenancyManager(isolation=...) takes your own"
)
_RESOLUTION = (
    "resolution_strategy={!r} builds it (fastapi_tenancy.resolution); a custom resolver is a "
    "fastapi_tenancy.resolution.base.Resolver or an async function returning the identifier"
)
_NEVER_RAISED = "fastapi-tenancy 0.5.0 never raised it; "

LEGACY_NAMES: Mapping[str, str] = {
    "AuditLog": "every tenant change is audited by the manager: fastapi_tenancy.audit (AuditEntry)",
    "IsolationStrategy": "isolation_strategy takes the strings 'schema', 'database', 'rls' and 'hybrid'",
    "ResolutionStrategy": (
        "resolution_strategy takes the strings 'header', 'subdomain', 'path', 'jwt', 'chain' and 'custom'"
    ),
    "TenantConfig": (
        "a tenant's own settings are its metadata (tenant.metadata); request limits by plan: rate_limit_plans"
    ),
    "TenantMetrics": "metrics are fastapi_tenancy.metrics (Prometheus)",
    "TenantContext": (
        "read the tenant with current_tenant() or current_tenant_or_none(), set it with tenant_scope()"
    ),
    "get_current_tenant": (
        "call current_tenant() in code; as a FastAPI dependency use "
        "fastapi_tenancy.dependencies.get_current_tenant (or CurrentTenant)"
    ),
    "IsolationError": (
        "a failed provisioning raises ProvisioningError, an unreachable database TenancyUnavailableError"
    ),
    "MigrationError": "fleet migrations report each tenant's outcome: fastapi_tenancy.fleet.FleetReport",
    "TenantDataLeakageError": _NEVER_RAISED + "fastapi_tenancy.testing.assert_isolated looks for leaks",
    "TenantQuotaExceededError": _NEVER_RAISED + "a tenant over its request limit gets RateLimitExceededError",
    "DatabaseConnectionError": _NEVER_RAISED + "an unreachable database raises TenancyUnavailableError",
    "BaseIsolationProvider": "the base of isolation strategies is fastapi_tenancy.isolation.base.Isolation",
    "SchemaIsolationProvider": _ISOLATION.format("schema"),
    "DatabaseIsolationProvider": _ISOLATION.format("database"),
    "RLSIsolationProvider": _ISOLATION.format("rls"),
    "HybridIsolationProvider": _ISOLATION.format("hybrid"),
    "BaseTenantResolver": _RESOLUTION.format("custom"),
    "HeaderTenantResolver": _RESOLUTION.format("header"),
    "SubdomainTenantResolver": _RESOLUTION.format("subdomain"),
    "PathTenantResolver": _RESOLUTION.format("path"),
    "JWTTenantResolver": _RESOLUTION.format("jwt"),
    "TenantCache": (
        "the manager caches tenant records itself (cache_ttl, cache_max_size); "
        "fastapi_tenancy.cache.TenantCache caches your own data per tenant"
    ),
    "RedisTenantStore": (
        "a Redis cache in front of a store is fastapi_tenancy.storage.caching.CachingTenantStore; "
        "fastapi_tenancy.storage.redis.RedisTenantStore keeps the registry itself in Redis"
    ),
    "TenantMigrationManager": (
        "tenant migrations are fastapi_tenancy.migrations and `fastapi-tenancy migrate upgrade`"
    ),
}
"""0.5.0's top-level names we do not export, and what replaced each."""


def legacy_import_error(module: str, name: str) -> ImportError | None:
    """The error for `from <module> import <name>` when `name` is a 0.5.0 name; else None."""
    hint = LEGACY_NAMES.get(name)
    if hint is None:
        return None
    return ImportError(
        f"{name} was a fastapi-tenancy 0.5.0 name; {hint} (see docs/coming-from-0.5.md)",
        name=module,
    )
