"""The start-up heap is frozen while a manager runs, and given back to the collector after."""

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastapi_tenancy import TenancyConfig, TenancyManager, heap
from fastapi_tenancy.heap import freeze_startup_heap, release_startup_heap


@pytest.fixture(autouse=True)
def nothing_frozen(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # These tests own the collector's permanent generation and the count of managers
    # holding it: none before, none after; what other tests' managers hold is restored.
    held = heap._holders
    monkeypatch.setattr(heap, "_holders", 0)
    monkeypatch.setattr(heap, "_unfreeze_at_last", False)
    gc.unfreeze()
    yield
    gc.unfreeze()
    if held:
        gc.freeze()


def _manager(tmp_path: Path, name: str, *, gc_freeze: bool = True) -> TenancyManager:
    return TenancyManager(TenancyConfig(database_url=f"sqlite:///{tmp_path / name}", gc_freeze=gc_freeze))


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_initialize_freezes_what_start_up_made_and_close_gives_it_back(tmp_path: Path) -> None:
    routes = [_Cycle() for _ in range(100)]  # made at start-up, like the app's routes
    manager = _manager(tmp_path, "a.db")
    await manager.initialize()
    frozen = gc.get_freeze_count()
    assert frozen > 1000  # the modules, the app, the library
    # A full collection no longer walks them.
    tracked = {id(obj) for obj in gc.get_objects()}
    assert not any(id(route) in tracked for route in routes)
    # Reference counting still frees frozen objects that are in no cycle; a cycle that
    # dies while frozen waits for the unfreeze.
    del routes
    gc.collect()
    await manager.close()
    assert gc.get_freeze_count() == 0
    assert gc.collect() >= 100  # the 100 cycles, reclaimed now
    await manager.close()  # idempotent: nothing more to give back
    assert gc.get_freeze_count() == 0


def test_fresh_garbage_is_collected_before_the_freeze() -> None:
    gc.disable()  # no automatic collection: the garbage waits in the young generation
    try:
        garbage = [_Cycle() for _ in range(100)]
        del garbage
        freeze_startup_heap()
        try:
            gc.unfreeze()  # what was frozen is tracked again: the cycles are not among it
            assert not any(isinstance(obj, _Cycle) for obj in gc.get_objects())
        finally:
            release_startup_heap()
    finally:
        gc.enable()


async def test_the_last_manager_to_close_unfreezes(tmp_path: Path) -> None:
    first, second = _manager(tmp_path, "a.db"), _manager(tmp_path, "b.db")
    await first.initialize()
    await second.initialize()
    await first.close()
    assert gc.get_freeze_count() > 0  # the second one still runs
    await second.close()
    assert gc.get_freeze_count() == 0


async def test_a_heap_the_application_froze_stays_frozen(tmp_path: Path) -> None:
    gc.freeze()  # the application's own policy (e.g. before forking workers)
    frozen = gc.get_freeze_count()
    manager = _manager(tmp_path, "a.db")
    await manager.initialize()
    await manager.close()
    assert gc.get_freeze_count() >= frozen


async def test_gc_freeze_false_leaves_the_collector_alone(tmp_path: Path) -> None:
    manager = _manager(tmp_path, "a.db", gc_freeze=False)
    await manager.initialize()
    try:
        assert gc.get_freeze_count() == 0
    finally:
        await manager.close()
