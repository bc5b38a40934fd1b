"""--trace-user: one file per session of that user, secrets redacted, over real loopback sessions."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from popservice.server.trace import Tracer, redact
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, memory_checker
from tests.test_auth_command import EchoMechanism

MSGS = [b"Subject: one\n\nbody one\n.dot line\n", b"Subject: two\n\nbody two\n"]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class Redact(unittest.TestCase):
    def test_secrets(self) -> None:
        self.assertEqual(redact(b"PASS a b  c"), (b"PASS [redacted]", None))
        self.assertEqual(redact(b"pass secret"), (b"pass [redacted]", None))
        self.assertEqual(redact(b"APOP alice " + b"f" * 32), (b"APOP alice [redacted]", "alice"))
        self.assertEqual(redact(b"AUTH PLAIN " + b64(b"\0alice\0secret")), (b"AUTH PLAIN [redacted]", None))
        self.assertEqual(redact(b"AUTH PLAIN"), (b"AUTH PLAIN", None))
        self.assertEqual(redact(b"USER alice"), (b"USER alice", "alice"))
        self.assertEqual(redact(b"RETR 1"), (b"RETR 1", None))

    def test_what_is_no_command_is_only_its_length(self) -> None:
        token = b64(b"\0alice\0secret")
        self.assertEqual(redact(token), (b"[%d octets, not a command: not written]" % len(token), None))


class TraceTests(ServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.start(Tracer("alice", self.dir))

    def start(self, tracer: Tracer) -> None:
        self.store = MemoryStore({"alice": list(MSGS), "bob": list(MSGS)})
        self.listen(make_factory(self.store, [memory_checker(alice="secret", bob="bobpw")],
                                 sasl={"X-TOY": EchoMechanism}, trace=tracer))

    @defer.inlineCallbacks
    def ended(self) -> Any:
        """Wait until the server has closed every connection (each logout is traced)."""
        for _ in range(300):
            if not self.factory.connections:
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("connections still open")

    def traces(self) -> list[bytes]:
        out = []
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            self.assertTrue(name.startswith("alice-") and name.endswith(".trace"), name)
            with open(path, "rb") as f:
                out.append(f.read())
        return out

    @defer.inlineCallbacks
    def test_user_pass_session(self) -> Any:
        client = yield self.login("alice", "secret")
        first, retr = yield client.command_multi(b"RETR 1")
        first, top = yield client.command_multi(b"TOP 2 0")
        yield client.command(b"QUIT")
        yield self.ended()
        [trace] = self.traces()
        self.assertNotIn(b"secret", trace)
        self.assertNotIn(b"body one", trace)  # bodies: their size only
        self.assertNotIn(b"Subject", trace)
        for expected in (b" S: +OK POP3 server ready", b" C: USER alice", b" C: PASS [redacted]",
                         b" C: RETR 1", b" S: +OK ", b" -- login ", b" C: QUIT", b" -- logout "):
            self.assertIn(expected, trace)
        self.assertIn(b" S: [RETR body: %d octets]\n" % (len(retr) + 3,), trace)
        self.assertIn(b" S: [TOP body: %d octets]\n" % (len(top) + 3,), trace)
        self.assertTrue(trace.startswith(b"# popservice session trace of alice, peer 127.0.0.1, "))
        # in order, one record per line, each with its time
        self.assertLess(trace.index(b"C: USER alice"), trace.index(b"C: PASS"))
        self.assertLess(trace.index(b"C: RETR 1"), trace.index(b"[RETR body"))
        self.assertLess(trace.index(b"[RETR body"), trace.index(b"C: TOP 2 0"))
        for line in trace.splitlines()[1:]:
            self.assertRegex(line, rb"^\d\d:\d\d:\d\d\.\d{3} (C:|S:|--) ")

    @defer.inlineCallbacks
    def test_other_users_and_anonymous_sessions_leave_nothing(self) -> Any:
        client = yield self.login("bob", "bobpw")
        [protocol] = list(self.factory.connections)
        self.assertIsNone(protocol.trace)  # nothing more per line for bob
        yield client.command_multi(b"RETR 1")
        yield client.command(b"QUIT")
        client = yield self.connect()
        yield client.command_multi(b"CAPA")
        yield client.command(b"QUIT")
        yield self.ended()
        self.assertEqual(os.listdir(self.dir), [])

    @defer.inlineCallbacks
    def test_apop_digest_redacted(self) -> Any:
        client = yield self.connect()
        timestamp = re.search(rb"<[^>]*>", client.greeting).group(0)
        digest = hashlib.md5(timestamp + b"secret").hexdigest().encode()
        self.assertTrue((yield client.command(b"APOP alice " + digest)).startswith(b"+OK"))
        yield client.command(b"QUIT")
        yield self.ended()
        [trace] = self.traces()
        self.assertIn(b" C: APOP alice [redacted]", trace)
        self.assertNotIn(digest, trace)

    @defer.inlineCallbacks
    def test_sasl_exchange_redacted_both_ways(self) -> Any:
        client = yield self.connect()
        # the user is known only at login: the lines before are kept and written then
        self.assertEqual((yield client.command(b"AUTH X-TOY " + b64(b"alice"))), b"+ " + b64(b"password?"))
        self.assertTrue((yield client.command(b64(b"secret"))).startswith(b"+OK"))
        yield client.command(b"QUIT")
        yield self.ended()
        [trace] = self.traces()
        for secret in (b64(b"alice"), b64(b"secret"), b64(b"password?"), b"secret"):
            self.assertNotIn(secret, trace)
        self.assertIn(b" C: AUTH X-TOY [redacted]", trace)
        self.assertIn(b" S: + [SASL challenge, %d octets: redacted]" % (len(b64(b"password?")),), trace)
        self.assertIn(b" C: [SASL response, %d octets: redacted]" % (len(b64(b"secret")),), trace)
        self.assertIn(b" -- login ", trace)

    @defer.inlineCallbacks
    def test_sasl_data_out_of_turn_not_written(self) -> Any:
        client = yield self.connect()
        yield client.command(b"USER alice")
        token = b64(b"\0alice\0secret")
        self.assertTrue((yield client.command(token)).startswith(b"-ERR"))
        yield client.command(b"QUIT")
        yield self.ended()
        [trace] = self.traces()
        self.assertNotIn(token, trace)
        self.assertIn(b" C: [%d octets, not a command: not written]" % (len(token),), trace)

    @defer.inlineCallbacks
    def test_failed_login_traced_then_ends_at_another_users_login(self) -> Any:
        client = yield self.connect()
        yield client.command_multi(b"CAPA")
        yield client.command(b"AUTH X-TOY " + b64(b"alice"))
        r = yield client.command(b64(b"wrong"))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        yield client.command(b"USER bob")
        self.assertTrue((yield client.command(b"PASS bobpw")).startswith(b"+OK"))
        yield client.command(b"STAT")
        yield client.command(b"QUIT")
        yield self.ended()
        [trace] = self.traces()
        self.assertIn(b" -- login_failed ", trace)
        self.assertIn(b" C: USER bob", trace)
        self.assertIn(b"logged in as another user: the trace ends", trace)
        self.assertNotIn(b"C: STAT", trace)

    @defer.inlineCallbacks
    def test_prelogin_lines_bounded(self) -> Any:
        self.factory.config.trace = Tracer("alice", self.dir, limit=600)
        client = yield self.connect()
        for _ in range(10):
            yield client.command_multi(b"CAPA")  # a dozen records each
        yield client.command(b"USER alice")
        yield client.command(b"PASS secret")
        yield client.command(b"QUIT")
        yield self.ended()
        [trace] = self.traces()
        self.assertRegex(trace, rb"# \d+ octets of records before login not kept \(limit 600\)\n")
        self.assertIn(b" C: PASS [redacted]", trace)  # after the user is known, everything again

    @defer.inlineCallbacks
    def test_trace_bodies(self) -> Any:
        self.factory.config.trace = Tracer("alice", self.dir, bodies=True)
        client = yield self.login("alice", "secret")
        yield client.command_multi(b"RETR 1")
        yield client.command(b"QUIT")
        yield self.ended()
        [trace] = self.traces()
        self.assertIn(b" S: body one\n", trace)
        self.assertIn(b" S: ..dot line\n", trace)
        self.assertIn(b" S: [RETR body: ", trace)

    @defer.inlineCallbacks
    def test_unwritable_directory_is_one_warning(self) -> Any:
        self.factory.config.trace = Tracer("alice", os.path.join(self.dir, "missing"))
        client = yield self.login("alice", "secret")
        [protocol] = list(self.factory.connections)
        self.assertIsNone(protocol.trace)
        self.assertTrue((yield client.command(b"STAT")).startswith(b"+OK"))
        yield client.command(b"QUIT")
        yield self.ended()
        self.assertEqual(len(self.flushLoggedErrors()), 0)
