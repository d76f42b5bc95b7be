"""The background and observability modules keep their optional dependencies to themselves."""

import subprocess
import sys

OPTIONAL = ("arq", "prometheus_client", "opentelemetry", "redis")


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
