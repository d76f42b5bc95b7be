"""The public surface: sorted, complete __all__ and no optional dependency on import (the
background and observability modules keep theirs to themselves; a missing extra is named)."""

import subprocess
import sys

import fastapi_tenancy


def test_all_is_sorted_and_complete() -> None:
    assert fastapi_tenancy.__all__ == sorted(fastapi_tenancy.__all__)
    public = {name for name in vars(fastapi_tenancy) if not name.startswith("_")}
    modules = {name for name, value in vars(fastapi_tenancy).items() if type(value) is type(sys)}
    assert public - modules == set(fastapi_tenancy.__all__) - {"__version__"}


def test_the_quick_start_import_paths_exist() -> None:
    from fastapi_tenancy import TenancyConfig, TenancyManager, TenancyMiddleware, Tenant  # noqa: F401
    from fastapi_tenancy.dependencies import get_current_tenant, make_tenant_db_dependency  # noqa: F401
    from fastapi_tenancy.storage.database import SQLAlchemyTenantStore  # noqa: F401


def test_importing_the_package_imports_no_optional_dependency() -> None:
    code = (
        "import sys, fastapi_tenancy, fastapi_tenancy.dependencies, fastapi_tenancy.storage.database;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('asyncpg', 'aiosqlite', 'aiomysql', 'asyncmy', 'redis', 'jwt', 'alembic', 'typer', 'rich'));"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


OPTIONAL = ("arq", "celery", "kombu", "prometheus_client", "opentelemetry", "redis", "jinja2")


def test_the_core_modules_import_no_optional_dependency() -> None:
    code = (
        "import sys, fastapi_tenancy, fastapi_tenancy.background, fastapi_tenancy.cache, "
        "fastapi_tenancy.events, fastapi_tenancy.audit, fastapi_tenancy.logs, fastapi_tenancy.integrations;"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r});"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_a_missing_extra_is_named() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "try:\n    import fastapi_tenancy.metrics\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'fastapi-tenancy[prometheus]'" in result.stdout


def test_the_console_names_its_extra_when_jinja2_is_missing() -> None:
    code = (
        "import sys; sys.modules['jinja2'] = None\n"
        "import fastapi_tenancy\n"
        "manager = fastapi_tenancy.TenancyManager(fastapi_tenancy.TenancyConfig(database_url='sqlite://'))\n"
        "try:\n    manager.console(auth=lambda: 'alice')\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == (
        "MissingDependencyError jinja2 is not installed: pip install 'fastapi-tenancy[console]'"
    )


def test_the_fleet_names_keep_their_first_import_path() -> None:
    from fastapi_tenancy import errors, fleet
    from fastapi_tenancy.migrations import env, results
    from fastapi_tenancy.migrations import fleet as orchestrator

    assert fleet.FleetMigrator is orchestrator.FleetMigrator
    assert fleet.FleetBusyError is errors.FleetBusyError
    assert fleet.FLEET_ATTRIBUTE == env.FLEET_ATTRIBUTE
    for name in ("FleetReport", "TenantMigration", "TenantResult", "TEMPLATE_LABEL", "SPARE_LABEL"):
        assert getattr(fleet, name) is getattr(results, name), name
    assert sorted(fleet.__all__) == sorted(
        ["FLEET_ATTRIBUTE", "SPARE_LABEL", "TEMPLATE_LABEL", "Direction", "FleetBusyError"]
        + ["FleetMigrator", "FleetReport", "Outcome", "TenantMigration", "TenantResult"]
    )
