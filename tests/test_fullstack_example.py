"""examples/fullstack, end to end on PostgreSQL: its own suite, run with the pytest plugin as its
README says (migrations through the CLI, login, CRUD as two tenants, `assert_isolated`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import POSTGRES_URL

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fullstack"

pytestmark = pytest.mark.postgres


def test_the_fullstack_example_passes_its_own_tests() -> None:
    # The example's settings only: none of this suite's TENANCY_* variables leak in.
    env = {name: value for name, value in os.environ.items() if not name.startswith("TENANCY_")}
    env.update({"TENANCY_TEST_POSTGRES_URL": POSTGRES_URL, "PYTHONDONTWRITEBYTECODE": "1"})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-q"],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tests = sum(path.read_text().count("\nasync def test_") for path in (EXAMPLE / "tests").glob("test_*.py"))
    summary = result.stdout.strip().splitlines()[-1]
    assert tests >= 5 and re.fullmatch(rf"{tests} passed in .*", summary), result.stdout  # none skipped
