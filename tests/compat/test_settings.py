"""fastapi-tenancy 0.5.0 settings: each translated with a DeprecationWarning when its meaning is
exactly one of ours, refused with an error naming ours otherwise, never silently ignored."""

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.compat import LEGACY_SETTINGS, Refused, Renamed

# Every field of 0.5.0's TenancyConfig, and the README's TENANCY_RATE_LIMIT_MAX_REQUESTS.
FIELDS_050 = {
    "resolution_strategy", "isolation_strategy", "database_url", "database_pool_size",
    "database_max_overflow", "database_pool_timeout", "database_pool_recycle", "database_pool_pre_ping",
    "database_echo", "database_url_template", "max_cached_engines", "redis_url", "cache_ttl",
    "cache_enabled", "l1_cache_enabled", "l1_cache_max_size", "l1_cache_ttl_seconds",
    "enable_rate_limiting", "rate_limit_per_minute", "rate_limit_window_seconds", "rate_limit_fail_closed",
    "tenant_header_name", "domain_suffix", "path_prefix", "jwt_secret", "jwt_algorithm", "jwt_tenant_claim",
    "jwt_audience", "enable_audit_logging", "enable_encryption", "encryption_key",
    "allow_tenant_registration", "max_tenants", "default_tenant_status", "enable_soft_delete",
    "enable_query_logging", "slow_query_threshold_ms", "enable_metrics", "premium_tenants",
    "premium_isolation_strategy", "standard_isolation_strategy", "schema_prefix", "public_schema",
    "rate_limit_max_requests",
}  # fmt: skip

# 0.5.0 name, the value as a 0.5.0 user sets it (environment form), our field and its value.
TRANSLATED: list[tuple[str, str, str, Any]] = [
    ("enable_rate_limiting", "true", "rate_limit_enabled", True),
    ("rate_limit_per_minute", "3", "rate_limit_requests", 3),
    ("rate_limit_window_seconds", "30", "rate_limit_window", 30.0),
    ("rate_limit_fail_closed", "true", "rate_limit_fail_open", False),
    ("rate_limit_fail_closed", "false", "rate_limit_fail_open", True),
    ("jwt_algorithm", "HS512", "jwt_algorithms", ("HS512",)),
    ("l1_cache_max_size", "500", "cache_max_size", 500),
    ("l1_cache_ttl_seconds", "60", "cache_ttl", 60.0),
    ("standard_isolation_strategy", "schema", "hybrid_default_tier", "schema"),
    ("cache_enabled", "false", "cache_ttl", 0.0),
    ("l1_cache_enabled", "false", "cache_ttl", 0.0),
    ("cache_enabled", "true", "cache_ttl", 30.0),  # ours is always on
    ("l1_cache_enabled", "true", "cache_ttl", 30.0),
    ("enable_audit_logging", "true", "cache_ttl", 30.0),  # ours always audits: nothing changes
    ("default_tenant_status", "active", "cache_ttl", 30.0),
]

REFUSED_VALUES = [
    ("enable_audit_logging", "false", "TenancyManager(audit=...)"),
    ("default_tenant_status", "suspended", "suspend_tenant()"),
    ("standard_isolation_strategy", "hybrid", "hybrid_default_tier is one of"),
]


def test_every_050_setting_is_ours_translated_or_refused() -> None:
    ours = set(TenancyConfig.model_fields)
    handled = ours | set(LEGACY_SETTINGS) | {"cache_enabled", "l1_cache_enabled"}
    assert FIELDS_050 <= handled, sorted(FIELDS_050 - handled)
    assert set(LEGACY_SETTINGS) <= FIELDS_050  # nothing invented
    assert not set(LEGACY_SETTINGS) & ours


@pytest.mark.parametrize(("old", "value", "new", "expected"), TRANSLATED, ids=lambda v: str(v))
@pytest.mark.parametrize("source", ["argument", "environment"])
def test_a_050_setting_with_our_meaning_is_translated_with_a_warning(
    old: str, value: str, new: str, expected: Any, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs: dict[str, Any] = {"database_url": "sqlite://"}
    if source == "environment":
        monkeypatch.setenv(f"TENANCY_{old.upper()}", value)
    else:
        kwargs[old] = value
    with pytest.warns(DeprecationWarning, match=old):
        config = TenancyConfig(**kwargs)
    assert getattr(config, new) == expected


@pytest.mark.parametrize("old", sorted(n for n, rule in LEGACY_SETTINGS.items() if isinstance(rule, Refused)))
@pytest.mark.parametrize("source", ["argument", "environment"])
def test_a_050_setting_without_our_meaning_is_refused(
    old: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs: dict[str, Any] = {"database_url": "sqlite://"}
    if source == "environment":
        monkeypatch.setenv(f"TENANCY_{old.upper()}", "1")
    else:
        kwargs[old] = "1"
    with pytest.raises(ValidationError) as caught:
        TenancyConfig(**kwargs)
    message = str(caught.value)
    assert f"{old} (fastapi-tenancy 0.5.0) has no exact counterpart" in message
    rule = LEGACY_SETTINGS[old]
    assert isinstance(rule, Refused) and rule.reason in message
    assert "docs/coming-from-0.5.md" in message


@pytest.mark.parametrize(("old", "value", "hint"), REFUSED_VALUES, ids=lambda v: str(v))
def test_a_050_value_without_our_meaning_is_refused(old: str, value: str, hint: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(hint)):
        settings: dict[str, Any] = {"database_url": "sqlite://", old: value}
        TenancyConfig(**settings)


def test_each_refusal_names_an_alternative() -> None:
    for name, rule in LEGACY_SETTINGS.items():
        if isinstance(rule, Refused):
            assert len(rule.reason) > 30, name
        else:
            assert isinstance(rule, Renamed)
            assert rule.setting is None or rule.setting in TenancyConfig.model_fields, name


def test_the_readme_rate_limit_variables_switch_the_limiter_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: TENANCY_ENABLE_RATE_LIMITING=true was ignored and requests were never limited.
    monkeypatch.setenv("TENANCY_ENABLE_RATE_LIMITING", "true")
    monkeypatch.setenv("TENANCY_RATE_LIMIT_PER_MINUTE", "3")
    with pytest.warns(DeprecationWarning) as warned:
        manager = TenancyManager(TenancyConfig(database_url="sqlite://"))
    assert {str(w.message).split()[0] for w in warned} == {"enable_rate_limiting", "rate_limit_per_minute"}
    assert manager.rate_limiter is not None
    assert manager.config.rate_limit_requests == 3


def test_a_translation_is_logged_too(caplog: pytest.LogCaptureFixture) -> None:
    # Servers do not show DeprecationWarning; the log line is what an operator sees.
    with caplog.at_level(logging.WARNING, "fastapi_tenancy"), pytest.warns(DeprecationWarning):
        TenancyConfig(database_url="sqlite://", enable_rate_limiting=True)  # type: ignore[call-arg]
    assert "enable_rate_limiting is the fastapi-tenancy 0.5.0 name of rate_limit_enabled" in caplog.text


def test_a_050_name_beside_ours_is_refused_whatever_the_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANCY_ENABLE_RATE_LIMITING", "true")
    with pytest.raises(ValidationError, match="both are set: keep rate_limit_enabled"):
        TenancyConfig(database_url="sqlite://", rate_limit_enabled=True)
    monkeypatch.delenv("TENANCY_ENABLE_RATE_LIMITING")
    with pytest.raises(ValidationError, match="both are set: keep cache_ttl"):
        TenancyConfig(database_url="sqlite://", l1_cache_ttl_seconds=5, cache_enabled=False)  # type: ignore[call-arg]


def test_all_refusals_are_listed_at_once() -> None:
    with pytest.raises(ValidationError) as caught:
        TenancyConfig(database_url="sqlite://", max_tenants=5, enable_encryption=True)  # type: ignore[call-arg]
    assert "max_tenants" in str(caught.value) and "enable_encryption" in str(caught.value)


def test_either_cache_switch_on_means_the_cache_is_on() -> None:
    with pytest.warns(DeprecationWarning, match="always on"):
        config = TenancyConfig(database_url="sqlite://", cache_enabled=False, l1_cache_enabled=True)  # type: ignore[call-arg]
    assert config.cache_ttl == 30.0


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [(".example.com", "example.com"), ("example.com", "example.com"), (" .Example.COM. ", "example.com")],
)
def test_the_050_domain_suffix_form_is_accepted(suffix: str, expected: str) -> None:
    config = TenancyConfig(database_url="sqlite://", resolution_strategy="subdomain", domain_suffix=suffix)
    assert config.domain_suffix == expected


@pytest.mark.parametrize("suffix", ["..example.com", ".", "", ".example..com"])
def test_a_domain_suffix_is_still_checked(suffix: str) -> None:
    with pytest.raises(ValidationError, match="domain_suffix"):
        TenancyConfig(database_url="sqlite://", resolution_strategy="subdomain", domain_suffix=suffix)


def test_the_050_path_prefix_form_is_refused_naming_the_fix() -> None:
    # 0.5.0's README wrote "/t/"; the prefix is "/t" (kept strict: a refusal, not a guess).
    with pytest.raises(ValidationError, match="without a trailing '/'"):
        TenancyConfig(database_url="sqlite://", path_prefix="/t/")


def test_the_migration_page_lists_every_050_setting_we_do_not_share() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "coming-from-0.5.md").read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    for name in [*LEGACY_SETTINGS, "cache_enabled", "l1_cache_enabled"]:
        assert any(f"`{name}`" in row.split(" | ")[0] for row in rows), name
