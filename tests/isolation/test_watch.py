"""`DirectoryWatch` (inotify) tells SQLite file isolation which tenant files may have changed,
so a checkout stats its file only then; anything the watch cannot vouch for gets the stat.
"""

import asyncio
import gc
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from fastapi_tenancy import TenancyConfig, TenancyManager
from fastapi_tenancy.isolation import _watch, sqlite

from ..apps import Base, Order

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")


async def _turn() -> None:
    for _ in range(3):  # the reader callback runs on a later turn of the loop
        await asyncio.sleep(0.01)


async def test_a_name_moves_when_its_entry_is_created_deleted_or_renamed(tmp_path: Path) -> None:
    watch = _watch.watch(tmp_path)
    assert watch is not None
    try:
        first = watch.generation("a.db")
        (tmp_path / "a.db").write_bytes(b"x")
        await _turn()
        created = watch.generation("a.db")
        assert created != first
        (tmp_path / "a.db-wal").write_bytes(b"x")  # not a database file: nothing moves
        (tmp_path / "b.db").write_bytes(b"x")
        await _turn()
        assert watch.generation("a.db") == created
        os.replace(tmp_path / "b.db", tmp_path / "a.db")  # replaced by a rename
        await _turn()
        renamed = watch.generation("a.db")
        assert renamed != created
        (tmp_path / "a.db").unlink()
        await _turn()
        assert watch.generation("a.db") != renamed
    finally:
        watch.close()
    assert watch.generation("a.db") is None


async def test_a_moved_directory_ends_the_watch(tmp_path: Path) -> None:
    directory = tmp_path / "tenants"
    directory.mkdir()
    watch = _watch.watch(directory)
    assert watch is not None
    directory.rename(tmp_path / "elsewhere")
    await _turn()
    assert not watch.open and watch.generation("a.db") is None


async def test_another_event_loop_gets_no_answer(tmp_path: Path) -> None:
    watch = _watch.watch(tmp_path)
    assert watch is not None
    try:
        assert await asyncio.to_thread(lambda: asyncio.run(_generation(watch))) is None
    finally:
        watch.close()


async def _generation(watch: _watch.DirectoryWatch) -> Any:
    return watch.generation("a.db")


@pytest.fixture
async def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A manager with tenants alpha and beta in SQLite files, and a count of file stats."""
    manager = TenancyManager(TenancyConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"))
    await manager.initialize()
    rows = {"alpha": {1: "alpha-1", 2: "alpha-2"}, "beta": {1: "beta-1", 3: "beta-3"}}
    for name, orders in rows.items():
        tenant = await manager.register_tenant(name, name.title(), app_metadata=Base.metadata)
        async with manager.session(tenant) as session:
            session.add_all(Order(id=i, description=d) for i, d in orders.items())
            await session.commit()
    stats: list[Path] = []
    identity = sqlite._identity

    def counted(path: Path) -> Any:
        stats.append(path)
        return identity(path)

    monkeypatch.setattr(sqlite, "_identity", counted)
    yield manager, stats
    await manager.close()


async def _read(manager: TenancyManager, name: str) -> list[str]:
    tenant = await manager.lookup.get(name)
    assert tenant is not None
    async with manager.session(tenant) as session:
        return list((await session.scalars(sa.select(Order.description).order_by(Order.id))).all())


async def test_checkouts_of_unchanged_files_make_no_stat(files: Any) -> None:
    manager, stats = files
    for _ in range(3):
        assert await _read(manager, "alpha") == ["alpha-1", "alpha-2"]
        assert await _read(manager, "beta") == ["beta-1", "beta-3"]
    # One per connection opened (and its first checkout), none per request.
    assert len(stats) <= 4, stats


async def test_a_file_replaced_by_another_process_is_seen_without_a_stat_per_request(files: Any) -> None:
    manager, stats = files
    assert await _read(manager, "alpha") == ["alpha-1", "alpha-2"]
    alpha = await manager.lookup.get("alpha")
    path = manager.isolation.path(alpha)
    # Another process replaces alpha's file with beta's (a file of another tenant: its
    # marker is beta's), under the same name.
    os.replace(manager.isolation.path(await manager.lookup.get("beta")), path)
    await _turn()
    stats.clear()
    with pytest.raises(Exception) as refused:
        await _read(manager, "alpha")
    assert path in stats, "the replaced file was checked"
    assert "beta-1" not in str(refused.value)


async def test_without_a_watch_every_checkout_stats_its_file(
    files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, stats = files
    await manager.isolation.close()  # drops the watch and the engines
    monkeypatch.setattr(sqlite, "watch", lambda _directory: None)  # as off Linux
    stats.clear()
    for _ in range(3):
        assert await _read(manager, "alpha") == ["alpha-1", "alpha-2"]
    assert len(stats) >= 3  # one per checkout (and one when the connection opened)


async def test_a_watch_nobody_closes_gives_its_descriptor_back(tmp_path: Path) -> None:
    watch = _watch.watch(tmp_path)
    assert watch is not None
    fd = watch._fd
    asyncio.get_running_loop().remove_reader(fd)  # as a closed loop drops its readers
    del watch
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


async def test_a_new_watch_never_vouches_for_a_count_read_from_an_earlier_one(tmp_path: Path) -> None:
    first = _watch.watch(tmp_path)
    assert first is not None
    seen = first.generation("a.db")
    first.close()
    second = _watch.watch(tmp_path)
    assert second is not None
    try:
        assert second.generation("a.db") != seen  # events between the two were never read
    finally:
        second.close()
