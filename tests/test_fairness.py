"""
Fairness and memory under floods (popservice.server.scheduler and the shell):
the fair queue's round robin and budget, the command rate, the heap trimmer,
one write per turn, and, over real sockets, a well-behaved client answered
while flooders still have thousands of commands waiting.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from popservice.server.scheduler import CommandRate, FairScheduler, MemoryTrimmer
from popservice.stores.memory import MemoryStore
from tests.support import RawClient, ServerMixin, make_factory, memory_checker


class Busy:
    def __init__(self, name: str, work: int, scheduler: FairScheduler, log: list[str],
                 per_turn: int = 8) -> None:
        self.name, self.work, self.scheduler, self.log, self.per_turn = name, work, scheduler, log, per_turn

    def run_turn(self) -> int:
        done = min(self.per_turn, self.work)
        self.work -= done
        self.log.append(self.name)
        if self.work:
            self.scheduler.enqueue(self)
        return done


class Turns:
    """A clock whose callLater(0) calls run one reactor turn at a time (L{step})."""

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def callLater(self, delay: float, f: Any, *args: Any) -> Any:
        call = task.Clock().callLater(delay, f, *args)  # a DelayedCall object for active()/cancel()
        self.pending.append(call)
        return call

    def seconds(self) -> float:
        return 0.0

    def step(self) -> None:
        due, self.pending = self.pending, []
        for call in due:
            if call.active():
                call.called = 1
                call.func(*call.args, **call.kw)


class SlowTurns(Turns):
    """L{Turns} whose time passes as the connections run."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def seconds(self) -> float:
        return self.now


class Costly(Busy):
    """A connection whose turn takes a millisecond of C{clock}."""

    def __init__(self, name: str, work: int, scheduler: FairScheduler, log: list[str],
                 clock: SlowTurns) -> None:
        super().__init__(name, work, scheduler, log)
        self.clock = clock

    def run_turn(self) -> int:
        self.clock.now += 0.001
        return super().run_turn()


class Scheduler(unittest.TestCase):
    def test_round_robin_within_a_budget_per_turn(self) -> None:
        clock = Turns()
        scheduler = FairScheduler(clock, budget=16)  # type: ignore[arg-type]
        log: list[str] = []
        a, b, c = (Busy(n, 24, scheduler, log) for n in "abc")
        for x in (a, b, c):
            scheduler.enqueue(x)
        scheduler.enqueue(a)  # already queued: once only
        clock.step()
        self.assertEqual(log, ["a", "b"])  # 16 commands a turn: two turns of 8
        clock.step()
        self.assertEqual(log, ["a", "b", "c", "a"])
        while clock.pending:
            clock.step()
        self.assertEqual(log, ["a", "b", "c", "a", "b", "c", "a", "b", "c"])
        self.assertEqual(len(scheduler), 0)

    def test_time_slice_per_turn(self) -> None:
        # Each connection's turn takes 1 ms; the slice is 2.5 ms: three turns per
        # reactor turn, whatever is left of the command budget.
        clock = SlowTurns()
        scheduler = FairScheduler(clock, budget=1000, slice_seconds=0.0025)  # type: ignore[arg-type]
        log: list[str] = []
        a, b, c, d = (Costly(n, 16, scheduler, log, clock) for n in "abcd")
        for x in (a, b, c, d):
            scheduler.enqueue(x)
        clock.step()
        self.assertEqual(log, ["a", "b", "c"])
        clock.step()
        self.assertEqual(log, ["a", "b", "c", "d", "a", "b"])
        # Without a slice the budget alone counts: all four in one turn.
        clock = SlowTurns()
        unsliced = FairScheduler(clock, budget=1000)  # type: ignore[arg-type]
        log.clear()
        for n in "abcd":
            unsliced.enqueue(Costly(n, 16, unsliced, log, clock))
        clock.step()
        self.assertEqual(log, ["a", "b", "c", "d"])

    def test_discard(self) -> None:
        clock = task.Clock()
        scheduler = FairScheduler(clock)
        log: list[str] = []
        a, b = Busy("a", 8, scheduler, log), Busy("b", 8, scheduler, log)
        scheduler.enqueue(a)
        scheduler.enqueue(b)
        scheduler.discard(a)
        clock.advance(0)
        self.assertEqual(log, ["b"])


class Rate(unittest.TestCase):
    def test_token_bucket(self) -> None:
        rate = CommandRate(10.0, 3.0)
        full = 0.0  # a new connection's bucket is full
        self.assertEqual(rate.tokens(full, 100.0), 3.0)
        for _ in range(3):
            self.assertEqual(rate.wait(full, 100.0), 0.0)
            full = rate.consume(full, 100.0)
        self.assertAlmostEqual(rate.tokens(full, 100.0), 0.0)
        self.assertAlmostEqual(rate.wait(full, 100.0), 0.1)
        self.assertEqual(rate.wait(full, 100.15), 0.0)
        full = rate.consume(full, 100.15)
        self.assertGreater(rate.wait(full, 100.15), 0.0)
        self.assertEqual(rate.wait(full, 200.0), 0.0)
        self.assertEqual(rate.tokens(full, 200.0), 3.0)  # refilled, capped at the burst


class RateOverSockets(ServerMixin, unittest.TestCase):
    """The command rate, through a connection: a pipelined batch beyond the burst waits for tokens."""

    @defer.inlineCallbacks
    def test_batch_beyond_the_burst_is_paced(self) -> Any:
        clock = task.Clock()
        clock.advance(1000.0)
        store = MemoryStore({"alice": [b"Subject: x\n\nbody\n"]})
        factory = make_factory(store, [memory_checker(alice="secret")], clock=clock,
                               commands_per_second=10.0, command_burst=5.0)
        self.listen(factory)
        client = yield self.login()  # USER and PASS: 3 of the 5 tokens left
        client.send(b"NOOP\r\n" * 6)
        for _ in range(3):
            self.assertEqual((yield client.line()), b"+OK")
        late = client.line()
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(late.called)  # no token until the clock moves on
        for _ in range(3):
            clock.advance(0.11)  # a token back (and a little: the timer is not exact in binary)
            self.assertEqual((yield late), b"+OK")
            late = client.line()
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(late.called)  # all six answered, nothing more
        late.addErrback(lambda _: None)  # (fails when the connection is dropped at clean-up)
        (server,) = list(factory.connections)
        self.assertIs(server._rate, factory.command_rate())  # one bucket object for the server


class Trimmer(unittest.TestCase):
    def test_trims_after_many_closes(self) -> None:
        clock = task.Clock()
        trimmer = MemoryTrimmer(clock, every=3, delay=1.0)
        if trimmer._trim is None:
            raise unittest.SkipTest("no glibc malloc_trim here")
        for _ in range(5):
            trimmer.connection_closed()
        clock.advance(1.0)
        self.assertEqual(trimmer.trims, 1)
        self.assertEqual(clock.getDelayedCalls(), [])


class CountingTransportClient(RawClient):
    pass


class Floods(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_one_write_per_pipelined_batch(self) -> Any:
        store = MemoryStore({"alice": [b"Subject: x\n\nbody\n"]})
        factory = make_factory(store, [memory_checker(alice="secret")])
        self.listen(factory)
        client = yield self.login()
        (server,) = list(factory.connections)
        writes: list[bytes] = []
        real = server.transport.write
        self.patch(server.transport, "write", lambda data: (writes.append(data), real(data)))
        client.send(b"NOOP\r\n" * 8)
        for _ in range(8):
            self.assertEqual((yield client.line()), b"+OK")
        self.assertEqual(writes, [b"+OK\r\n" * 8])

    @defer.inlineCallbacks
    def test_well_behaved_client_answered_while_flooders_wait(self) -> Any:
        users = {"u%d" % i: [b"Subject: x\n\nbody\n"] for i in range(20)}
        users["good"] = [b"Subject: g\n\nbody\n"]
        factory = make_factory(MemoryStore(users),
                               [memory_checker(**{u: "pw" for u in users})], turn_budget=64)
        self.listen(factory)
        flooders = []
        for i in range(20):
            client = yield self.login("u%d" % i, "pw")
            flooders.append(client)
        good = yield self.login("good", "pw")
        for client in flooders:
            client.send(b"NOOP\r\n" * 5000)  # 100,000 commands in all
        yield task.deferLater(reactor, 0.05, lambda: None)
        r = yield good.command(b"STAT")
        self.assertTrue(r.startswith(b"+OK 1 "), r)
        # The answer did not wait for the flood: the flooders' answers are far from all out.
        answered = sum(client.buffer.count(b"+OK\r\n") for client in flooders)
        self.assertLess(answered, 50000)
        for client in flooders:
            client.transport.abortConnection()
