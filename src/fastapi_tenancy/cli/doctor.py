"""`fastapi-tenancy doctor`: the health checks of `fastapi_tenancy.doctor`, as a table and an exit code."""

from dataclasses import asdict

import typer

from ..doctor import CheckResult, run_checks
from ..manager import TenancyManager
from .base import EXIT_FAILED, print_rows, run_with_manager

__all__ = ["doctor"]


def doctor() -> None:
    """Check configuration, connectivity, the registry, pooler safety, tenant storage and revisions."""

    async def work(manager: TenancyManager) -> list[CheckResult]:
        return await run_checks(manager)

    results = run_with_manager(work, initialize=False)
    print_rows("Doctor", [asdict(r) for r in results], ["name", "status", "detail"])
    if any(r.status == "fail" for r in results):
        raise typer.Exit(EXIT_FAILED)
