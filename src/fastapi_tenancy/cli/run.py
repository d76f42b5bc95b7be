"""`fastapi-tenancy run -- <command>`: a command once per tenant, with the tenant in its environment."""

import json
import os
import subprocess
from typing import Annotated

import typer

from ..manager import TenancyManager
from ..tenant import TenantStatus
from .base import (
    EXIT_FAILED,
    EXIT_USAGE,
    TenantOption,
    fail,
    print_json,
    print_rows,
    run_with_manager,
    state,
)

__all__ = ["run_command"]


def run_command(
    ctx: typer.Context,
    status: Annotated[
        TenantStatus, typer.Option(help="Run for tenants with this status.")
    ] = TenantStatus.ACTIVE,
    tenant: TenantOption = None,
) -> None:
    """Run a command once per tenant: `fastapi-tenancy run -- python job.py`.

    Each run has TENANCY_TENANT (the identifier) and TENANCY_TENANT_SCHEMA (its
    storage name) in its environment. Exits 1 if any run fails.
    """
    argv = list(ctx.args)
    if not argv:
        fail("nothing to run: give a command after --", EXIT_USAGE)

    async def work(manager: TenancyManager) -> list[tuple[str, str]]:
        if tenant:
            chosen = [await manager.get_tenant(slug) for slug in tenant]
        else:
            chosen = [t async for t in manager.store.iterate(status=status)]
        return [(t.identifier, manager.isolation.storage_name(t.identifier)) for t in chosen]

    results = []
    for identifier, storage in run_with_manager(work):
        env = {**os.environ, "TENANCY_TENANT": identifier, "TENANCY_TENANT_SCHEMA": storage}
        try:
            completed = subprocess.run(argv, env=env, check=False)  # noqa: S603 - the operator's own command
            code = completed.returncode
        except OSError as exc:
            fail(f"cannot run {argv[0]!r}: {exc}", EXIT_USAGE)
        results.append({"tenant": identifier, "exit_code": code})
    if state.json:
        print_json(json.dumps(results))
    else:
        print_rows("Runs", results, ["tenant", "exit_code"])
    if any(r["exit_code"] != 0 for r in results):
        raise typer.Exit(EXIT_FAILED)
