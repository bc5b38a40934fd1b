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
import os
from typing import BinaryIO

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

from popservice.interfaces import (
    IExpiringMailbox,
    IMailboxLock,
    IMessageStream,
    ISizedMessageStream,
    MailboxInUse,
    MailboxUnavailable,
    MessageGone,
    MessageInfo,
)
from popservice.stores.maildir.layout import _file_base, _find_all, _find_one, _nofollow_opener, _relpath
from popservice.stores.maildir.scan import _Scan
from popservice.stores.maildir.sizes import CHUNK_SIZE
from popservice.stores.maildir.uidlist import INDEX_FILE_NAME, _remove_from_index
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


@implementer(ISizedMessageStream)
class MaildirMessageStream:
    """
    A message file read in chunks of L{CHUNK_SIZE} (or what the reader sets
    C{chunk_size} to), unbuffered: no buffer of the file's own per open
    message; closed at the end.
    """

    def __init__(self, f: BinaryIO, chunk_size: int = CHUNK_SIZE) -> None:
        self._file: BinaryIO | None = f
        self.chunk_size = chunk_size

    def read(self) -> "defer.Deferred[bytes]":
        f = self._file
        if f is None:
            return defer.succeed(b"")
        try:
            chunk = f.read(self.chunk_size)
        except OSError as e:
            self.close()
            log.warn("error reading a message file: {error}", error=e)
            return defer.fail(MailboxUnavailable("error reading message"))
        if not chunk:
            self.close()
        return defer.succeed(chunk)

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()


@implementer(IExpiringMailbox)
class MaildirMailbox:
    """
    One session's view of a Maildir: the listing frozen at open.  Indices are
    0-based positions in it.
    """

    def __init__(self, path: str, scan: _Scan, lock: IMailboxLock | None) -> None:
        self.path = path
        # per message only its file name (shared with the scan) and its
        # MessageInfo (shared with the session's listing): no record object
        self._files = scan.files
        self._infos = scan.infos
        self._deleted: set[int] = set()
        self._lock = lock
        self._closed = False

    def listing(self) -> "defer.Deferred[list[MessageInfo]]":
        return defer.succeed(list(self._infos))

    def _check(self, index: int) -> None:
        if self._closed:
            raise MailboxUnavailable("mailbox closed")
        if not 0 <= index < len(self._files):
            raise IndexError(f"no message {index}")

    def _open_file(self, index: int) -> BinaryIO:
        for attempt in (0, 1):
            try:
                return open(os.path.join(self.path, _relpath(self._files[index])), "rb", buffering=0,
                            opener=_nofollow_opener)
            except FileNotFoundError:
                if attempt:
                    break
                file = _find_one(self.path, _file_base(self._files[index]))
                if file is None:
                    break
                self._files[index] = file
        raise MessageGone(f"message {_file_base(self._files[index])} is gone")

    def open(self, index: int) -> "defer.Deferred[IMessageStream]":
        try:
            self._check(index)
            if index in self._deleted:
                raise MessageGone("message deleted")
            f = self._open_file(index)
        except (MessageGone, MailboxUnavailable, IndexError) as e:
            return defer.fail(e)
        except OSError as e:
            return defer.fail(_translate(e, "opening a message"))
        return defer.succeed(MaildirMessageStream(f))

    def _delete_sync(self, indices: list[int]) -> list[int]:
        failed: list[int] = []
        removed: list[str] = []
        where: dict[str, str] | None = None
        for i in indices:
            if not 0 <= i < len(self._files):
                failed.append(i)
                continue
            if i in self._deleted:
                continue
            file = self._files[i]
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
            self._deleted.add(i)
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
            return await deferToThread(self._delete_sync, indices)
        except Exception as e:
            raise _translate(e, f"deleting messages in {self.path}") from e

    def record_retrieved(self, indices: "list[int]", when: float) -> "defer.Deferred[None]":
        """RFC 2449 EXPIRE: remember when these messages were first retrieved."""
        uids = [self._infos[i].uid for i in indices if 0 <= i < len(self._infos) and i not in self._deleted]
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
            return await deferToThread(self._expire_sync, days, now)
        except Exception as e:
            raise _translate(e, f"expiring messages in {self.path}") from e

    def _expire_sync(self, days: int, now: float) -> int:
        retrieval = RetrievalLog(self.path)
        old = retrieval.expired(days, now)
        if not old:
            return 0
        indices = [i for i, info in enumerate(self._infos) if info.uid in old]
        failed = set(self._delete_sync(indices))
        gone = {i for i in indices if i not in failed}
        # The session's listing never shows them: new lists (the old ones may be shared).
        keep = [i for i in range(len(self._files)) if i not in gone]
        self._files = [self._files[i] for i in keep]
        self._infos = [self._infos[i] for i in keep]
        self._deleted = set()
        present = {info.uid for info in self._infos}
        retrieval.forget(uid for uid in old if uid not in present)
        return len(gone)

    def close(self) -> "defer.Deferred[None]":
        if self._closed:
            return defer.succeed(None)
        self._closed = True
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
        return f"<MaildirMailbox {self.path!r}, {len(self._files)} messages>"
