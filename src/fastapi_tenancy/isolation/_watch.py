"""`DirectoryWatch`: which files of a directory may have been deleted or replaced, told by
the kernel (Linux inotify) instead of asked with a `stat` per use.

SQLite file isolation checks, when a pooled connection is checked out, that its file is
still the one it opened (another process may have destroyed the tenant and made the slug
anew). A `stat` per checkout did that, but from the event loop's thread it gives up and
takes back the interpreter lock while the connections' own threads run queries: with
1,000 tenant files in use it cost a quarter of a saturated worker's throughput
(`benchmarks/saturation.py`). The watch counts, per file name, the directory entries the
kernel reports created, deleted or renamed; a connection whose file's count has not moved
since it last checked needs no `stat`. Events are read on the event loop as they arrive
(`loop.add_reader`), so a change is seen from the loop's next turn on: the same window as
a `stat` made just before a checkout whose first statement runs later.

Anything the watch cannot vouch for reads as changed (and gets the `stat`): another event
loop than the watch's, a lost event queue (`IN_Q_OVERFLOW`), the directory itself moved
or removed, a closed watch, or no inotify at all (`watch()` returns None off Linux).
"""

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import struct
import sys
import weakref
from pathlib import Path
from typing import Any

__all__ = ["DirectoryWatch", "watch"]

logger = logging.getLogger("fastapi_tenancy.isolation")

_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_ENTRIES = _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
_SERIALS = itertools.count()


class DirectoryWatch:
    """Per file name of one directory, a count that moves whenever an entry of that name
    is created, deleted or renamed (`generation`); see the module docstring."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = fd
        self._loop = loop
        self._serial = next(_SERIALS)  # a count read from an earlier watch never matches this one's
        self._epoch = 0  # moves for every name at once: lost events
        self._counts: dict[str, int] = {}
        self.open = True
        # The descriptor is closed with the watch even if nobody calls close() (a manager
        # never closed, a loop closed with the reader on it): each is one of the user's
        # few inotify instances (`fs.inotify.max_user_instances`, 128 by default).
        self._release = weakref.finalize(self, os.close, fd)
        loop.add_reader(fd, self._read)

    def generation(self, name: str) -> tuple[int, int, int] | None:
        """The current count for `name`, or None when the watch cannot vouch for it (from
        another event loop than the watch's, or once closed)."""
        if not self.open:
            return None
        try:
            if asyncio.get_running_loop() is not self._loop:
                return None
        except RuntimeError:
            return None
        return self._serial, self._epoch, self._counts.get(name, 0)

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError:
            logger.warning("the tenant directory's watch failed; checking files on every use", exc_info=True)
            self.close()
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = os.fsdecode(data[offset : offset + length].rstrip(b"\0"))
            offset += length
            if mask & (_IN_Q_OVERFLOW | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED):
                self._epoch += 1
                if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED):
                    self.close()  # the directory is no longer the one watched
                    return
            elif mask & _ENTRIES and name.endswith(".db"):
                self._counts[name] = self._counts.get(name, 0) + 1

    def close(self) -> None:
        """Stop watching (idempotent); every `generation` is None from now on."""
        if not self.open:
            return
        self.open = False
        with contextlib.suppress(Exception):  # the loop may be closed already
            self._loop.remove_reader(self._fd)
        self._release()


_libc: Any = None


def _inotify() -> Any:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    return _libc if _libc and hasattr(_libc, "inotify_init1") else None


def watch(directory: Path) -> DirectoryWatch | None:
    """A watch of `directory` on the running event loop, or None where inotify is missing
    (not Linux) or refused (no instance or watch left: `fs.inotify.max_user_*`)."""
    libc = _inotify() if sys.platform.startswith("linux") else None
    if libc is None:
        return None
    loop = asyncio.get_running_loop()
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        _refused("inotify_init1")
        return None
    mask = _ENTRIES | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
    if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
        _refused("inotify_add_watch")
        os.close(fd)
        return None
    return DirectoryWatch(fd, loop)


def _refused(call: str) -> None:
    code = ctypes.get_errno()
    logger.warning(
        "%s failed (%s): tenant files are checked on every use instead",
        call,
        errno.errorcode.get(code, code),
    )
