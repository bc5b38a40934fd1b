"""
What a connection costs while it waits (popservice.server.wheel,
popservice.server.timeouts, the shell's slots, the event seam): one timer
for all connections instead of a DelayedCall each, deadlines kept (never
early, at most a second late), no per-connection dict, and no event built
that nobody listens for.  Over real sockets, with a task.Clock for time.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from popservice.server.events import LogObserver, Observers
from popservice.server.scheduler import MemoryTrimmer
from popservice.server.wheel import TimerWheel
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, memory_checker

MSGS = [b"Subject: one\r\n\r\nbody one\r\n", b"Subject: two\r\n\r\nbody two\r\n"]


class Owner:
    def __init__(self, wheel: TimerWheel, clock: task.Clock) -> None:
        self.wheel, self.clock = wheel, clock
        self.woken: list[float] = []

    def deadline_reached(self, now: float) -> None:
        self.woken.append(now)


class Wheel(unittest.TestCase):
    def test_never_early_at_most_a_slot_late(self) -> None:
        clock = task.Clock()
        wheel = TimerWheel(clock, resolution=1.0)
        late, early = Owner(wheel, clock), Owner(wheel, clock)
        wheel.schedule(late, 10.2)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        wheel.schedule(early, 3.0)  # earlier than the armed slot: re-armed, still one call
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(2.9)
        self.assertEqual(early.woken, [])
        clock.advance(0.1)
        self.assertEqual(early.woken, [3.0])
        clock.advance(7.1)  # 10.1: not yet
        self.assertEqual(late.woken, [])
        clock.advance(0.9)
        self.assertEqual(late.woken, [11.0])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(len(wheel), 0)

    def test_cancel_leaves_no_call(self) -> None:
        clock = task.Clock()
        wheel = TimerWheel(clock)
        a, b = Owner(wheel, clock), Owner(wheel, clock)
        slot_a = wheel.schedule(a, 5.0)
        slot_b = wheel.schedule(b, 50.0)
        wheel.cancel(a, slot_a)
        clock.advance(10)
        self.assertEqual(a.woken, [])
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # for b
        wheel.cancel(b, slot_b)
        self.assertEqual(clock.getDelayedCalls(), [])


class Connections(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_one_timer_for_all_connections(self) -> Any:
        clock = task.Clock()
        store = MemoryStore({"alice": list(MSGS), "bob": list(MSGS)})
        self.listen(make_factory(store, [memory_checker(alice="secret", bob="pw")], clock=clock,
                                 timeout=30, login_timeout=20))
        alice = yield self.login()
        bob = yield self.login("bob", "pw")
        waiting = yield self.connect()
        # Three connections, each with deadlines (login, idle): one DelayedCall in all.
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        yield alice.command(b"NOOP")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(20)
        yield waiting.lost  # the login deadline passed
        self.assertIn(b"-ERR [AUTH]", waiting.buffer)
        self.assertFalse(alice.closed or bob.closed)
        clock.advance(300)
        yield bob.command(b"NOOP")  # activity moves bob's idle deadline
        clock.advance(300)  # 620 s: alice idle for 600 s since her NOOP, bob for 300 s
        yield alice.lost
        self.assertIn(b"-ERR [SYS/TEMP]", alice.buffer)
        self.assertFalse(bob.closed)
        clock.advance(300)
        yield bob.lost
        self.assertEqual(store.messages["alice"], MSGS)

    @defer.inlineCallbacks
    def test_logged_in_connection_keeps_no_dict(self) -> Any:
        store = MemoryStore({"alice": list(MSGS)})
        self.listen(make_factory(store, [memory_checker(alice="secret")]))
        client = yield self.login()
        yield client.command(b"STAT")
        (server,) = self.factory.connections
        # Everything it holds is in its slots: no per-instance dict was made.
        self.assertEqual(server.__dict__, {})
        session = server.session
        assert session is not None
        self.assertFalse(hasattr(session, "__dict__"))
        yield client.command(b"QUIT")
        yield client.lost

    @defer.inlineCallbacks
    def test_events_nobody_wants_are_not_sent(self) -> Any:
        received: list[str] = []

        class Wanting:
            events = frozenset({"login", "logout"})

            def event(self, name: str, session: object, **fields: Any) -> None:
                received.append(name)

        store = MemoryStore({"alice": list(MSGS)})
        factory = make_factory(store, [memory_checker(alice="secret")])
        factory.observer = Observers([LogObserver(), Wanting()])
        self.listen(factory)
        client = yield self.login()
        yield client.command(b"STAT")
        yield client.command(b"QUIT")
        yield client.lost
        self.assertEqual(received, ["login", "logout"])
        for name in ("connect", "login", "logout"):
            self.assertIn(name, factory.observer.events)
        self.assertNotIn("command", factory.observer.events)

    def test_an_observer_without_a_list_gets_everything(self) -> None:
        class All:
            def event(self, name: str, session: object, **fields: Any) -> None:
                pass

        self.assertIsNone(Observers([LogObserver(), All()]).events)


class Trimmer(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.trimmer = MemoryTrimmer(self.clock, every=3, delay=1.0)
        if self.trimmer._trim is None:
            raise unittest.SkipTest("no glibc malloc_trim here")

    def test_steady_churn_is_not_trimmed(self) -> None:
        # As many connections open as close: their pages are reused, a collection would be wasted.
        for _ in range(100):
            self.trimmer.connection_closed(49)
        self.clock.advance(1.0)
        self.assertEqual(self.trimmer.trims, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trimmed_once_most_have_left(self) -> None:
        for remaining in range(99, 60, -1):
            self.trimmer.connection_closed(remaining)
        self.clock.advance(1.0)
        self.assertEqual(self.trimmer.trims, 0)
        for remaining in range(60, 40, -1):
            self.trimmer.connection_closed(remaining)
        self.clock.advance(1.0)
        self.assertEqual(self.trimmer.trims, 1)
