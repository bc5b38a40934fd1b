"""
Serve any C{twisted.mail.pop3.IMailbox} avatar (for example
C{twisted.mail.maildir.MaildirMailbox}) through popservice's L{IMailbox}, so
popservice drops into an existing Twisted mail stack unchanged.

Twisted's interface is synchronous; its calls are made as they are and their
results wrapped in Deferreds (a Twisted mailbox that returns Deferreds from
C{listMessages} is handled too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import pop3
from zope.interface import implementer

from popservice.interfaces import IMailbox, IMessageStream, MessageGone, MessageInfo

CHUNK = 65536


@implementer(IMessageStream)
class FileStream:
    """An L{IMessageStream} over a binary file object."""

    def __init__(self, f: IO[Any], chunk: int = CHUNK) -> None:
        self._f: IO[Any] | None = f
        self._chunk = chunk

    def read(self) -> "defer.Deferred[bytes]":
        if self._f is None:
            return defer.succeed(b"")
        data: Any = self._f.read(self._chunk)
        if isinstance(data, str):
            # Twisted's MaildirMailbox opens files in text mode on Python 3.
            data = data.encode("utf-8", "surrogateescape")
        return defer.succeed(data)

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            f.close()


@implementer(IMailbox)
class TwistedMailboxAdapter:
    """Adapt a C{twisted.mail.pop3.IMailbox} to popservice's L{IMailbox}."""

    log = Logger()

    def __init__(self, mailbox: pop3.IMailbox, logout: Callable[[], None] | None = None) -> None:
        self.mailbox = mailbox
        self._logout = logout

    def listing(self) -> "defer.Deferred[Sequence[MessageInfo]]":
        d: defer.Deferred[Any] = defer.maybeDeferred(self.mailbox.listMessages)

        def got(sizes: list[int]) -> list[MessageInfo]:
            out = []
            for i, size in enumerate(sizes):
                uid = self.mailbox.getUidl(i)
                if isinstance(uid, bytes):
                    uid = uid.decode("ascii", "replace")
                out.append(MessageInfo(size=int(size or 0), uid=str(uid)))
            return out

        return d.addCallback(got)

    def open(self, index: int) -> "defer.Deferred[IMessageStream]":
        try:
            f = self.mailbox.getMessage(index)
        except (OSError, ValueError, IndexError) as e:
            return defer.fail(MessageGone(str(e)))
        if isinstance(f, defer.Deferred):
            return f.addCallback(FileStream)
        return defer.succeed(FileStream(f))

    def delete(self, indices: "list[int]") -> "defer.Deferred[list[int]]":
        failed = []
        for i in indices:
            try:
                self.mailbox.deleteMessage(i)
            except Exception:
                self.log.failure("deleting message {index} failed", index=i)
                failed.append(i)
        d: defer.Deferred[Any] = defer.maybeDeferred(self.mailbox.sync)
        return d.addCallback(lambda _: failed)

    def close(self) -> "defer.Deferred[None]":
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()
        return defer.succeed(None)
