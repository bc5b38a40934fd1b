"""The server protocol, driven over real loopback sockets."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from popservice import wire
from popservice.server.policy import Policy
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, memory_checker

MSGS = [
    b"Subject: one\n\nbody one\n.dot line\n",
    b"Subject: two\r\n\r\nline1\r\nline2\r\nline3\r\n",
    b"Subject: three\n\nno trailing newline",
]


def unstuff(body: bytes) -> bytes:
    d = wire.BodyDecoder()
    out = d.feed(body + b".\r\n")
    assert d.done
    return out


def crlf(data: bytes) -> bytes:
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


class ServerTestCase(ServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.store = MemoryStore({"alice": list(MSGS), "bob": []}, chunk=7)
        self.listen(make_factory(self.store, [memory_checker(alice="secret", bob="bobpw")]))


class GreetingAndCapa(ServerTestCase):
    @defer.inlineCallbacks
    def test_greeting_has_strict_apop_timestamp(self) -> Any:
        client = yield self.connect()
        self.assertTrue(client.greeting.startswith(b"+OK "))
        m = re.search(rb"<([^>]*)>", client.greeting)
        self.assertIsNotNone(m)
        self.assertRegex(m.group(1), rb"^[A-Za-z0-9.@_+/-]+$")
        other = yield self.connect()
        self.assertNotEqual(re.search(rb"<[^>]*>", other.greeting).group(0), m.group(0))

    @defer.inlineCallbacks
    def test_capa_before_and_after_login(self) -> Any:
        client = yield self.connect()
        first, body = yield client.command_multi(b"CAPA")
        self.assertTrue(first.startswith(b"+OK"))
        caps = body.split(b"\r\n")
        for cap in (b"TOP", b"UIDL", b"USER", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"):
            self.assertIn(cap, caps)
        self.assertNotIn(b"STLS", caps)  # no certificate configured
        self.assertTrue(any(c.startswith(b"IMPLEMENTATION ") for c in caps))
        yield client.command(b"USER alice")
        yield client.command(b"PASS secret")
        first, body = yield client.command_multi(b"capa")
        self.assertNotIn(b"USER", body.split(b"\r\n"))
        self.assertIn(b"UIDL", body.split(b"\r\n"))


class Login(ServerTestCase):
    @defer.inlineCallbacks
    def test_user_pass(self) -> Any:
        client = yield self.connect()
        self.assertTrue((yield client.command(b"USER alice")).startswith(b"+OK"))
        r = yield client.command(b"PASS secret")
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_wrong_password_is_auth_error_and_session_survives(self) -> Any:
        client = yield self.connect()
        yield client.command(b"USER alice")
        r = yield client.command(b"PASS wrong")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        self.assertNotIn(b"wrong", r)
        yield client.command(b"USER alice")
        r = yield client.command(b"PASS secret")
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_unknown_user_same_answer(self) -> Any:
        client = yield self.connect()
        r1 = yield client.command(b"USER nobody")
        self.assertTrue(r1.startswith(b"+OK"))
        r = yield client.command(b"PASS x")
        self.assertEqual(r, b"-ERR [AUTH] Authentication failed")

    @defer.inlineCallbacks
    def test_pass_without_user(self) -> Any:
        client = yield self.connect()
        r = yield client.command(b"PASS secret")
        self.assertTrue(r.startswith(b"-ERR"))

    @defer.inlineCallbacks
    def test_password_with_spaces(self) -> Any:
        self.store.messages["carol"] = []
        self.factory.portal.checkers[next(iter(self.factory.portal.checkers))].addUser(b"carol", b"a b  c")
        client = yield self.connect()
        yield client.command(b"USER carol")
        r = yield client.command(b"PASS a b  c")
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_apop(self) -> Any:
        client = yield self.connect()
        ts = re.search(rb"<[^>]*>", client.greeting).group(0)
        digest = hashlib.md5(ts + b"secret").hexdigest().encode()
        r = yield client.command(b"APOP alice " + digest)
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_apop_wrong_digest(self) -> Any:
        client = yield self.connect()
        r = yield client.command(b"APOP alice " + b"0" * 32)
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        r = yield client.command(b"APOP alice nothex")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)

    @defer.inlineCallbacks
    def test_login_commands_refused_once_logged_in(self) -> Any:
        client = yield self.login()
        for cmd in (b"USER alice", b"PASS secret", b"APOP alice 0123", b"AUTH PLAIN", b"STLS"):
            r = yield client.command(cmd)
            self.assertTrue(r.startswith(b"-ERR"), (cmd, r))
        r = yield client.command(b"STAT")
        self.assertTrue(r.startswith(b"+OK 3 "))

    @defer.inlineCallbacks
    def test_transaction_commands_refused_before_login(self) -> Any:
        client = yield self.connect()
        for cmd in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 0", b"UIDL"):
            r = yield client.command(cmd)
            self.assertTrue(r.startswith(b"-ERR"), (cmd, r))

    @defer.inlineCallbacks
    def test_second_login_in_use(self) -> Any:
        yield self.login()
        client = yield self.connect()
        yield client.command(b"USER alice")
        r = yield client.command(b"PASS secret")
        self.assertTrue(r.startswith(b"-ERR [IN-USE]"), r)

    @defer.inlineCallbacks
    def test_too_many_failures_close(self) -> Any:
        client = yield self.connect()
        for _ in range(5):
            yield client.command(b"USER alice")
            r = yield client.command(b"PASS bad")
            self.assertTrue(r.startswith(b"-ERR [AUTH]"))
        yield client.lost
        self.assertTrue(client.closed)


class Transaction(ServerTestCase):
    @defer.inlineCallbacks
    def test_stat_list_uidl(self) -> Any:
        client = yield self.login()
        sizes = [wire.transmitted_size([m]) for m in MSGS]
        r = yield client.command(b"STAT")
        self.assertEqual(r, b"+OK 3 %d" % sum(sizes))
        first, body = yield client.command_multi(b"LIST")
        self.assertEqual(body, b"".join(b"%d %d\r\n" % (i + 1, s) for i, s in enumerate(sizes)))
        r = yield client.command(b"LIST 2")
        self.assertEqual(r, b"+OK 2 %d" % sizes[1])
        first, body = yield client.command_multi(b"UIDL")
        uids = [line.split(b" ")[1] for line in body.split(b"\r\n") if line]
        self.assertEqual(len(set(uids)), 3)
        r = yield client.command(b"UIDL 3")
        self.assertEqual(r, b"+OK 3 " + uids[2])

    @defer.inlineCallbacks
    def test_retr_is_exact_and_size_matches(self) -> Any:
        client = yield self.login()
        for n, message in enumerate(MSGS, 1):
            first, body = yield client.command_multi(b"RETR %d" % n)
            self.assertEqual(first, b"+OK %d octets" % wire.transmitted_size([message]))
            self.assertEqual(unstuff(body), crlf(message))
        self.assertIn(b"\r\n..dot line\r\n", (yield client.command_multi(b"RETR 1"))[1])

    @defer.inlineCallbacks
    def test_top(self) -> Any:
        client = yield self.login()
        first, body = yield client.command_multi(b"TOP 2 0")
        self.assertEqual(body, b"Subject: two\r\n\r\n")
        first, body = yield client.command_multi(b"TOP 2 2")
        self.assertEqual(body, b"Subject: two\r\n\r\nline1\r\nline2\r\n")
        first, body = yield client.command_multi(b"TOP 3 10")
        self.assertEqual(body, crlf(MSGS[2]))

    @defer.inlineCallbacks
    def test_bad_message_numbers(self) -> Any:
        client = yield self.login()
        for cmd in (b"RETR", b"RETR 0", b"RETR -1", b"RETR 4", b"RETR 1x", b"RETR 1 2",
                    b"RETR 99999999999999999999", b"DELE 0", b"LIST 0", b"TOP 1", b"TOP 1 -1",
                    b"RETR +1", b"RETR  1", b"UIDL a", b"RETR 1 "):
            r = yield client.command(cmd)
            self.assertTrue(r.startswith(b"-ERR"), (cmd, r))
        r = yield client.command(b"STAT")
        self.assertTrue(r.startswith(b"+OK 3 "))

    @defer.inlineCallbacks
    def test_dele_marks_and_hides(self) -> Any:
        client = yield self.login()
        r = yield client.command(b"DELE 2")
        self.assertTrue(r.startswith(b"+OK"))
        for cmd in (b"DELE 2", b"RETR 2", b"LIST 2", b"UIDL 2", b"TOP 2 0"):
            r = yield client.command(cmd)
            self.assertTrue(r.startswith(b"-ERR"), (cmd, r))
        first, body = yield client.command_multi(b"LIST")
        self.assertNotIn(b"\n2 ", b"\n" + body)
        r = yield client.command(b"STAT")
        self.assertTrue(r.startswith(b"+OK 2 "))
        self.assertEqual(len(self.store.messages["alice"]), 3)  # nothing deleted yet
        r = yield client.command(b"RSET")
        self.assertTrue(r.startswith(b"+OK 3 "))
        yield client.command(b"DELE 1")
        r = yield client.command(b"QUIT")
        self.assertTrue(r.startswith(b"+OK"), r)
        yield client.lost
        self.assertEqual(self.store.messages["alice"], MSGS[1:])

    @defer.inlineCallbacks
    def test_drop_without_quit_deletes_nothing(self) -> Any:
        client = yield self.login()
        yield client.command(b"DELE 1")
        yield client.command(b"DELE 2")
        client.transport.abortConnection()
        yield client.lost
        yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.store.messages["alice"], MSGS)
        again = yield self.login()  # lock released
        r = yield again.command(b"STAT")
        self.assertTrue(r.startswith(b"+OK 3 "))

    @defer.inlineCallbacks
    def test_failed_deletion_reports_sys_temp(self) -> Any:
        self.store.undeletable.add(0)
        client = yield self.login()
        yield client.command(b"DELE 1")
        yield client.command(b"DELE 2")
        r = yield client.command(b"QUIT")
        self.assertTrue(r.startswith(b"-ERR [SYS/TEMP]"), r)
        self.assertEqual(self.store.messages["alice"], [MSGS[0], MSGS[2]])

    @defer.inlineCallbacks
    def test_numbering_frozen_at_login(self) -> Any:
        client = yield self.login()
        self.store.messages["alice"].append(b"Subject: late\n\nlate\n")
        r = yield client.command(b"STAT")
        self.assertTrue(r.startswith(b"+OK 3 "))
        r = yield client.command(b"RETR 4")
        self.assertTrue(r.startswith(b"-ERR"))

    @defer.inlineCallbacks
    def test_message_gone_underneath(self) -> Any:
        client = yield self.login()
        self.store.messages["alice"].remove(MSGS[0])
        r = yield client.command(b"RETR 1")
        self.assertTrue(r.startswith(b"-ERR [SYS/TEMP]"), r)
        r = yield client.command(b"NOOP")
        self.assertEqual(r, b"+OK")

    @defer.inlineCallbacks
    def test_empty_mailbox(self) -> Any:
        client = yield self.login("bob", "bobpw")
        self.assertEqual((yield client.command(b"STAT")), b"+OK 0 0")
        first, body = yield client.command_multi(b"LIST")
        self.assertEqual(body, b"")
        first, body = yield client.command_multi(b"UIDL")
        self.assertEqual(body, b"")


class BadInput(ServerTestCase):
    @defer.inlineCallbacks
    def test_unknown_and_garbage(self) -> Any:
        client = yield self.connect()
        for line in (b"FOO", b"XYZZY 1", b"\x00\x01", b"\xff\xfe", b"", b"U", b"USER\x00x"):
            r = yield client.command(line)
            self.assertTrue(r.startswith(b"-ERR"), (line, r))
            self.assertNotIn(b"XYZZY", r)
            self.assertNotIn(b"\xff", r)
        yield client.command(b"USER alice")
        self.assertTrue((yield client.command(b"PASS secret")).startswith(b"+OK"))

    @defer.inlineCallbacks
    def test_long_line(self) -> Any:
        client = yield self.connect()
        r = yield client.command(b"USER " + b"a" * 10240)
        self.assertEqual(r, b"-ERR Command line too long")
        r = yield client.command(b"NOOP")
        self.assertTrue(r.startswith(b"-ERR"))  # NOOP is illegal before login; session alive
        yield client.command(b"USER alice")
        self.assertTrue((yield client.command(b"PASS secret")).startswith(b"+OK"))

    @defer.inlineCallbacks
    def test_bare_lf(self) -> Any:
        client = yield self.connect()
        client.send(b"USER alice\nPASS secret\nSTAT\n")
        r1, r2, r3 = yield defer.gatherResults([client.line(), client.line(), client.line()])
        self.assertTrue(r3.startswith(b"+OK 3 "), (r1, r2, r3))

    @defer.inlineCallbacks
    def test_bad_user_names(self) -> Any:
        for name in (b"../x", b"a/b", b"x" * 200):
            client = yield self.connect()
            yield client.command(b"USER " + name)
            r = yield client.command(b"PASS secret")
            self.assertTrue(r.startswith(b"-ERR"), r)

    @defer.inlineCallbacks
    def test_too_many_bad_commands_closes(self) -> Any:
        client = yield self.connect()
        client.send(b"BAD\r\n" * 20)
        yield client.lost
        self.assertIn(b"Too many invalid commands", client.buffer)


class Pipelining(ServerTestCase):
    @defer.inlineCallbacks
    def test_pipelined_answers_in_order(self) -> Any:
        client = yield self.connect()
        client.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST\r\nRETR 2\r\nDELE 1\r\nSTAT\r\nQUIT\r\n")
        yield client.lost
        data = client.buffer
        self.assertEqual(data.count(b"+OK"), 8, data)
        self.assertIn(b"+OK 3 ", data)
        self.assertIn(b"line3\r\n.\r\n", data)
        self.assertLess(data.index(b"+OK 3 "), data.index(b"line1"))

    @defer.inlineCallbacks
    def test_flood_never_read_memory_bounded(self) -> Any:
        """A client pipelining 10,000 RETRs and never reading: the server stops reading."""
        self.store.messages["alice"] = [b"x" * 100000]
        client = yield self.login()
        client.transport.pauseProducing()  # never read
        client.send(b"RETR 1\r\n" * 10000)
        yield task.deferLater(reactor, 0.5, lambda: None)
        (server,) = list(self.factory.connections)
        self.assertTrue(server._paused)
        self.assertLess(server.reader.buffered, 70000)
        transport_buffer = len(server.transport.dataBuffer) + sum(map(len, server.transport._tempDataBuffer))
        self.assertLess(transport_buffer, 300000)
        # A well-behaved client is served meanwhile.
        other = yield self.login("bob", "bobpw")
        self.assertEqual((yield other.command(b"STAT")), b"+OK 0 0")


class Timeouts(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_idle_timeout_closes_without_update(self) -> Any:
        clock = task.Clock()
        store = MemoryStore({"alice": list(MSGS)})
        self.listen(make_factory(store, [memory_checker(alice="secret")], clock=clock, timeout=30))
        client = yield self.login()
        yield client.command(b"DELE 1")
        clock.advance(31)  # not yet: logged in sessions get at least 600 s
        self.assertFalse(client.closed)
        clock.advance(600)
        yield client.lost
        self.assertIn(b"-ERR [SYS/TEMP]", client.buffer)
        self.assertEqual(store.messages["alice"], MSGS)

    @defer.inlineCallbacks
    def test_login_deadline(self) -> Any:
        clock = task.Clock()
        self.listen(make_factory(MemoryStore({}), [memory_checker()], clock=clock, login_timeout=20))
        client = yield self.connect()
        for _ in range(5):
            clock.advance(5)
            yield client.command(b"CAPA")  # activity does not extend the deadline
            yield client.multi() if False else None
        yield client.lost

    @defer.inlineCallbacks
    def test_idle_session_taken_over(self) -> Any:
        clock = task.Clock()
        store = MemoryStore({"alice": list(MSGS)})
        self.listen(make_factory(store, [memory_checker(alice="secret")], clock=clock, lock_grace=30))
        first = yield self.login()
        yield first.command(b"DELE 1")
        second = yield self.connect()
        yield second.command(b"USER alice")
        self.assertTrue((yield second.command(b"PASS secret")).startswith(b"-ERR [IN-USE]"))
        clock.advance(31)
        yield second.command(b"USER alice")
        r = yield second.command(b"PASS secret")
        self.assertTrue(r.startswith(b"+OK"), r)
        yield first.lost
        self.assertEqual(store.messages["alice"], MSGS)  # old session's DELE not applied


class FailureDelay(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_delay_grows_on_failures_only(self) -> Any:
        clock = task.Clock()
        store = MemoryStore({"alice": []})
        self.listen(make_factory(store, [memory_checker(alice="secret")], clock=clock,
                                 policy=Policy(failure_delay=2.0)))
        client = yield self.connect()
        yield client.command(b"USER alice")
        client.send(b"PASS bad\r\n")
        answer = client.line()
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(answer.called)
        clock.advance(2.0)
        self.assertTrue((yield answer).startswith(b"-ERR [AUTH]"))
        yield client.command(b"USER alice")
        client.send(b"PASS bad\r\n")
        answer = client.line()
        yield task.deferLater(reactor, 0.05, lambda: None)
        clock.advance(2.0)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(answer.called)  # second failure waits 4 s
        clock.advance(2.0)
        yield answer
        yield client.command(b"USER alice")
        r = yield client.command(b"PASS secret")  # success is answered at once
        self.assertTrue(r.startswith(b"+OK"))


class SessionEvents(ServerTestCase):
    @defer.inlineCallbacks
    def test_logout_summary(self) -> Any:
        events: list[tuple[str, dict[str, Any]]] = []

        class Recorder:
            def event(self, name: str, session: object, **fields: Any) -> None:
                events.append((name, fields))

        self.factory.observer = Recorder()
        client = yield self.login()
        yield client.command_multi(b"RETR 2")
        yield client.command_multi(b"TOP 1 0")
        yield client.command(b"DELE 3")
        yield client.command(b"QUIT")
        yield client.lost
        for _ in range(50):
            if any(n == "logout" for n, _ in events):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        names = [n for n, _ in events]
        self.assertEqual(names[:2], ["connect", "command"])
        self.assertIn("login", names)
        logout = dict(events)["logout"]
        self.assertEqual((logout["user"], logout["reason"], logout["retr"], logout["top"], logout["deleted"]),
                         ("alice", "quit", 1, 1, 1))
        self.assertEqual(logout["retr_bytes"], len(crlf(MSGS[1])) + 3)
        self.assertEqual(logout["deleted_bytes"], wire.transmitted_size([MSGS[2]]))
        self.assertEqual(logout["messages"], 3)


class OverLongLines(ServerTestCase):
    """A line far past its limit gets one -ERR and the connection is closed (reliability issue)."""

    @defer.inlineCallbacks
    def test_ten_megabytes_without_a_newline_before_login(self) -> Any:
        client = yield self.connect()
        client.send(b"USER " + b"a" * (10 * 1024 * 1024))
        yield client.lost
        self.assertEqual(client.buffer, b"-ERR Command line too long\r\n")

    @defer.inlineCallbacks
    def test_after_login_a_line_past_the_margin_closes(self) -> Any:
        client = yield self.login()
        client.send(b"LIST " + b"1" * 9000 + b"\r\nSTAT\r\n")
        yield client.lost
        self.assertEqual(client.buffer, b"-ERR Command line too long\r\n")

    @defer.inlineCallbacks
    def test_a_line_a_little_too_long_leaves_the_session_alive(self) -> Any:
        client = yield self.login()
        r = yield client.command(b"LIST " + b"1" * 300)
        self.assertEqual(r, b"-ERR Command line too long")
        self.assertTrue((yield client.command(b"STAT")).startswith(b"+OK"))
