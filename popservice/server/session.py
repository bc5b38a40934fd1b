"""
TRANSACTION and UPDATE (RFC 1939 sections 5 and 6): the frozen message list,
deletion marks, and the deletions done at QUIT.

Nothing here can be reached before a successful login: a L{MailboxSession} is
only made from an opened mailbox (L{popservice.server.transaction}).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from twisted.internet import defer
from twisted.python.failure import Failure

from popservice import wire
from popservice.interfaces import IMailbox, MessageInfo


@dataclass(slots=True)
class SessionStats:
    """Counters for the logout summary and metrics."""

    retr: int = 0
    retr_bytes: int = 0
    top: int = 0
    top_bytes: int = 0
    deleted: int = 0
    deleted_bytes: int = 0


class MailboxSession:
    """
    One logged-in session's view of its mailbox.  What an idle session does
    not use (deletion marks, retrievals, counters) is only made when first
    used: a logged-in connection costs its listing and little more.
    """

    __slots__ = ("mailbox", "listing", "_deleted", "_retrieved", "_stats", "updated")

    def __init__(self, mailbox: IMailbox, listing: Sequence[MessageInfo]) -> None:
        self.mailbox = mailbox
        self.listing = listing
        self._deleted: set[int] | None = None
        self._retrieved: set[int] | None = None
        self._stats: SessionStats | None = None
        self.updated = False

    @property
    def deleted(self) -> set[int]:
        """The 0-based indices marked with DELE."""
        if self._deleted is None:
            self._deleted = set()
        return self._deleted

    @deleted.setter
    def deleted(self, value: set[int]) -> None:
        self._deleted = value

    @property
    def retrieved(self) -> set[int]:
        """Messages retrieved completely with RETR in this session."""
        if self._retrieved is None:
            self._retrieved = set()
        return self._retrieved

    @property
    def stats(self) -> SessionStats:
        if self._stats is None:
            self._stats = SessionStats()
        return self._stats

    def message(self, number: int) -> Union[int, bytes]:
        """
        The 0-based index of message C{number}, or an C{-ERR} line: numbers are
        1..n as of login and a deleted message may not be named (RFC 1939 sec. 5).
        """
        if not 1 <= number <= len(self.listing):
            return wire.err("No such message")
        index = number - 1
        if self._deleted and index in self._deleted:
            return wire.err("Message already deleted")
        return index

    def _live(self) -> list[tuple[int, MessageInfo]]:
        deleted = self._deleted
        if not deleted:
            return list(enumerate(self.listing, 1))
        return [(i + 1, m) for i, m in enumerate(self.listing) if i not in deleted]

    def stat(self) -> bytes:
        """RFC 1939 section 5, STAT: count and size, deleted messages excluded."""
        live = self._live()
        return wire.ok("%d %d" % (len(live), sum(m.size for _, m in live)))

    def list(self, number: "int | None") -> bytes:
        """RFC 1939 section 5, LIST [msg]."""
        if number is not None:
            index = self.message(number)
            if isinstance(index, bytes):
                return index
            return wire.ok("%d %d" % (number, self.listing[index].size))
        live = self._live()
        first = wire.ok("%d messages (%d octets)" % (len(live), sum(m.size for _, m in live)))
        return wire.multiline(first, [b"%d %d" % (n, m.size) for n, m in live])

    def uidl(self, number: "int | None") -> bytes:
        """RFC 1939 section 7, UIDL [msg]."""
        if number is not None:
            index = self.message(number)
            if isinstance(index, bytes):
                return index
            return wire.ok("%d %s" % (number, self.listing[index].uid))
        return wire.multiline(wire.ok(), [b"%d %s" % (n, m.uid.encode("ascii")) for n, m in self._live()])

    def dele(self, number: int) -> bytes:
        """RFC 1939 section 5, DELE: only marks; removal happens in UPDATE."""
        index = self.message(number)
        if isinstance(index, bytes):
            return index
        self.deleted.add(index)
        return wire.ok("Message %d deleted" % (number,))

    def rset(self) -> bytes:
        """RFC 1939 section 5, RSET: unmark all deletions."""
        self._deleted = None
        return self.stat()

    def update(self) -> "defer.Deferred[bytes]":
        """
        RFC 1939 section 6, UPDATE: remove the marked messages.  If some could not
        be removed, answer C{-ERR [SYS/TEMP]} (RFC 2449 section 8); what was
        removed stays removed.
        """
        self.updated = True
        indices = sorted(self.deleted)
        if not indices:
            return defer.succeed(wire.ok("Bye"))

        def done(failed: "list[int]") -> bytes:
            failed_set = set(failed)
            gone = [i for i in indices if i not in failed_set]
            # What stays marked after UPDATE is what was removed: a message the store
            # kept still counts as retrieved for RFC 2449 EXPIRE (transaction.release).
            self.deleted = set(gone)
            self.stats.deleted = len(gone)
            self.stats.deleted_bytes = sum(self.listing[i].size for i in gone)
            if failed_set:
                return wire.err("Some deleted messages were not removed", "SYS/TEMP")
            return wire.ok("Bye, %d messages deleted" % (len(gone),))

        def failed(failure: Failure) -> Failure:
            # Nothing is known to be removed: every retrieved message still counts as retrieved
            # for RFC 2449 EXPIRE (transaction.release), marked for deletion or not.
            self.updated = False
            return failure

        d: defer.Deferred[list[int]] = defer.maybeDeferred(self.mailbox.delete, indices)
        return d.addCallbacks(done, failed)

