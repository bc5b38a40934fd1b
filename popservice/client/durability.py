"""
Making bytes durable: Linux syncfs(2) and sync_file_range(2) (through
ctypes, looked up on first use), the fsync of a directory, and a write that
writes everything.  The journal and the delivery targets build on these;
nothing here knows about either.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from popservice.fsutil import fsync_dir as fsync_dir  # shared with the Maildir store

__all__ = ["CLOEXEC", "SYNC_FILE_RANGE_WRITE", "fsync_dir", "start_writeback", "syncfs", "write_all"]

#: os.O_CLOEXEC where the platform has it
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)  # the process image: libc is in it
        fn: Callable[[int], int] = libc.syncfs
        return fn
    except (OSError, AttributeError):
        return None


_syncfs: Callable[[int], int] | None | bool = False
_sync_file_range: Callable[[int, int, int, int], int] | None | bool = False
#: sync_file_range(2) flag: start writeback of dirty pages, do not wait
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """
    Start writing C{fd}'s dirty pages to disk without waiting (Linux
    sync_file_range(2)); a later fdatasync then has (almost) nothing left to
    do, and the block allocations of a whole batch of files land in one
    filesystem journal commit instead of one each.  A no-op elsewhere.
    """
    global _sync_file_range
    if _sync_file_range is False:
        _sync_file_range = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)  # the process image: libc is in it
                fn = libc.sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (OSError, AttributeError):
                pass
    if _sync_file_range is not None and _sync_file_range is not True:
        _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # advisory: errors show up at fdatasync


def syncfs(fd: int) -> bool:
    """
    Linux syncfs(2): write back and commit everything dirty on C{fd}'s
    filesystem, waiting for it (errors reported since Linux 5.8).  One call
    makes a whole batch of files and directory entries durable.  Returns
    False when unavailable (the caller then fsyncs file by file).
    """
    global _syncfs
    if _syncfs is False:
        _syncfs = _load_syncfs()
    if _syncfs is None or _syncfs is True:
        return False
    if _syncfs(fd) != 0:
        import ctypes

        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return True


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of C{data} is written (a write may be short)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
