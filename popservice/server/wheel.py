"""
The deadlines of every connection of a server in one coarse timer wheel.

A connection has up to four deadlines (TLS handshake, login, idle, closing
grace), each of them minutes long and moved by nearly every command.  One
C{DelayedCall} each would cost a few hundred bytes per idle connection and a
reactor heap operation per connection and timer; here a connection is filed
once, under the slot (of C{resolution} seconds) of its earliest deadline, and
one C{DelayedCall} for the whole server wakes at the earliest occupied slot.
The owner then checks what is due and files itself again for the next one.
Deadlines are met at most C{resolution} seconds late, never early.
"""

from __future__ import annotations

import heapq
import math
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class TimerOwner(Protocol):
    def deadline_reached(self, now: float) -> None:
        """Its slot came: act on what is due and L{TimerWheel.schedule} again for the rest."""
        ...


class TimerWheel:
    """Slots of C{resolution} seconds, each a set of owners; one C{DelayedCall} for the earliest."""

    def __init__(self, clock: IReactorTime, resolution: float = 1.0) -> None:
        self.clock = clock
        self.resolution = resolution
        self._slots: dict[int, set[TimerOwner]] = {}
        #: occupied slot numbers (some may be empty since: skipped when popped)
        self._heap: list[int] = []
        self._call: IDelayedCall | None = None
        self._call_slot = 0

    def __len__(self) -> int:
        """How many owners are filed."""
        return sum(map(len, self._slots.values()))

    def slot(self, when: float) -> int:
        """The slot a deadline at C{when} is filed under."""
        return math.ceil(when / self.resolution)

    def schedule(self, owner: TimerOwner, when: float) -> int:
        """File C{owner} to be woken at C{when} (or up to C{resolution} later): its slot, for L{cancel}."""
        slot = math.ceil(when / self.resolution)
        owners = self._slots.get(slot)
        if owners is None:
            owners = self._slots[slot] = set()
            heapq.heappush(self._heap, slot)
        owners.add(owner)
        if self._call is None or slot < self._call_slot:
            self._arm(slot)
        return slot

    def cancel(self, owner: TimerOwner, slot: int) -> None:
        """Take C{owner} out of C{slot} (where L{schedule} filed it)."""
        owners = self._slots.get(slot)
        if owners is None:
            return
        owners.discard(owner)
        if not owners:
            del self._slots[slot]
            if not self._slots:
                # Nothing is filed: no call may be left pending (trial's clean reactor, shutdown).
                self.stop()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if not self._slots:
            self._heap.clear()

    def _arm(self, slot: int) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call_slot = slot
        self._call = self.clock.callLater(max(0.0, slot * self.resolution - self.clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._call = None
        now = self.clock.seconds()
        heap = self._heap
        while heap and heap[0] * self.resolution <= now:
            owners = self._slots.pop(heapq.heappop(heap), None)
            if owners is not None:
                for owner in owners:
                    owner.deadline_reached(now)
        self._rearm()

    def _rearm(self) -> None:
        """Skip slots emptied by L{cancel}; be armed for the earliest occupied one."""
        heap = self._heap
        while heap and heap[0] not in self._slots:
            heapq.heappop(heap)
        if heap and (self._call is None or self._call_slot != heap[0]):
            self._arm(heap[0])
