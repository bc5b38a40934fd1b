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

Once taken, the lock file says who holds it (L{encode_record}): one JSON
line with the holder's pid, a random per-process token, the path of its
control socket (L{ProcessIdentity.control}, set by the server when it takes
take-over requests) and the session's user name.  It is written once per
lock (one C{pwrite}), blanked before the unlock, and read only by a
locker that lost the race: that one raises L{MailboxInUse} carrying the
record as L{MailboxInUse.holder}, so the server can ask the holder to let
an idle session go (L{popservice.server.handoff}).  The record is a hint,
never trusted for the lock itself: an empty or garbled one (an old server,
a crash between lock and write) means "holder unknown".
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import time

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from popservice.interfaces import IMailboxLock, LockHolder, MailboxInUse, MailboxUnavailable

__all__ = ["FcntlMailboxLock", "LOCK_FILE_NAME", "ProcessIdentity", "decode_record", "encode_record",
           "read_holder", "this_process"]

#: The lock file a L{popservice.stores.maildir.MaildirStore} uses in a Maildir.
LOCK_FILE_NAME = "popservice.lock"

#: The longest holder record read back; anything longer is garbage.
MAX_RECORD = 4096


class ProcessIdentity:
    """
    This process as lock records name it: its pid, a random token (so a
    reused pid is never taken for the old holder) and the path of its control
    socket, C{None} until the server listens on one.
    """

    def __init__(self) -> None:
        self.token = secrets.token_hex(8)
        #: path of this process's take-over control socket (L{popservice.server.handoff}), or C{None}
        self.control: str | None = None

    @property
    def pid(self) -> int:
        return os.getpid()

    def renew(self) -> None:
        """A forked child is another holder: a new token, and no control socket yet."""
        self.token = secrets.token_hex(8)
        self.control = None

    def holder(self, user: str | None) -> LockHolder:
        """The record of a lock this process takes for C{user}'s session."""
        return LockHolder(pid=self.pid, token=self.token, control=self.control, user=user)


#: The identity of this process; L{FcntlMailboxLock} writes it into the locks it takes.
this_process = ProcessIdentity()
os.register_at_fork(after_in_child=this_process.renew)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


#: this process's part of its records: (pid, token, control) and the record's text up to the user
_record_head: tuple[tuple[int, str, str | None], bytes] | None = None


def encode_record(holder: LockHolder, since: float) -> bytes:
    """The lock file's content while C{holder} holds it (taken at C{since}, a Unix time)."""
    global _record_head
    key = (holder.pid, holder.token, holder.control)
    cached = _record_head
    if cached is None or cached[0] != key:
        head = _ENCODER.encode({"v": 1, "pid": holder.pid, "token": holder.token,
                                "control": holder.control}).encode("ascii")[:-1] + b',"user":'
        cached = _record_head = (key, head)
    user = b"null" if holder.user is None else _ENCODER.encode(holder.user).encode("ascii")
    # (JSON writes a float as repr() does)
    return b"%s%s,\"since\":%s}\n" % (cached[1], user, repr(round(since, 3)).encode("ascii"))


def decode_record(data: bytes) -> LockHolder | None:
    """
    The holder a lock file names (its first line), or C{None} for an empty,
    garbled or foreign record.
    """
    data = data.split(b"\n", 1)[0]
    if not data or len(data) > MAX_RECORD:
        return None
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("v") != 1:
        return None
    pid, token, control, user = (record.get(k) for k in ("pid", "token", "control", "user"))
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if not isinstance(token, str) or not token:
        return None
    if control is not None and not (isinstance(control, str) and os.path.isabs(control)
                                    and "\x00" not in control):
        return None
    if user is not None and not isinstance(user, str):
        return None
    return LockHolder(pid=pid, token=token, control=control, user=user)


def read_holder(path: str) -> LockHolder | None:
    """The holder the lock file at C{path} names (C{None}: none, unknown or unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        return decode_record(os.pread(fd, MAX_RECORD + 1, 0))
    except OSError:
        return None
    finally:
        os.close(fd)


@implementer(IMailboxLock)
class FcntlMailboxLock:
    """
    An exclusive, non-blocking C{flock} on C{path} (created 0600 if missing,
    never unlinked: removing a lock file races with other lockers).

    The file operations are a few microseconds on a local disk, so they run in
    the calling thread; L{try_acquire} is the synchronous form for callers
    that already run in a worker thread.

    @param user: the name of the session the lock is for, written into the
        holder record (the holder's session registry knows the session by it).
    @param identity: whom the holder record names (default: L{this_process}).
    @param name: if given, C{path} is the directory and this the lock file's name in it.
    """

    __slots__ = ("_path", "_name", "user", "identity", "_fd")

    log = Logger()

    def __init__(self, path: str, user: str | None = None, identity: ProcessIdentity | None = None,
                 name: str | None = None) -> None:
        # With a name, path is the directory the lock file is in: a lock kept for a whole
        # session then holds no string of its own (the directory's is the mailbox's).
        self._path = path
        self._name = name
        self.user = user
        self.identity = identity if identity is not None else this_process
        self._fd: int | None = None

    @property
    def path(self) -> str:
        """The lock file."""
        return self._path if self._name is None else os.path.join(self._path, self._name)

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
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                in_use = MailboxInUse("mailbox locked by another session")
                in_use.holder = self._read_record(fd)
                os.close(fd)
                raise in_use from e
            os.close(fd)
            self.log.warn("cannot lock {path}: {error}", path=self.path, error=e)
            raise MailboxUnavailable("cannot lock mailbox") from e
        self._fd = fd
        self._write_record(fd)

    def _write_record(self, fd: int) -> None:
        """Say who holds the lock (a hint for take-over requests: failing to write it is harmless)."""
        record = encode_record(self.identity.holder(self.user), time.time())
        try:
            # Over the blanked record of the last holder, or whatever a crash left: only the first
            # line counts (decode_record), so no truncation is needed.
            os.pwrite(fd, record, 0)
        except OSError as e:
            self.log.warn("cannot record the holder of {path}: {error}", path=self.path, error=e)

    def _read_record(self, fd: int) -> LockHolder | None:
        try:
            return decode_record(os.pread(fd, MAX_RECORD + 1, 0))
        except OSError:
            return None

    def release_now(self) -> None:
        """Release the lock synchronously (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # No record of a holder that is gone: an empty first line (cheaper than truncating: the
            # file keeps its block, and the next holder's record overwrites it in place).
            os.pwrite(fd, b"\n", 0)
        except OSError:
            pass
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
