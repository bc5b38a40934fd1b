"""
Fair shares of the reactor under a command flood, and memory handed back.

A connection answers at most C{commands_per_turn} commands each time it is
run.  When it has more buffered (a pipelining client, or a flood), it does
not reschedule itself: it queues in the server's L{FairScheduler}, which
runs the queued connections round robin in later reactor turns with a
budget of commands per turn for all of them together, and a slice of time
(C{slice_seconds}: a command's cost varies, and so does the CPU a shared
machine leaves us).  However many connections flood, a reactor turn then
does a bounded amount of their work, and a connection that sends one
command at a time (every real client waiting for answers) is answered in
the turn its bytes arrive: after one such slice at most.  A backlogged
connection stops reading while it waits (its input buffer is full), so a
flood costs its buffer and its place in the queue, nothing more.

L{CommandRate} caps one connection's commands per second (a token bucket):
beyond it the connection stops reading until tokens are back.  The default
is far above what a real client sends (they pipeline a few hundred commands
at most, each RETR bounded by flow control anyway).

L{MemoryTrimmer}: bodies and answers of many connections come and go as
64 KiB-sized objects from the C heap, which keeps the pages after they are
freed (and a closed connection's objects form a cycle, freed only by the
garbage collector); after many connections have closed the server collects
and asks glibc to hand free pages back (C{malloc_trim(0)}, milliseconds), so
memory returns to its baseline after a flood of connections has left.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Runnable(Protocol):
    def run_turn(self) -> int:
        """Answer up to one turn's worth of buffered commands; return how many."""
        ...


class FairScheduler:
    """Round robin over connections with a backlog; C{budget} commands per reactor turn in all."""

    def __init__(self, clock: IReactorTime, budget: int = 256, slice_seconds: float = 0.0) -> None:
        self.clock = clock
        self.budget = budget
        #: the most time one turn gives the queue (0: no limit but the budget)
        self.slice_seconds = slice_seconds
        self._queue: deque[Runnable] = deque()
        self._queued: set[int] = set()
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def queued(self, connection: Runnable) -> bool:
        return id(connection) in self._queued

    def enqueue(self, connection: Runnable) -> None:
        """C{connection} has more work than its turn allowed: run it later, in its turn."""
        if id(connection) in self._queued:
            return
        self._queued.add(id(connection))
        self._queue.append(connection)
        if self._call is None:
            self._call = self.clock.callLater(0, self._tick)

    def discard(self, connection: Runnable) -> None:
        """The connection is gone (or closing): forget it."""
        if id(connection) in self._queued:
            self._queued.discard(id(connection))
            try:
                self._queue.remove(connection)
            except ValueError:
                pass

    def _tick(self) -> None:
        self._call = None
        budget = self.budget
        seconds = self.clock.seconds
        until = seconds() + self.slice_seconds if self.slice_seconds > 0 else None
        for _ in range(len(self._queue)):
            if budget <= 0 or (until is not None and seconds() >= until):
                break
            connection = self._queue.popleft()
            self._queued.discard(id(connection))
            budget -= max(1, connection.run_turn())  # it enqueues itself again if work is left
        if self._queue and self._call is None:
            self._call = self.clock.callLater(0, self._tick)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._queue.clear()
        self._queued.clear()


class CommandRate:
    """
    A token bucket of C{rate} commands per second, in bursts of up to
    C{burst}, shared by every connection of a server: each connection keeps
    one number, the time its bucket is full again (C{full_at}, 0.0 at first),
    and passes it in (the generic cell rate algorithm's form of the bucket).
    """

    __slots__ = ("rate", "burst", "_interval", "_tolerance")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        #: the seconds one command's token takes to come back
        self._interval = 1.0 / rate
        #: how far ahead of now C{full_at} may be while a token is left
        self._tolerance = (burst - 1.0) / rate

    def wait(self, full_at: float, now: float) -> float:
        """0.0 when a command may go now, else the seconds until one may."""
        late = full_at - now - self._tolerance
        # (a nanosecond is on time: sums of 1/rate are not exact in binary)
        return late if late > 1e-9 else 0.0

    def consume(self, full_at: float, now: float) -> float:
        """One command at C{now}: the connection's new C{full_at}."""
        return (full_at if full_at > now else now) + self._interval

    def tokens(self, full_at: float, now: float) -> float:
        """The tokens left at C{now} (for tests and operators)."""
        return self.burst - max(0.0, full_at - now) * self.rate


def _malloc_trim() -> Callable[[], Any] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class MemoryTrimmer:
    """
    After C{every} closed connections, once the connections left are at most
    half as many as at their peak since the last trim, hand free heap pages
    back (once a second at most).  Steady churn (as many connections opening
    as closing) reuses its pages and is never trimmed: a full collection of
    the heap costs milliseconds.
    """

    def __init__(self, clock: IReactorTime, every: int = 64, delay: float = 1.0) -> None:
        self.clock = clock
        self.every = every
        self.delay = delay
        self._closed = 0
        #: the most connections open since the last trim
        self._peak = 0
        self._call: IDelayedCall | None = None
        self._trim = _malloc_trim()
        self.trims = 0

    def connection_closed(self, remaining: int = 0) -> None:
        """A connection closed; C{remaining} are still open."""
        if self._trim is None:
            return
        self._closed += 1
        if remaining >= self._peak:
            self._peak = remaining + 1
        if self._closed >= self.every and self._call is None and remaining * 2 <= self._peak:
            self._call = self.clock.callLater(self.delay, self._run)

    def _run(self) -> None:
        self._call = None
        self._closed = 0
        self._peak = 0
        if self._trim is not None:
            # A closed connection is a cycle (protocol, transport, state objects):
            # its buffers are freed by the collector, then the pages can go back.
            gc.collect()
            self._trim()
            self.trims += 1

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
