"""The project template ships in the wheel, and `migrate init` from an installed wheel copies all of it."""

import subprocess
import sys
import zipfile
from pathlib import Path

from hatchling.builders.wheel import WheelBuilder

from .projects import TEMPLATE

ROOT = Path(__file__).resolve().parents[2]


def _files(root: Path) -> set[str]:
    return {
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_the_wheel_holds_the_template_and_migrate_init_copies_it(tmp_path: Path) -> None:
    expected = _files(TEMPLATE)
    # The empty versions/ folders are kept by a file, or Alembic's `revision` finds no folder.
    assert {"alembic.ini", "migrations/tenant/env.py", "migrations/tenant/versions/.keep"} <= expected
    [wheel] = WheelBuilder(str(ROOT)).build(directory=str(tmp_path / "dist"), versions=["standard"])
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    assert _files(installed / "fastapi_tenancy" / "migrations" / "template") == expected
    # The console script's code from the unpacked wheel (PYTHONPATH comes before the
    # editable install), so the template path is the one a pip-installed package uses.
    code = (
        "import sys; import fastapi_tenancy.cli as cli;"
        "assert cli.__file__.startswith(sys.argv[1]), cli.__file__;"
        "sys.argv = ['fastapi-tenancy', 'migrate', 'init', sys.argv[2]]; cli.main()"
    )
    project = tmp_path / "project"
    done = subprocess.run(
        [sys.executable, "-c", code, str(installed), str(project)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin", "TENANCY_DATABASE_URL": "sqlite:///x.db"},
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _files(project) == expected
