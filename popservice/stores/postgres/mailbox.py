"""
A POP3 session's view of a mailbox in PostgreSQL: the listing frozen at login
(RFC 1939), bodies streamed chunk by chunk (one row per read, read only when
the connection wants more), and UPDATE's deletions in one transaction that
first checks the session still holds the lease (L{popservice.stores.postgres.lease}).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from popservice.database.pool import Database
from popservice.interfaces import IMessageStream, IWatchedMailbox, MessageGone, MessageInfo
from popservice.stores.postgres.lease import LeaseLock, check_lease

log = Logger()


def _chunk(cursor: Any, message_id: int, seq: int) -> bytes | None:
    cursor.execute("SELECT data FROM message_chunks WHERE message_id = %s AND seq = %s", (message_id, seq))
    row = cursor.fetchone()
    return None if row is None else bytes(row[0])


@implementer(IMessageStream)
class ChunkStream:
    """
    The body of one message, one stored chunk per L{read}.  With its C{size}
    known (the stored body is exactly the transmitted size), the end needs no
    query of its own.
    """

    def __init__(self, db: Database, message_id: int, size: int | None = None) -> None:
        self.db = db
        self.message_id = message_id
        self.size = size
        self.seq = 0
        self.read_bytes = 0
        self.closed = False

    def read(self) -> "defer.Deferred[bytes]":
        if self.closed or (self.size is not None and self.seq > 0 and self.read_bytes >= self.size):
            return defer.succeed(b"")
        seq = self.seq
        self.seq += 1

        def got(data: bytes | None) -> bytes:
            if data is None:
                if seq == 0:
                    # Every message has at least one chunk (maybe empty): it is gone.
                    raise MessageGone("message %d is gone" % (self.message_id,))
                return b""
            self.read_bytes += len(data)
            return data

        return self.db.run(_chunk, self.message_id, seq).addCallback(got)

    def close(self) -> None:
        self.closed = True


def _delete(cursor: Any, mailbox_id: int, holder: str, generation: int, ids: list[int]) -> list[int]:
    """UPDATE: the ids actually deleted, or raise L{LeaseLost}."""
    if not check_lease(cursor, mailbox_id, holder, generation):
        raise LeaseLost("the session no longer holds the mailbox")
    cursor.execute("DELETE FROM messages WHERE mailbox_id = %s AND id = ANY(%s) RETURNING id",
                   (mailbox_id, ids))
    return [int(row[0]) for row in cursor.fetchall()]


class LeaseLost(Exception):
    """UPDATE refused: another session has taken the mailbox over since login."""


@implementer(IWatchedMailbox)
class PostgresMailbox:
    """One session's mailbox: C{messages} is (id, MessageInfo) in delivery order."""

    def __init__(self, db: Database, mailbox_id: int, messages: Sequence[tuple[int, MessageInfo]],
                 lease: LeaseLock | None, blobs: Any = None) -> None:
        self.db = db
        #: where bodies come from (L{popservice.stores.postgres.blobs.IBlobStore}); chunk rows by default
        self.blobs = blobs
        self.mailbox_id = mailbox_id
        self.ids = [message_id for message_id, _ in messages]
        self.infos = [info for _, info in messages]
        self.lease = lease

    def listing(self) -> "defer.Deferred[Sequence[MessageInfo]]":
        return defer.succeed(list(self.infos))

    def open(self, index: int) -> "defer.Deferred[IMessageStream]":
        if self.blobs is not None:
            return defer.succeed(self.blobs.stream(self.ids[index], self.infos[index].size))
        return defer.succeed(ChunkStream(self.db, self.ids[index], self.infos[index].size))

    def delete(self, indices: "list[int]") -> "defer.Deferred[list[int]]":
        ids = [self.ids[i] for i in indices]
        if self.lease is None:
            d = self.db.run(_delete_unlocked, self.mailbox_id, ids)
        else:
            d = self.db.run(_delete, self.mailbox_id, self.lease.holder, self.lease.generation, ids)

        def done(deleted: list[int]) -> list[int]:
            # A message already gone (another session, with --lock none) counts as removed.
            return []

        def refused(failure: Any) -> list[int]:
            failure.trap(LeaseLost)
            log.warn("UPDATE of mailbox {id} refused: the lease was taken over", id=self.mailbox_id)
            return list(indices)

        return d.addCallbacks(done, refused)

    def watch(self, idle_seconds: Callable[[], float], lost: Callable[[str], object]) -> None:
        if self.lease is not None:
            self.lease.idle_seconds = idle_seconds
            self.lease.lost = lost

    def close(self) -> "defer.Deferred[None]":
        if self.lease is None:
            return defer.succeed(None)
        return self.lease.release()


def _delete_unlocked(cursor: Any, mailbox_id: int, ids: list[int]) -> list[int]:
    cursor.execute("DELETE FROM messages WHERE mailbox_id = %s AND id = ANY(%s) RETURNING id",
                   (mailbox_id, ids))
    return [int(row[0]) for row in cursor.fetchall()]
