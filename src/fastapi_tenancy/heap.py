"""The start-up heap, frozen out of the cyclic garbage collector's reach while a manager runs.

A full garbage collection walks every container object of the process: the imported
modules, FastAPI's routes, SQLAlchemy's mappers, the library. None of that becomes
garbage while the app serves, yet a busy worker walks all of it once every few hundred
requests, and every request in flight waits the pass out. Measured on the Quick Start
(`benchmarks/saturation.py`, docs/performance.md): about a tenth of the worker's CPU per
request, and the tail of its latency. `gc.freeze()` at the end of start-up moves what is
alive then into the permanent generation, which later passes skip.

What it costs: an object in a reference cycle that was alive at the freeze and dies later
is reclaimed only when the heap is unfrozen again (reference counting still frees every
object that is not in a cycle, frozen or not). So the freeze comes once, when
`initialize()` ends, after a collection of the young generations (fresh garbage is not
frozen); the last manager to close unfreezes (unless the application had frozen objects
itself before: freezing is then its own policy, and is left to it).
`TenancyConfig(gc_freeze=False)` (`TENANCY_GC_FREEZE=false`) leaves the collector alone.
"""

import gc
import threading

__all__ = ["freeze_startup_heap", "release_startup_heap"]

# Managers whose start-up froze the heap and that have not closed; and whether the
# first of them found nothing frozen (then the last one unfreezes).
_holders = 0
_unfreeze_at_last = False
_lock = threading.Lock()  # managers may start and close in event loops of several threads


def freeze_startup_heap() -> None:
    """Freeze everything alive now (a manager has started); pair with `release_startup_heap`."""
    global _holders, _unfreeze_at_last
    with _lock:
        if _holders == 0:
            _unfreeze_at_last = gc.get_freeze_count() == 0
        _holders += 1
        gc.collect(1)
        gc.freeze()


def release_startup_heap() -> None:
    """A manager that froze the heap has closed; the last one unfreezes it."""
    global _holders
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0 and _unfreeze_at_last:
            gc.unfreeze()
