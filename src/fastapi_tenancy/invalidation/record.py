"""The invalidation channel every process of a registry must use, recorded in the registry.

A change is announced on the channel of the process that makes it and heard only by
workers listening on that same channel: a command run without `redis_url` against
workers that listen on Redis changes the registry, and the workers keep serving their
cached record until `cache_ttl` runs out. So the registry records the channel
(`TenantStore.get_channel_record()`): the first process to start writes its own, and
`check_channel()`, called by every `TenancyManager.initialize()`, refuses to start a
process whose channel differs, with a message that names the setting to fix. Moving a
deployment to another channel is a deliberate step: `record_channel()`, which the
`fastapi-tenancy invalidation record` command runs.
"""

from ..errors import ConfigurationError
from ..storage.base import TenantStore
from .base import NO_CHANNEL, ChannelRecord, InvalidationChannel

__all__ = ["check_channel", "mismatch", "own_record", "read_channel", "record_channel"]

_HOW_TO_MOVE = (
    "To move every process to this process's channel on purpose, run `fastapi-tenancy invalidation "
    "record` with this configuration (see the Deployment docs, 'The invalidation channel')."
)


def own_record(channel: InvalidationChannel | None) -> ChannelRecord:
    """What the registry would record for a process on `channel` (None: no channel)."""
    return NO_CHANNEL if channel is None else channel.record()


async def read_channel(store: TenantStore) -> ChannelRecord | None:
    """The registry's record, or None while no process has recorded one."""
    text = await store.get_channel_record()
    return None if text is None else ChannelRecord.loads(text)


async def check_channel(store: TenantStore, channel: InvalidationChannel | None) -> ChannelRecord:
    """Refuse (`ConfigurationError`) a `channel` other than the one the registry records.

    Records `channel` when the registry has no record yet (the first process to start);
    returns the record in force. One registry read, at startup only: never on a request.
    """
    recorded = await read_channel(store)
    if recorded is None:
        mine = own_record(channel).stamped()
        if channel is not None:
            await channel.bind(mine, mode="new")  # before anything is written
        # Of two processes starting at once, one record wins; the other is checked against it.
        recorded = ChannelRecord.loads(await store.set_channel_record(mine.dumps()))
    problem = mismatch(recorded, own_record(channel))
    if problem is not None:
        raise ConfigurationError(f"{problem} {_HOW_TO_MOVE}")
    if channel is not None:
        await channel.bind(recorded, mode="join")
    return recorded


async def record_channel(
    store: TenantStore, channel: InvalidationChannel | None
) -> tuple[ChannelRecord | None, ChannelRecord]:
    """Make `channel` the registry's channel, whatever was recorded; (the old record, the new one).

    The deliberate step of moving a deployment to another channel. Processes already
    running keep the channel they started with; the ones started later must use this one.
    """
    old = await read_channel(store)
    new = own_record(channel).stamped()
    if channel is not None:
        await channel.bind(new, mode="replace")
    await store.set_channel_record(new.dumps(), replace=True)
    return old, new


def mismatch(recorded: ChannelRecord, mine: ChannelRecord) -> str | None:
    """Why a process on `mine` would miss the changes of processes on `recorded`, and the fix; or None."""
    if recorded.same_channel(mine):
        return None
    recorded_by = ""
    if recorded.recorded_by:
        recorded_by = f" (recorded {recorded.recorded_at} by {recorded.recorded_by})"
    head = (
        f"this registry's processes use {recorded.describe()}{recorded_by}, but this one uses "
        f"{mine.describe()}: "
    )
    if recorded.kind == "redis":
        prefix = recorded.channel.removesuffix("invalidate")
        if mine.kind == "redis":
            fix = f"set redis_key_prefix (TENANCY_REDIS_KEY_PREFIX) to {prefix!r}"
        else:
            fix = f"set redis_url (TENANCY_REDIS_URL) to {recorded.where}"
            if prefix != "tenancy:":
                fix += f" and redis_key_prefix (TENANCY_REDIS_KEY_PREFIX) to {prefix!r}"
    elif recorded.kind == "postgres":
        if mine.kind == "redis":
            fix = "unset redis_url (TENANCY_REDIS_URL): without it, the manager uses LISTEN/NOTIFY"
        else:
            fix = (
                "reach the registry's PostgreSQL directly (LISTEN needs a session of its own, which "
                "PgBouncer in transaction mode cannot give)"
            )
    elif recorded.kind == "none":
        fix = (
            "unset redis_url (TENANCY_REDIS_URL)"
            if mine.kind == "redis"
            else "configure this process as the others (database_pgbouncer, TENANCY_DATABASE_PGBOUNCER)"
        )
    else:
        fix = "use the fastapi-tenancy version the other processes use"
    return f"{head}the changes it makes would not reach them, nor theirs it. Fix: {fix}."
