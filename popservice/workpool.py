# -*- test-case-name: tests.test_stalls -*-
"""
Thread pools of our own, apart from the reactor's.

Blocking work of one kind (password hashes, Maildir file system work) gets a
named pool sized for that work, so a burst of one kind never queues the
other, and the process holds only the threads its work can use: every
thread costs its stack, its interpreter state and (glibc) its own malloc
arena, which at 10 threads is a measurable part of what idle connections
cost.  A pool starts its threads at first use and stops them when the
reactor shuts down, as the reactor does with its own pool.
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

__all__ = ["WorkPool"]

log = Logger(namespace="popservice.workpool")

T = TypeVar("T")


class WorkPool:
    """
    A named thread pool of at most C{size} threads, started at first use
    and stopped when the reactor shuts down.

    @param niceness: how much lower than the reactor's the threads' CPU
        priority is (Linux: C{nice} is per thread); 0 leaves it.
    """

    def __init__(self, name: str, size: int, *, niceness: int = 0,
                 reactor: object | None = None) -> None:
        if size < 1:
            raise ValueError(f"a thread pool needs at least one thread, not {size}")
        self.name = name
        self.size = size
        self.niceness = niceness
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._niced = threading.local()

    def _started(self) -> tuple[IReactorFromThreads, ThreadPool]:
        reactor: Any = self._reactor
        if reactor is None:
            from twisted.internet import reactor as installed

            reactor = installed
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPool(minthreads=0, maxthreads=self.size, name=self.name)
            pool.start()
            if IReactorCore.providedBy(reactor):
                reactor.addSystemEventTrigger("during", "shutdown", self.stop)
            log.debug("{pool} started: up to {threads} threads", pool=self.name, threads=self.size)
        return cast(IReactorFromThreads, reactor), pool

    def _lower_priority(self) -> None:
        """Once per thread: lower this thread's CPU priority (where threads have their own)."""
        if getattr(self._niced, "done", False):
            return
        self._niced.done = True
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.niceness)
        except (AttributeError, OSError) as e:
            log.debug("cannot lower the priority of a {pool} thread: {error}", pool=self.name, error=e)

    def run(self, work: Callable[..., T], *args: Any) -> "defer.Deferred[T]":
        """Run C{work(*args)} in the pool; a Deferred firing on the reactor thread with its result."""
        reactor, pool = self._started()
        if not self.niceness:
            return deferToThreadPool(reactor, pool, work, *args)

        def niced() -> T:
            self._lower_priority()
            return work(*args)

        return deferToThreadPool(reactor, pool, niced)

    def stop(self) -> None:
        """Stop the threads (at reactor shutdown); a later L{run} starts a new pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def busy(self) -> int:
        """Threads working now (for tests and operators)."""
        return len(self._pool.working) if self._pool is not None else 0

    def threads(self) -> int:
        """Threads the pool has now (started on demand, up to C{size})."""
        return len(self._pool.threads) if self._pool is not None else 0
