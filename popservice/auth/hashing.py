# -*- test-case-name: tests.test_stalls -*-
"""
The thread pool password hashes are verified in, apart from the reactor's.

Verifying an C{{ARGON2ID}}, C{{BLF-CRYPT}} or C{{SHA512-CRYPT}} password
takes tens to hundreds of milliseconds of CPU (argon2 also 64 MiB of
memory) and must not run on the reactor thread.  It must not share a pool
with the stores' file system work either (the Maildir store has its own,
L{popservice.stores.maildir.work.MAILDIR_THREADS} threads): 50 logins at
once with slow hashes would queue every mailbox open behind them, and more
hashing threads than CPUs take CPU time from the reactor thread itself.

So hashes get a pool of their own, as Dovecot gives them auth worker
processes, with one thread per CPU (L{HASHING_THREADS}): the work is CPU
bound (the hash libraries release the GIL), so more threads would not verify
more passwords per second, only hold more memory and compete with the
reactor.  Logins beyond that wait in the pool's queue, which is where the
server's caps on connections already bound them.  The threads run at a lower
CPU priority (Linux: C{nice} is per thread, L{HASHING_NICENESS}), so when
the CPUs are busy the reactor thread, which answers every other session,
is scheduled first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from twisted.internet import defer

from popservice.workpool import WorkPool

__all__ = ["HASHING_THREADS", "HashingPool", "run_hashing"]

T = TypeVar("T")

#: Threads verifying password hashes: one per CPU, at most 16 (an argon2
#: verification holds C{ARGON2_MEMORY_COST}, 64 MiB, while it runs).
HASHING_THREADS = max(1, min(os.cpu_count() or 1, 16))

#: How much lower the hashing threads' CPU priority is than the reactor's.
HASHING_NICENESS = 10


class HashingPool(WorkPool):
    """
    A thread pool of its own for password hashing (L{HASHING_THREADS} threads
    at L{HASHING_NICENESS}), started at first use and stopped when the
    reactor shuts down.
    """

    def __init__(self, size: int | None = None, reactor: object | None = None) -> None:
        super().__init__("popservice-hashing", size if size is not None else HASHING_THREADS,
                         niceness=HASHING_NICENESS, reactor=reactor)


#: The pool every user database's checker verifies passwords in by default.
hashing_pool = HashingPool()


def run_hashing(work: Callable[[], T]) -> "defer.Deferred[T]":
    """Run C{work()} (a password verification) in L{hashing_pool}."""
    return hashing_pool.run(work)
