"""`Pacing`: a given concurrency is kept; without one, the width follows the measured throughput."""

import asyncio

from fastapi_tenancy.migrations.pacing import CEILING_PER_CPU, Pacing


async def _run(pacing: Pacing, tasks: int, work: asyncio.Semaphore, seconds: float) -> int:
    """Run `tasks` through `pacing`, each holding one of `work`'s slots for `seconds`; the most at once."""
    inside = most = 0

    async def one() -> None:
        nonlocal inside, most
        async with pacing:
            inside += 1
            most = max(most, inside)
            async with work:
                await asyncio.sleep(seconds)
            inside -= 1

    await asyncio.gather(*(one() for _ in range(tasks)))
    return most


async def test_a_given_concurrency_is_kept() -> None:
    pacing = Pacing(3, tenants=100, cpus=2)
    assert (pacing.ceiling, pacing.width, pacing.tuning) == (3, 3, False)
    most = await _run(pacing, 30, asyncio.Semaphore(100), 0.01)
    assert most == 3
    assert (pacing.width, pacing.windows) == (3, [])


async def test_the_width_grows_while_throughput_does_and_settles_where_it_stops() -> None:
    # Three slots of real work: a width of 2 leaves one idle, 3 fills them, 4 only queues.
    pacing = Pacing(None, tenants=200, cpus=2)
    assert (pacing.ceiling, pacing.width) == (2 * CEILING_PER_CPU, 2)
    await _run(pacing, 120, asyncio.Semaphore(3), 0.05)
    assert not pacing.tuning
    widths = [width for width, _ in pacing.windows]
    assert widths[:2] == [2, 3], pacing.windows
    # 3 fills the slots; a wider window may look a few percent faster by chance, no more.
    assert 3 <= pacing.width <= 4, pacing.windows


def test_never_wider_than_the_tenants() -> None:
    assert Pacing(None, tenants=1, cpus=8).ceiling == 1
    assert Pacing(None, tenants=1, cpus=8).width == 1
    assert Pacing(16, tenants=5, cpus=2).width == 5
