"""
Message bodies behind a small interface, so the bodies can move to an object
store while listings, leases and UIDLs stay in PostgreSQL.

A body is stored as delivered, CRLF-normalised (its length is then exactly
the size LIST reports), in chunks; byte-stuffing is done on the way out by
L{popservice.body.BodyEncoder}, the one place it happens, so TOP and any
other reader see the message itself.  L{DatabaseBlobs} keeps the chunks as
C{bytea} rows of C{message_chunks}, written in the delivery's own transaction
(a message is never listed without its body) and read one row per
L{IMessageStream.read}, only when the connection wants more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zope.interface import Interface, implementer

from popservice.database.pool import Database
from popservice.interfaces import IMessageStream
from popservice.stores.postgres.mailbox import ChunkStream


class IBlobStore(Interface):
    """Where message bodies live."""

    def write(cursor: Any, message_id: int, chunks: "Sequence[bytes]") -> None:
        """Store the body of C{message_id} (inside the delivery's transaction, C{cursor})."""

    def stream(message_id: int, size: int) -> IMessageStream:
        """The body of C{message_id} (C{size} octets), chunk by chunk."""


def write_chunks(cursor: Any, message_id: int, chunks: Sequence[bytes]) -> None:
    """The body of C{message_id} as C{message_chunks} rows (at least one, maybe empty)."""
    for seq, data in enumerate(chunks or [b""]):
        cursor.execute("INSERT INTO message_chunks (message_id, seq, data) VALUES (%s, %s, %s)",
                       (message_id, seq, data))


@implementer(IBlobStore)
class DatabaseBlobs:
    """Bodies as C{bytea} chunks in C{message_chunks}; removed with their message (ON DELETE CASCADE)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def write(self, cursor: Any, message_id: int, chunks: Sequence[bytes]) -> None:
        write_chunks(cursor, message_id, chunks)

    def stream(self, message_id: int, size: int) -> IMessageStream:
        return ChunkStream(self.db, message_id, size)
