"""
An in-memory store: mailboxes as lists of byte strings.  For tests, demos and
as the smallest example of the store interfaces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from twisted.internet import defer
from zope.interface import implementer

from popservice import wire
from popservice.interfaces import (
    IMailbox,
    IMailStore,
    IMessageStream,
    MailboxInUse,
    MailboxUnavailable,
    MessageGone,
    MessageInfo,
)


@implementer(IMessageStream)
class BytesStream:
    def __init__(self, data: bytes, chunk: int = 65536) -> None:
        self._data: bytes | None = data
        self._pos = 0
        self._chunk = chunk

    def read(self) -> "defer.Deferred[bytes]":
        if self._data is None:
            return defer.succeed(b"")
        chunk = self._data[self._pos:self._pos + self._chunk]
        self._pos += len(chunk)
        return defer.succeed(chunk)

    def close(self) -> None:
        self._data = None


@implementer(IMailbox)
class MemoryMailbox:
    def __init__(self, store: "MemoryStore", user: str) -> None:
        self._store = store
        self._user = user
        self._frozen = list(store.messages.get(user, []))
        self.closed = False

    def listing(self) -> "defer.Deferred[Sequence[MessageInfo]]":
        return defer.succeed([
            MessageInfo(wire.transmitted_size([m]), hashlib.sha256(m).hexdigest()[:32])
            for m in self._frozen
        ])

    def open(self, index: int) -> "defer.Deferred[IMessageStream]":
        message = self._frozen[index]
        if message not in self._store.messages.get(self._user, []):
            return defer.fail(MessageGone(index))
        return defer.succeed(BytesStream(message, self._store.chunk))

    def delete(self, indices: "list[int]") -> "defer.Deferred[list[int]]":
        failed = []
        current = self._store.messages.setdefault(self._user, [])
        for i in indices:
            if i in self._store.undeletable:
                failed.append(i)
                continue
            message = self._frozen[i]
            if message in current:
                current.remove(message)
        return defer.succeed(failed)

    def close(self) -> "defer.Deferred[None]":
        if not self.closed:
            self.closed = True
            self._store.locked.discard(self._user)
        return defer.succeed(None)


@implementer(IMailStore)
class MemoryStore:
    """C{messages}: user -> list of raw messages.  Locks exclusively per user."""

    def __init__(self, messages: "dict[str, list[bytes]] | None" = None, chunk: int = 65536) -> None:
        self.messages = messages if messages is not None else {}
        self.locked: set[str] = set()
        self.undeletable: set[int] = set()
        self.chunk = chunk

    def open_mailbox(self, user: str, home: "str | None") -> "defer.Deferred[IMailbox]":
        if user not in self.messages:
            return defer.fail(MailboxUnavailable(user))
        if user in self.locked:
            return defer.fail(MailboxInUse(user))
        self.locked.add(user)
        return defer.succeed(MemoryMailbox(self, user))
