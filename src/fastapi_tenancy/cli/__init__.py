"""The `fastapi-tenancy` command line: tenants, fleet migrations, per-tenant commands, doctor, demo.

Reads `TenancyConfig` from `TENANCY_*` variables, or takes the application's
manager from an import path (`--app main:manager`, like uvicorn). Tables for
people, `--json` for scripts. Exit codes:

    0  success
    1  the operation ran and something failed (a tenant's migration or command, a doctor check)
    2  usage or configuration error
    3  no such tenant
    4  conflict: the tenant exists, the change is not allowed, or another fleet run holds the lock
    5  the database is unavailable

One module per command group: `base.py` (the root command, its options, the manager and
output every command shares), `tenants.py` (and `domains.py`, `tenants domains`), `migrate.py`,
`registry.py`, `invalidation.py`, `cluster.py` (`cluster`, and `tenants move`: Citus),
and one module for each of `run`, `doctor` and `demo`. This module puts them together. Needs the `cli` extra
(typer, rich); `migrate` also the `migrations` extra.
"""

from . import cluster, demo, doctor, run
from .base import (
    EXIT_CONFLICT,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    app,
    load_manager,
)
from .domains import domains_app
from .invalidation import invalidation_app
from .migrate import migrate_app
from .registry import registry_app
from .tenants import tenants_app

__all__ = [
    "EXIT_CONFLICT",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "app",
    "load_manager",
    "main",
]

# The help lists commands in the order they are added here, then the groups.
app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    run.run_command
)
app.command("doctor")(doctor.doctor)
app.command("demo")(demo.demo)
tenants_app.add_typer(domains_app, name="domains")
tenants_app.command("move")(cluster.tenants_move)
app.add_typer(tenants_app, name="tenants")
app.add_typer(migrate_app, name="migrate")
app.add_typer(registry_app, name="registry")
app.add_typer(invalidation_app, name="invalidation")
app.add_typer(cluster.cluster_app, name="cluster")


def main() -> None:
    """The console script's entry point."""
    app()
