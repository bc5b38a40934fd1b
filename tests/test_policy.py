"""Connection caps, failure penalties, handshake deadline, LOGIN-DELAY and EXPIRE, over loopback."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from popservice.server.policy import PeerTracker, Policy
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, memory_checker

MSGS = [b"Subject: 1\n\none\n", b"Subject: 2\n\ntwo\n"]


def pause(seconds: float = 0.05) -> "defer.Deferred[None]":
    return task.deferLater(reactor, seconds, lambda: None)


class PolicyTestCase(ServerMixin, unittest.TestCase):
    def start(self, **kw: Any) -> None:
        self.clock = task.Clock()
        self.store = MemoryStore({"alice": list(MSGS)})
        policy = Policy(**{"failure_delay": 0, **kw})
        self.listen(make_factory(self.store, [memory_checker(alice="secret")], clock=self.clock,
                                 policy=policy))


class ConnectionCaps(PolicyTestCase):
    @defer.inlineCallbacks
    def test_per_ip_cap(self) -> Any:
        self.start(max_connections_per_ip=2, trust_loopback=False)
        yield self.connect()
        yield self.connect()
        third = yield self.connect(greet=False)
        yield third.lost
        self.assertTrue(third.buffer.startswith(b"-ERR [SYS/TEMP]"), third.buffer)
        self.assertEqual(self.factory.peers.total, 2)

    @defer.inlineCallbacks
    def test_trusted_address_not_capped_per_ip_but_total(self) -> Any:
        self.start(max_connections_per_ip=1, max_connections=3)
        for _ in range(3):
            yield self.connect()
        fourth = yield self.connect(greet=False)
        yield fourth.lost
        self.assertIn(b"[SYS/TEMP] Too many connections", fourth.buffer)

    @defer.inlineCallbacks
    def test_slot_freed_on_close(self) -> Any:
        self.start(max_connections_per_ip=1, trust_loopback=False, allow_plaintext_auth=True)
        first = yield self.connect()
        first.transport.loseConnection()
        yield first.lost
        for _ in range(50):
            if not self.factory.peers.total:
                break
            yield pause(0.01)
        client = yield self.connect()
        self.assertTrue(client.greeting.startswith(b"+OK"))


class FailurePenalty(PolicyTestCase):
    @defer.inlineCallbacks
    def test_ip_penalty_carries_across_connections(self) -> Any:
        self.start(failure_delay=1.0)
        a = yield self.connect()
        yield a.command(b"USER alice")
        a.send(b"PASS bad\r\n")
        answer = a.line()
        yield pause()
        self.clock.advance(1.0)
        yield answer
        b = yield self.connect()
        yield b.command(b"USER alice")
        b.send(b"PASS bad\r\n")
        answer = b.line()
        yield pause()
        self.clock.advance(1.0)
        yield pause()
        self.assertFalse(answer.called)  # the address's second failure waits 2 s
        self.clock.advance(1.0)
        self.assertTrue((yield answer).startswith(b"-ERR [AUTH]"))
        # The right password is answered at once despite the address's record.
        yield b.command(b"USER alice")
        self.assertTrue((yield b.command(b"PASS secret")).startswith(b"+OK"))

    def test_tracker_forgets_and_is_bounded(self) -> None:
        tracker = PeerTracker(window=10, max_addresses=3)
        self.assertEqual(tracker.failed("a", 0), 1)
        self.assertEqual(tracker.failed("a", 5), 2)
        self.assertEqual(tracker.failures("a", 16), 0)
        for i, host in enumerate("bcde"):
            tracker.failed(host, 20 + i)
        self.assertEqual(len(tracker._failures), 3)
        self.assertEqual(tracker.failures("b", 24), 0)  # evicted, oldest first


class HandshakeDeadline(PolicyTestCase):
    @defer.inlineCallbacks
    def test_stls_then_silence_is_closed(self) -> Any:
        import os

        from popservice.tap import load_tls_options
        from popservice.tlsutil import make_self_signed

        cert, key = make_self_signed(os.path.abspath(self.mktemp()))
        self.clock = task.Clock()
        self.listen(make_factory(MemoryStore({}), [memory_checker()], clock=self.clock,
                                 tls_context=load_tls_options(cert, key),
                                 policy=Policy(failure_delay=0, handshake_timeout=5)))
        client = yield self.connect()
        self.assertTrue((yield client.command(b"STLS")).startswith(b"+OK"))
        self.clock.advance(4)
        yield pause()
        self.assertFalse(client.closed)
        self.clock.advance(2)
        yield client.lost


class LoginDelayAndExpire(PolicyTestCase):
    @defer.inlineCallbacks
    def test_login_delay_enforced(self) -> Any:
        self.start(login_delay=60)
        client = yield self.connect()
        first, body = yield client.command_multi(b"CAPA")
        self.assertIn(b"LOGIN-DELAY 60\r\n", body)
        yield client.command(b"USER alice")
        self.assertTrue((yield client.command(b"PASS secret")).startswith(b"+OK"))
        yield client.command(b"QUIT")
        again = yield self.connect()
        yield again.command(b"USER alice")
        r = yield again.command(b"PASS secret")
        self.assertTrue(r.startswith(b"-ERR [LOGIN-DELAY]"), r)
        self.clock.advance(61)
        later = yield self.connect()
        yield later.command(b"USER alice")
        self.assertTrue((yield later.command(b"PASS secret")).startswith(b"+OK"))

    @defer.inlineCallbacks
    def test_logins_remembered_only_with_a_delay(self) -> Any:
        self.start()
        client = yield self.login()
        self.assertTrue((yield client.command(b"STAT")).startswith(b"+OK"))
        self.assertEqual(self.factory.last_login, {})  # no entry per user who ever logged in
        yield client.command(b"QUIT")
        config = self.factory.config
        self.factory.config = replace(config, policy=replace(config.policy, login_delay=60))
        again = yield self.login()
        self.assertTrue((yield again.command(b"STAT")).startswith(b"+OK"))
        self.assertEqual(list(self.factory.last_login), ["alice"])

    @defer.inlineCallbacks
    def test_expire_zero_deletes_retrieved_at_quit(self) -> Any:
        self.start(expire=0)
        client = yield self.login()
        first, body = yield client.command_multi(b"CAPA")
        self.assertIn(b"EXPIRE 0\r\n", body)
        yield client.command_multi(b"RETR 2")
        yield client.command_multi(b"TOP 1 0")  # TOP is not retrieval
        yield client.command(b"QUIT")
        self.assertEqual(self.store.messages["alice"], [MSGS[0]])

    @defer.inlineCallbacks
    def test_expire_never_by_default(self) -> Any:
        self.start()
        client = yield self.login()
        yield client.command_multi(b"RETR 1")
        first, body = yield client.command_multi(b"CAPA")
        self.assertIn(b"EXPIRE NEVER\r\n", body)
        yield client.command(b"QUIT")
        self.assertEqual(self.store.messages["alice"], MSGS)


class SessionsPerUser(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_cap_without_exclusive_lock(self) -> Any:
        class SharedStore(MemoryStore):
            """Like --lock none: no store lock."""

            def open_mailbox(self, user: str, home: Any) -> Any:
                self.locked.discard(user)
                return super().open_mailbox(user, home)

        self.listen(make_factory(SharedStore({"alice": list(MSGS)}), [memory_checker(alice="secret")],
                                 exclusive=False, max_sessions=2))
        first = yield self.login()
        second = yield self.login()
        third = yield self.connect()
        yield third.command(b"USER alice")
        r = yield third.command(b"PASS secret")
        self.assertTrue(r.startswith(b"-ERR [IN-USE]"), r)
        yield first.command(b"QUIT")
        yield first.lost
        yield third.command(b"USER alice")
        self.assertTrue((yield third.command(b"PASS secret")).startswith(b"+OK"))
        self.assertTrue((yield second.command(b"NOOP")).startswith(b"+OK"))
