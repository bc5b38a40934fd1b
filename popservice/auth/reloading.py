# -*- test-case-name: tests.test_passwdfile -*-
"""
Re-reading the passwd-file when it changes.

The file counts as changed when C{os.stat} gives another
C{(st_mtime_ns, st_size, st_ino, st_dev)} than at the last successful read
(so an atomic C{rename} over it is seen even with the same size and mtime);
it is checked at most once per interval of the caller's clock.  If it becomes
unreadable the error is logged once, the caller keeps its last good copy,
and recovery is logged too.  What the data means is the caller's business
(L{popservice.auth.passwdfile_format} parses it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.logger import Logger

__all__ = ["ReloadingFile", "StatKey"]

# The namespace of the module this code came from, so log filters keep working.
log = Logger(namespace="popservice.auth.passwdfile")

#: What identifies one version of the file: mtime (ns), size, inode, device.
StatKey = tuple[int, int, int, int]


class ReloadingFile:
    """
    The state of a file that is re-read when it changes: when it was last
    checked, which version was last loaded, and whether it is failing.
    """

    def __init__(self, path: str, clock: Callable[[], float], interval: float) -> None:
        self.path = path
        self._clock = clock
        self._interval = interval
        self._stat_key: StatKey | None = None
        self._checked_at: float | None = None
        self._failing: str | None = None

    def due(self) -> bool:
        """True unless the file was checked less than C{interval} ago (by the clock)."""
        if self._checked_at is not None:
            elapsed = self._clock() - self._checked_at
            if 0 <= elapsed < self._interval:
                return False
        return True

    def read_if_changed(self, kept: int) -> tuple[bytes, StatKey] | None:
        """
        Check the file now: its contents and version when it changed since the
        last L{loaded} version, else C{None}.  An error is logged (once, until
        the file is readable again) mentioning the C{kept} users of the last
        read, and gives C{None}.
        """
        self._checked_at = self._clock()
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
            if key == self._stat_key:
                self._recovered()
                return None
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            reason = f"{type(e).__name__}: {e.strerror or e}"
            if reason != self._failing:
                log.error(
                    "passwd-file {path!r} unreadable ({reason}); keeping {count} users from the last read",
                    path=self.path,
                    reason=reason,
                    count=kept,
                )
                self._failing = reason
            return None
        self._recovered()
        return data, key

    def loaded(self, key: StatKey) -> None:
        """Version C{key} (from L{read_if_changed}) has been parsed and is in use."""
        self._stat_key = key

    def _recovered(self) -> None:
        if self._failing is not None:
            log.info("passwd-file {path!r} readable again", path=self.path)
            self._failing = None
