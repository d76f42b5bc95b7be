"""The frame of every command: without --app the CLI says which configuration and database it
uses, instead of silently creating ./tenancy.db."""

import os
import subprocess
from pathlib import Path

from tests.cli.test_cli import SCRIPT


def _run(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")}
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**environment, **env},
        timeout=120,
        check=False,
    )


def test_without_configuration_the_default_database_is_named(tmp_path: Path) -> None:
    done = _run(tmp_path, "tenants", "list")
    assert done.returncode == 0, done.stderr
    note = " ".join(done.stderr.split())
    assert "configuration: TENANCY_* variables (no --app); database sqlite+aiosqlite:///./tenancy.db" in note
    assert "the default: set TENANCY_DATABASE_URL, or name the app's manager with --app" in note


def test_the_configured_database_is_named_with_its_password_masked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    done = _run(tmp_path, "tenants", "list", TENANCY_DATABASE_URL=url)
    assert done.returncode == 0, done.stderr
    note = " ".join(done.stderr.split())
    assert f"database sqlite+aiosqlite:///{tmp_path / 'registry.db'} (TENANCY_DATABASE_URL)" in note
    done = _run(tmp_path, "tenants", "list", TENANCY_DATABASE_URL="postgresql://app:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in done.stdout + done.stderr
    assert "postgresql+asyncpg://app:***@127.0.0.1:1/x" in done.stderr


def test_json_output_stays_machine_readable_even_with_stderr_mixed_in(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    done = _run(tmp_path, "--json", "tenants", "list", TENANCY_DATABASE_URL=url)
    assert done.returncode == 0, done.stderr
    assert (done.stdout.strip(), done.stderr) == ("[]", "")


def test_with_app_there_is_no_note(tmp_path: Path) -> None:
    (tmp_path / "app_module.py").write_text(
        "from fastapi_tenancy import TenancyConfig, TenancyManager\n"
        f"manager = TenancyManager(TenancyConfig(database_url='sqlite:///{tmp_path / 'x.db'}'))\n"
    )
    done = _run(tmp_path, "--app", "app_module:manager", "tenants", "list")
    assert done.returncode == 0, done.stderr
    assert "configuration:" not in done.stderr
