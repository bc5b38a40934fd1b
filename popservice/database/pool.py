"""
The database connection: C{twisted.enterprise.adbapi} over synchronous
psycopg 3 in the reactor's thread pool, so no query ever blocks the reactor
and the reactor stays the default one (psycopg's async API would need
Twisted's asyncio reactor for the whole process).

Each unit of work is one transaction (L{Database.run}); a serialization
failure (SQLSTATE 40001, which CockroachDB and YugabyteDB raise under
contention, and PostgreSQL at SERIALIZABLE) or a deadlock (40P01) retries it
a few times with a short random pause, so callers see either the committed
result or a real error.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.enterprise import adbapi
from twisted.internet import defer, task
from twisted.logger import Logger

T = TypeVar("T")

#: SQLSTATEs after which a transaction may simply be run again
RETRYABLE = frozenset({"40001", "40P01"})

log = Logger()


def _sqlstate(error: BaseException) -> str | None:
    return getattr(error, "sqlstate", None)


class Database:
    """A pool of connections to one database; every call returns a Deferred."""

    def __init__(self, url: str, *, min_connections: int = 1, max_connections: int = 8,
                 attempts: int = 5) -> None:
        self.url = url
        self.attempts = attempts
        self.pool = adbapi.ConnectionPool("psycopg", url, cp_min=min_connections, cp_max=max_connections,
                                          cp_reconnect=True, cp_noisy=False)

    def run(self, work: Callable[..., T], *args: Any) -> "defer.Deferred[T]":
        """Run C{work(cursor, *args)} in a transaction in a pool thread; retried when it may be."""
        return defer.Deferred.fromCoroutine(self._run(work, args))

    async def _run(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        from twisted.internet import reactor

        for attempt in range(1, self.attempts + 1):
            try:
                result: T = await self.pool.runInteraction(work, *args)
                return result
            except Exception as e:
                if _sqlstate(e) not in RETRYABLE or attempt == self.attempts:
                    raise
                log.debug("retrying a transaction after SQLSTATE {state} (attempt {n})",
                          state=_sqlstate(e), n=attempt)
                await task.deferLater(reactor, random.uniform(0.005, 0.05) * attempt, lambda: None)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.pool.close()
