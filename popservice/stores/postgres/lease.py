"""
The cluster-wide session lock: a lease row per mailbox (table C{leases}).

A session takes the row when it is free, expired (its holder died or
stalled), or idle past the grace period (the same-user idle take-over, across
hosts); every take bumps the row's C{generation}, which only ever grows (rows
are never deleted).  The holder renews the lease every third of its
time-to-live and writes its session's last activity; a renewal that finds the
generation changed means the mailbox was taken over: the session ends
without UPDATE.  QUIT's deletions run in a transaction that locks the row and
checks the generation first, so a front end that stalled past its lease can
never apply stale deletions.  Expiry is on the database's clock, so front ends
need no synchronised clocks.

No advisory locks (stubs or missing on CockroachDB and YugabyteDB, broken
under PgBouncer transaction pooling, gone on failover): only rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from popservice.database.pool import Database
from popservice.interfaces import IMailboxLock, MailboxInUse

log = Logger()

_TAKE = """
INSERT INTO leases (mailbox_id, holder, generation, expires, last_activity)
VALUES (%(mailbox)s, %(holder)s, 1, now() + %(ttl)s * interval '1 second', now())
ON CONFLICT (mailbox_id) DO UPDATE
   SET holder = EXCLUDED.holder, generation = leases.generation + 1,
       expires = EXCLUDED.expires, last_activity = now()
 WHERE leases.expires < now() OR leases.last_activity < now() - %(grace)s * interval '1 second'
RETURNING generation
"""


def take_lease(cursor: Any, mailbox_id: int, holder: str, ttl: float, grace: float) -> int:
    """In the caller's transaction: take the lease or raise L{MailboxInUse}; the new generation."""
    cursor.execute(_TAKE, {"mailbox": mailbox_id, "holder": holder, "ttl": ttl, "grace": grace})
    row = cursor.fetchone()
    if row is None:
        raise MailboxInUse("mailbox leased by a live session")
    return int(row[0])


def check_lease(cursor: Any, mailbox_id: int, holder: str, generation: int) -> bool:
    """In the caller's transaction: lock the row; is it still ours?"""
    cursor.execute("SELECT holder, generation FROM leases WHERE mailbox_id = %s FOR UPDATE", (mailbox_id,))
    row = cursor.fetchone()
    return row is not None and row[0] == holder and int(row[1]) == generation


def _renew(cursor: Any, mailbox_id: int, holder: str, generation: int, ttl: float, idle: float) -> bool:
    cursor.execute("UPDATE leases SET expires = now() + %s * interval '1 second', "
                   "last_activity = now() - %s * interval '1 second' "
                   "WHERE mailbox_id = %s AND holder = %s AND generation = %s",
                   (ttl, idle, mailbox_id, holder, generation))
    return bool(cursor.rowcount == 1)


def _release(cursor: Any, mailbox_id: int, holder: str, generation: int) -> None:
    cursor.execute("UPDATE leases SET expires = now() - interval '1 second' "
                   "WHERE mailbox_id = %s AND holder = %s AND generation = %s",
                   (mailbox_id, holder, generation))


@implementer(IMailboxLock)
class LeaseLock:
    """A lease already taken (by L{take_lease}, with the listing): renewal and release."""

    def __init__(self, db: Database, mailbox_id: int, holder: str, generation: int, ttl: float,
                 clock: IReactorTime) -> None:
        self.db = db
        self.mailbox_id = mailbox_id
        self.holder = holder
        self.generation = generation
        self.ttl = ttl
        self.idle_seconds: Callable[[], float] = lambda: 0.0
        self.lost: Callable[[str], object] | None = None
        self.released = False
        self._renewal = task.LoopingCall(self._renew)
        self._renewal.clock = clock
        self._renewal.start(ttl / 3.0, now=False).addErrback(
            lambda f: log.failure("lease renewal loop failed", f))

    def acquire(self) -> "defer.Deferred[None]":
        """Taken already (with the listing, in one transaction)."""
        return defer.succeed(None)

    def _renew(self) -> "defer.Deferred[None]":
        idle = max(0.0, float(self.idle_seconds()))
        d = self.db.run(_renew, self.mailbox_id, self.holder, self.generation, self.ttl, idle)

        def renewed(ours: bool) -> None:
            if not ours and not self.released:
                log.warn("lease of mailbox {id} lost (taken over or expired and taken)", id=self.mailbox_id)
                self._stop()
                if self.lost is not None:
                    self.lost("mailbox taken over by another session")

        def failed(failure: Any) -> None:
            # A database hiccup: try again next period; expiry protects the others.
            log.warn("renewing the lease of mailbox {id} failed: {why}", id=self.mailbox_id,
                     why=failure.getErrorMessage())

        return d.addCallbacks(renewed, failed)

    def _stop(self) -> None:
        if self._renewal.running:
            self._renewal.stop()

    def release(self) -> "defer.Deferred[None]":
        if self.released:
            return defer.succeed(None)
        self.released = True
        self._stop()
        d = self.db.run(_release, self.mailbox_id, self.holder, self.generation)
        return d.addErrback(lambda f: log.warn("releasing lease of mailbox {id} failed: {why}",
                                               id=self.mailbox_id, why=f.getErrorMessage()))
