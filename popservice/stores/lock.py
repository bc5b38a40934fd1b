"""
A per-mailbox session lock that can never go stale.

L{FcntlMailboxLock} takes a non-blocking exclusive C{flock(2)} on a lock file
(kept open for the whole session).  The kernel drops the lock when the file
descriptor is closed, which includes the death of the holding process (even
by SIGKILL), so no lock outlives its session and nobody ever has to remove a
lock file by hand.

C{flock} locks belong to the open file description, not to the process: a
second L{FcntlMailboxLock} on the same file in the same process conflicts
with the first, exactly as one in another process does.  (POSIX C{lockf}/
C{fcntl} record locks are per process and would not give that.)

On Linux, C{flock} on NFS is emulated with byte-range locks (since 2.6.12),
so the lock also works across NFS clients that share the Maildir.
"""

from __future__ import annotations

import errno
import fcntl
import os

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from popservice.interfaces import IMailboxLock, MailboxInUse, MailboxUnavailable

__all__ = ["FcntlMailboxLock", "LOCK_FILE_NAME"]

#: The lock file a L{popservice.stores.maildir.MaildirStore} uses in a Maildir.
LOCK_FILE_NAME = "popservice.lock"


@implementer(IMailboxLock)
class FcntlMailboxLock:
    """
    An exclusive, non-blocking C{flock} on C{path} (created 0600 if missing,
    never unlinked: removing a lock file races with other lockers).

    The file operations are a few microseconds on a local disk, so they run in
    the calling thread; L{try_acquire} is the synchronous form for callers
    that already run in a worker thread.
    """

    log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def try_acquire(self) -> None:
        """
        Take the lock now, or raise L{MailboxInUse} when someone else holds it,
        L{MailboxUnavailable} when the lock file cannot be opened.  Taking a
        lock this object already holds is a no-op.
        """
        if self._fd is not None:
            return
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            self.log.warn("cannot open lock file {path}: {error}", path=self.path, error=e)
            raise MailboxUnavailable("cannot open lock file") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MailboxInUse("mailbox locked by another session") from e
            self.log.warn("cannot lock {path}: {error}", path=self.path, error=e)
            raise MailboxUnavailable("cannot lock mailbox") from e
        self._fd = fd

    def release_now(self) -> None:
        """Release the lock synchronously (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as e:  # closing the descriptor releases it anyway
            self.log.warn("cannot unlock {path}: {error}", path=self.path, error=e)
        finally:
            os.close(fd)

    def acquire(self) -> "defer.Deferred[None]":
        """Deferred firing when held; failing with L{MailboxInUse} when not."""
        try:
            self.try_acquire()
        except (MailboxInUse, MailboxUnavailable) as e:
            return defer.fail(e)
        return defer.succeed(None)

    def release(self) -> "defer.Deferred[None]":
        """Release the lock (idempotent)."""
        self.release_now()
        return defer.succeed(None)

    def __repr__(self) -> str:
        return f"<FcntlMailboxLock {self.path!r}{' held' if self.held else ''}>"
