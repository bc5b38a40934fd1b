"""
A mail store in PostgreSQL (C{--mail postgresql://user@host/db}): any number of
stateless front ends on any number of hosts serve the same mailboxes, with
one cluster-wide session lock per mailbox (L{popservice.stores.postgres.lease}).

Login is one transaction: find or create the mailbox row, take the lease,
read the listing from the covering index C{messages_listing} (one index-only
scan, however large the mailbox).  Delivery (L{IMailDelivery}) is one
transaction too: the message CRLF-normalised into chunks, its transmitted
size, its UIDL fixed from the id sequence, its idempotency key unique per
mailbox; it never takes the lease.

On the PostgreSQL-compatible distributed engines: C{bigserial}/sequences are
not ordered across nodes on CockroachDB (use its C{unique_rowid()}, ordered
enough per node: delivery order is then approximate across nodes), C{INCLUDE}
indexes are C{STORING} there, and C{ON CONFLICT ... DO UPDATE ... WHERE} and
C{SELECT ... FOR UPDATE} are supported by all three; serialization failures
(SQLSTATE 40001) are retried by L{Database.run}.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from popservice.body import LineEndNormaliser
from popservice.database import schema
from popservice.database.pool import Database
from popservice.interfaces import (
    IMailbox,
    IMailDelivery,
    IMailStore,
    MailboxInUse,
    MailboxUnavailable,
    MessageInfo,
    NoSuchMailbox,
)
from popservice.stores.postgres.blobs import DatabaseBlobs, IBlobStore, write_chunks
from popservice.stores.postgres.lease import LeaseLock, take_lease
from popservice.stores.postgres.mailbox import PostgresMailbox

log = Logger()

#: body chunk size: one row, one read of a RETR
CHUNK_SIZE = 256 * 1024

_BAD_NAME = re.compile(r"[\x00-\x1f\x7f]")


def valid_mailbox_name(user: str) -> bool:
    """A user name usable as a mailbox key: 1-255 characters, no control characters."""
    return 0 < len(user) <= 255 and not _BAD_NAME.search(user)


def _mailbox_id(cursor: Any, user: str) -> int:
    cursor.execute("INSERT INTO mailboxes (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = "
                   "EXCLUDED.name RETURNING id", (user,))
    return int(cursor.fetchone()[0])


def _listing(cursor: Any, mailbox_id: int) -> list[tuple[int, MessageInfo]]:
    cursor.execute("SELECT id, size, uidl FROM messages WHERE mailbox_id = %s ORDER BY id", (mailbox_id,))
    return [(int(i), MessageInfo(int(size), uidl)) for i, size, uidl in cursor.fetchall()]


def _open(cursor: Any, user: str, holder: str | None, ttl: float, grace: float
          ) -> tuple[int, int | None, list[tuple[int, MessageInfo]]]:
    mailbox_id = _mailbox_id(cursor, user)
    generation = take_lease(cursor, mailbox_id, holder, ttl, grace) if holder is not None else None
    return mailbox_id, generation, _listing(cursor, mailbox_id)


def uidl_for(message_id: int) -> str:
    """The UIDL of a message delivered here: its id, which the sequence never gives twice."""
    return "P%016x" % (message_id,)


def _deliver(cursor: Any, user: str, chunks: list[bytes], size: int, key: str | None,
             uidl: str | None, blobs: IBlobStore | None = None) -> bool:
    mailbox_id = _mailbox_id(cursor, user)
    cursor.execute("SELECT nextval('messages_id_seq')")
    message_id = int(cursor.fetchone()[0])
    cursor.execute("INSERT INTO messages (id, mailbox_id, uidl, size, idempotency_key) "
                   "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id",
                   (message_id, mailbox_id, uidl or uidl_for(message_id), size, key))
    if cursor.fetchone() is None:
        return False  # this key (or this imported UIDL) is stored already
    if blobs is not None:
        blobs.write(cursor, message_id, chunks)
    else:
        write_chunks(cursor, message_id, chunks)
    return True


def normalise(message: bytes) -> tuple[list[bytes], int]:
    """The message with CRLF line ends, in stored chunks, and its size as transmitted."""
    norm = LineEndNormaliser()
    data = norm.feed(message) + norm.finish()
    return [data[i:i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)], len(data)


@implementer(IMailStore, IMailDelivery)
class PostgresStore:
    """Mailboxes in one PostgreSQL database."""

    def __init__(self, db: Database, *, lock_policy: str = "exclusive", lease_ttl: float = 60.0,
                 lock_grace: float = 60.0, clock: IReactorTime | None = None,
                 blobs: IBlobStore | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.db = db
        self.blobs: IBlobStore = blobs if blobs is not None else DatabaseBlobs(db)
        self.lock_policy = lock_policy
        self.lease_ttl = lease_ttl
        self.lock_grace = lock_grace
        self.clock: IReactorTime = clock
        #: this front end, in every lease it holds (host, process, random)
        self.holder_prefix = "%s:%d:%s" % (socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8])
        self._schema_ok = False

    @classmethod
    def from_description(cls, description: str, **kw: Any) -> "PostgresStore":
        """C{postgresql://user@host:port/dbname?...} (a libpq URL) -> a store."""
        return cls(Database(description), **kw)

    def check_schema(self) -> "defer.Deferred[None]":
        """Fails with L{schema.SchemaMismatch} unless the database is at this popservice's version."""
        if self._schema_ok:
            return defer.succeed(None)

        def checked(_: None) -> None:
            self._schema_ok = True

        return self.db.run(schema.check).addCallback(checked)

    def _holder(self) -> str:
        return "%s:%s" % (self.holder_prefix, uuid.uuid4().hex[:12])

    def open_mailbox(self, user: str, home: "str | None") -> "defer.Deferred[IMailbox]":
        return defer.Deferred.fromCoroutine(self._open_mailbox(user))

    async def _open_mailbox(self, user: str) -> IMailbox:
        if not valid_mailbox_name(user):
            raise MailboxUnavailable("invalid user name for a mailbox")
        holder = self._holder() if self.lock_policy == "exclusive" else None
        try:
            await self.check_schema()
            mailbox_id, generation, messages = await self.db.run(
                _open, user, holder, self.lease_ttl, self.lock_grace)
        except schema.SchemaMismatch as e:
            log.error("{why}", why=str(e))
            raise MailboxUnavailable(str(e)) from e
        except Exception as e:
            if isinstance(e, MailboxInUse):
                raise
            log.failure("opening mailbox of {user} failed", user=user)
            raise MailboxUnavailable("database unavailable") from e
        lease = None
        if holder is not None and generation is not None:
            lease = LeaseLock(self.db, mailbox_id, holder, generation, self.lease_ttl, self.clock)
        return PostgresMailbox(self.db, mailbox_id, messages, lease, self.blobs)

    # IMailDelivery

    def deliver(self, user: str, home: "str | None", message: bytes, key: "str | None",
                uidl: "str | None" = None) -> "defer.Deferred[bool]":
        """Store C{message} for C{user}; C{uidl} keeps an imported UIDL (migration)."""
        if not valid_mailbox_name(user):
            return defer.fail(NoSuchMailbox("invalid user name for a mailbox"))
        chunks, size = normalise(message)

        def failed(failure: Any) -> Any:
            if failure.check(schema.SchemaMismatch):
                raise MailboxUnavailable(failure.getErrorMessage())
            log.failure("delivery to {user} failed", failure, user=user)
            raise MailboxUnavailable("database unavailable")

        d = self.check_schema().addCallback(lambda _: self.db.run(_deliver, user, chunks, size, key, uidl,
                                                                     self.blobs))
        return d.addErrback(failed)

    def exists(self, user: str, home: "str | None") -> "defer.Deferred[bool]":
        """Any valid name may receive mail: its mailbox row is made at first delivery or login."""
        return defer.succeed(valid_mailbox_name(user))
