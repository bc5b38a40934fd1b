"""
One POP3 session's mailbox (L{IMailbox}, L{IExpiringMailbox}): the listing
frozen at open (RFC 1939 TRANSACTION state), messages read in chunks, the
deletions of the UPDATE state (RFC 1939 section 6: files unlinked, their
index entries dropped) and the RFC 2449 EXPIRE hooks (retrievals recorded,
old ones deleted).  Failures reach the server as L{MailboxUnavailable} or
L{MessageGone} only (L{_translate}).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from typing import BinaryIO

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from popservice.interfaces import (
    IExpiringMailbox,
    IImmediateMailbox,
    IImmediateMessageStream,
    IMailboxLock,
    IMessageStream,
    ISizedMessageStream,
    MailboxInUse,
    MailboxUnavailable,
    MessageGone,
    MessageInfo,
)
from popservice.stores.maildir.layout import _CLOEXEC, _NOFOLLOW, _file_base, _find_all, _find_one, _relpath
from popservice.stores.maildir.listing import Listing
from popservice.stores.maildir.sizes import CHUNK_SIZE
from popservice.stores.maildir.uidlist import INDEX_FILE_NAME, _remove_from_index
from popservice.stores.maildir.work import maildir_pool
from popservice.stores.retrieval import RetrievalLog

__all__ = ["MaildirMailbox", "MaildirMessageStream"]

log = Logger(namespace="popservice.stores.maildir")


def _translate(e: BaseException, what: str) -> Exception:
    """
    Expected failures pass; OSError and anything unexpected become
    L{MailboxUnavailable}.  Call it inside the C{except} block (it may log the
    current traceback).
    """
    if isinstance(e, (MailboxInUse, MailboxUnavailable, MessageGone)):
        return e
    if isinstance(e, OSError):
        log.warn("{what}: {error}", what=what, error=e)
    else:
        log.failure("unexpected error {what}", what=what)
    return MailboxUnavailable("mailbox temporarily unavailable")


_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | _CLOEXEC
_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC


@implementer(ISizedMessageStream, IImmediateMessageStream)
class MaildirMessageStream:
    """
    A message file (an open file descriptor, owned by the stream) read in
    chunks of L{CHUNK_SIZE} (or what the reader sets C{chunk_size} to), with
    C{os.read}: no file object and no buffer per open message; closed at
    the end.  For a regular file (C{regular}: the mailbox checked) a read
    shorter than asked is the end: the file is closed then, without the
    read that would return nothing.
    """

    __slots__ = ("_fd", "chunk_size", "_regular")

    def __init__(self, file: int | BinaryIO, chunk_size: int = CHUNK_SIZE, regular: bool = False) -> None:
        if not isinstance(file, int):  # a file object: the stream takes its descriptor over
            with file:
                file = os.dup(file.fileno())
        self._fd: int | None = file
        self.chunk_size = chunk_size
        self._regular = regular

    def read_now(self) -> bytes:
        fd = self._fd
        if fd is None:
            return b""
        size = self.chunk_size
        try:
            chunk = os.read(fd, size)
        except OSError as e:
            self.close()
            log.warn("error reading a message file: {error}", error=e)
            raise MailboxUnavailable("error reading message") from e
        if not chunk or (self._regular and len(chunk) < size):
            self.close()
        return chunk

    def read(self) -> "defer.Deferred[bytes]":
        try:
            return defer.succeed(self.read_now())
        except MailboxUnavailable as e:
            return defer.fail(e)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        # a stream dropped unclosed must not keep its descriptor (a file object would close itself)
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            with contextlib.suppress(OSError):
                os.close(fd)


@implementer(IExpiringMailbox, IImmediateMailbox)
class MaildirMailbox:
    """
    One session's view of a Maildir: the listing frozen at open (a
    L{Listing}, shared with the store's cache and other sessions, never
    modified).  Indices are 0-based positions in it.

    Message files are opened with C{O_NOFOLLOW} relative to a descriptor of
    C{cur/} (itself opened with C{O_NOFOLLOW}, at the first read): a
    symbolic link put in place of C{cur/} or of a message after the login's
    checks is never followed, and no path is joined per message.
    """

    __slots__ = ("path", "_listing", "_moved", "_deleted", "_lock", "_closed", "_cur")

    def __init__(self, path: str, listing: Listing, lock: IMailboxLock | None) -> None:
        self.path = path
        self._listing = listing
        #: index -> file, for messages found renamed by another program (made when first needed)
        self._moved: dict[int, str] | None = None
        self._deleted: set[int] | None = None
        self._lock = lock
        self._closed = False
        #: descriptor of cur/, opened at the first message read
        self._cur: int | None = None

    def listing(self) -> "defer.Deferred[Sequence[MessageInfo]]":
        return defer.succeed(self._listing)

    def _file(self, index: int) -> str:
        moved = self._moved
        if moved is not None:
            file = moved.get(index)
            if file is not None:
                return file
        return self._listing.file(index)

    def _check(self, index: int) -> None:
        if self._closed:
            raise MailboxUnavailable("mailbox closed")
        if not 0 <= index < len(self._listing):
            raise IndexError(f"no message {index}")

    def _open_fd(self, file: str) -> int:
        if "/" in file:  # still in new/ (rare: its move to cur/ failed)
            fd = os.open(os.path.join(self.path, file), _READ_FLAGS)
        else:
            cur = self._cur
            if cur is None:
                cur = self._cur = os.open(os.path.join(self.path, "cur"), _DIRECTORY_FLAGS)
            fd = os.open(file, _READ_FLAGS, dir_fd=cur)
        try:
            # (O_RDONLY opens a directory too; reading it would fail later)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a regular file", file)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_file(self, index: int) -> int:
        file = self._file(index)
        for attempt in (0, 1):
            try:
                return self._open_fd(file)
            except FileNotFoundError:
                if attempt:
                    break
                found = _find_one(self.path, _file_base(file))
                if found is None:
                    break
                file = found
                if self._moved is None:
                    self._moved = {}
                self._moved[index] = found
        raise MessageGone(f"message {_file_base(file)} is gone")

    def open_now(self, index: int) -> IMessageStream:
        self._check(index)
        if self._deleted is not None and index in self._deleted:
            raise MessageGone("message deleted")
        try:
            fd = self._open_file(index)
        except OSError as e:  # (MessageGone is no OSError: it passes as it is)
            raise _translate(e, "opening a message") from e
        return MaildirMessageStream(fd, regular=True)

    def open(self, index: int) -> "defer.Deferred[IMessageStream]":
        try:
            return defer.succeed(self.open_now(index))
        except (MessageGone, MailboxUnavailable, IndexError) as e:
            return defer.fail(e)

    def _delete_sync(self, indices: list[int]) -> list[int]:
        failed: list[int] = []
        removed: list[str] = []
        where: dict[str, str] | None = None
        if self._deleted is None:
            self._deleted = set()
        deleted = self._deleted
        for i in indices:
            if not 0 <= i < len(self._listing):
                failed.append(i)
                continue
            if i in deleted:
                continue
            file = self._file(i)
            base = _file_base(file)
            try:
                try:
                    os.unlink(os.path.join(self.path, _relpath(file)))
                except FileNotFoundError:
                    if where is None:
                        where = _find_all(self.path)
                    other = where.get(base)
                    if other is not None:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(self.path, _relpath(other)))
            except OSError as e:
                log.warn("cannot delete {file} in {path}: {error}",
                         file=_relpath(file), path=self.path, error=e)
                failed.append(i)
                continue
            deleted.add(i)
            removed.append(base)
        if removed:
            try:
                _remove_from_index(self.path, removed)
            except OSError as e:  # the next scan forgets them anyway
                log.warn("cannot update {file} after deleting: {error}", file=INDEX_FILE_NAME, error=e)
        return failed

    def delete(self, indices: "list[int]") -> "defer.Deferred[list[int]]":
        if self._closed:
            return defer.fail(MailboxUnavailable("mailbox closed"))
        return defer.Deferred.fromCoroutine(self._delete(list(indices)))

    async def _delete(self, indices: list[int]) -> list[int]:
        try:
            return await maildir_pool.run(self._delete_sync, indices)
        except Exception as e:
            raise _translate(e, f"deleting messages in {self.path}") from e

    def record_retrieved(self, indices: "list[int]", when: float) -> "defer.Deferred[None]":
        """RFC 2449 EXPIRE: remember when these messages were first retrieved."""
        listing, deleted = self._listing, self._deleted or ()
        uids = [listing.uid(i) for i in indices if 0 <= i < len(listing) and i not in deleted]
        try:
            RetrievalLog(self.path).record(uids, when)
        except OSError as e:  # the message is merely kept longer
            log.warn("cannot record retrievals in {path}: {error}", path=self.path, error=e)
        return defer.succeed(None)

    def expire(self, days: int, now: float) -> "defer.Deferred[int]":
        """RFC 2449 EXPIRE: remove messages first retrieved C{days} days ago or earlier."""
        if self._closed:
            return defer.fail(MailboxUnavailable("mailbox closed"))
        return defer.Deferred.fromCoroutine(self._expire(days, now))

    async def _expire(self, days: int, now: float) -> int:
        try:
            return await maildir_pool.run(self._expire_sync, days, now)
        except Exception as e:
            raise _translate(e, f"expiring messages in {self.path}") from e

    def _expire_sync(self, days: int, now: float) -> int:
        retrieval = RetrievalLog(self.path)
        old = retrieval.expired(days, now)
        if not old:
            return 0
        listing = self._listing
        uids = listing.uids()
        indices = [i for i, uid in enumerate(uids) if uid in old]
        failed = set(self._delete_sync(indices))
        gone = {i for i in indices if i not in failed}
        # The session's listing never shows them: a new listing (the old one is shared).
        keep = [i for i in range(len(listing)) if i not in gone]
        self._listing = Listing([self._file(i) for i in keep], [listing.size(i) for i in keep],
                                [uids[i] for i in keep])
        self._moved = None
        self._deleted = None
        present = {uids[i] for i in keep}
        retrieval.forget(uid for uid in old if uid not in present)
        return len(gone)

    def _close_cur(self) -> None:
        cur, self._cur = getattr(self, "_cur", None), None
        if cur is not None:
            with contextlib.suppress(OSError):
                os.close(cur)

    def __del__(self) -> None:
        self._close_cur()  # a session that never closed its mailbox must not keep a descriptor

    def close(self) -> "defer.Deferred[None]":
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        self._close_cur()
        lock, self._lock = self._lock, None
        if lock is None:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._release(lock))

    async def _release(self, lock: IMailboxLock) -> None:
        try:
            await defer.maybeDeferred(lock.release)
        except Exception:
            log.failure("releasing the lock of {path}", path=self.path)

    def __repr__(self) -> str:
        return f"<MaildirMailbox {self.path!r}, {len(self._listing)} messages>"
