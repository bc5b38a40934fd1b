# -*- test-case-name: tests.test_stalls -*-
"""
The thread pool password hashes are verified in, apart from the reactor's.

Verifying an C{{ARGON2ID}}, C{{BLF-CRYPT}} or C{{SHA512-CRYPT}} password
takes tens to hundreds of milliseconds of CPU (argon2 also 64 MiB of
memory) and must not run on the reactor thread.  It must not run in the
reactor's own thread pool either: that pool (10 threads by default) is where
the stores list and size Maildirs, so 50 logins at once with slow hashes
would queue every mailbox open behind them, and ten hashing threads on a
machine with two cores take CPU time from the reactor thread itself.

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
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

__all__ = ["HASHING_THREADS", "HashingPool", "run_hashing"]

log = Logger(namespace="popservice.auth.hashing")

T = TypeVar("T")

#: Threads verifying password hashes: one per CPU, at most 16 (an argon2
#: verification holds C{ARGON2_MEMORY_COST}, 64 MiB, while it runs).
HASHING_THREADS = max(1, min(os.cpu_count() or 1, 16))

#: How much lower the hashing threads' CPU priority is than the reactor's.
HASHING_NICENESS = 10

_niced = threading.local()


def _lower_priority() -> None:
    """Once per thread: lower this thread's CPU priority (where threads have their own)."""
    if getattr(_niced, "done", False):
        return
    _niced.done = True
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICENESS)
    except (AttributeError, OSError) as e:
        log.debug("cannot lower the priority of a hashing thread: {error}", error=e)


class HashingPool:
    """
    A thread pool of its own for password hashing, started at first use and
    stopped when the reactor shuts down (as the reactor does with its own).
    """

    def __init__(self, size: int | None = None, reactor: object | None = None) -> None:
        self.size = size if size is not None else HASHING_THREADS
        self._reactor = reactor
        self._pool: ThreadPool | None = None

    def _started(self) -> tuple[IReactorFromThreads, ThreadPool]:
        reactor: Any = self._reactor
        if reactor is None:
            from twisted.internet import reactor as installed

            reactor = installed
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPool(minthreads=0, maxthreads=self.size, name="popservice-hashing")
            pool.start()
            if IReactorCore.providedBy(reactor):
                reactor.addSystemEventTrigger("during", "shutdown", self.stop)
            log.debug("password hashing pool started: {threads} threads", threads=self.size)
        return cast(IReactorFromThreads, reactor), pool

    def run(self, work: Callable[[], T]) -> "defer.Deferred[T]":
        """Run C{work()} in the pool; a Deferred firing on the reactor thread with its result."""
        reactor, pool = self._started()

        def niced() -> T:
            _lower_priority()
            return work()

        return deferToThreadPool(reactor, pool, niced)

    def stop(self) -> None:
        """Stop the threads (at reactor shutdown); a later L{run} starts a new pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def busy(self) -> int:
        """Threads working now (for tests and operators)."""
        return len(self._pool.working) if self._pool is not None else 0


#: The pool every user database's checker verifies passwords in by default.
hashing_pool = HashingPool()


def run_hashing(work: Callable[[], T]) -> "defer.Deferred[T]":
    """Run C{work()} (a password verification) in L{hashing_pool}."""
    return hashing_pool.run(work)
