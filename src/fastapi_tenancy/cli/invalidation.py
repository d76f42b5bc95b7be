"""`fastapi-tenancy invalidation`: the channel the registry records for its processes, and moving it."""

import json
import sys
from typing import Annotated, Any

import typer

from ..invalidation.base import ChannelRecord
from ..invalidation.record import mismatch, own_record, read_channel, record_channel
from ..manager import TenancyManager
from .base import EXIT_FAILED, EXIT_USAGE, fail, out, print_json, print_rows, run_with_manager, state

__all__ = ["invalidation_app"]

invalidation_app = typer.Typer(
    help="The invalidation channel every process of the registry must use.", no_args_is_help=True
)


def _row(role: str, record: ChannelRecord | None) -> dict[str, Any]:
    if record is None:
        return {"record": role, "channel": "(none recorded yet)"}
    return {
        "record": role,
        "channel": record.describe(),
        "recorded_at": record.recorded_at,
        "recorded_by": record.recorded_by,
    }


@invalidation_app.command("show")
def invalidation_show() -> None:
    """The registry's channel and this process's; exit 1 if they differ."""

    async def work(manager: TenancyManager) -> tuple[ChannelRecord | None, ChannelRecord]:
        await manager.store.initialize()
        return await read_channel(manager.store), own_record(manager.invalidation)

    recorded, own = run_with_manager(work, initialize=False)
    print_rows(
        "Invalidation channel",
        [_row("registry", recorded), _row("this process", own)],
        ["record", "channel", "recorded_at", "recorded_by"],
    )
    problem = None if recorded is None else mismatch(recorded, own)
    if problem is not None:
        fail(problem, EXIT_FAILED)


@invalidation_app.command("record")
def invalidation_record(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before replacing the record.")] = False,
) -> None:
    """Make this process's channel the registry's: the deliberate step of moving a deployment.

    Run it with the new configuration, then restart every process with it: processes
    started later with the old one are refused, those still running keep the channel
    they started with until they restart.
    """
    if not yes:
        if not sys.stdin.isatty():
            fail("replacing the registry's channel needs --yes when not run interactively", EXIT_USAGE)
        typer.confirm(
            "Record this process's channel as the one every process of the registry must use?", abort=True
        )

    async def work(manager: TenancyManager) -> tuple[ChannelRecord | None, ChannelRecord]:
        await manager.store.initialize()
        return await record_channel(manager.store, manager.invalidation)

    old, new = run_with_manager(work, initialize=False)
    if state.json:
        print_json(json.dumps({"old": None if old is None else old.describe(), "new": new.describe()}))
    else:
        before = "none" if old is None else old.describe()
        out.print(f"recorded: {new.describe()} (was: {before})", highlight=False)
