"""
RFC 6856 UTF8: both engines send C{UTF8} before logging in when CAPA lists
it (after STLS, whose CAPA is the one that counts), against popservice's
own server (which lists C{UTF8 USER} and logs each command) and, for
interop, against Dovecot (whose 2.3 does not list UTF8: then it is not sent;
seen through a recording relay).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.protocols import portforward
from twisted.trial import unittest

from popservice.client import blocking
from popservice.client.common import Credentials
from popservice.client.connect import connect, open_connection
from popservice.client.url import parse_url
from popservice.stores.memory import MemoryStore
from popservice.tap import load_tls_options
from popservice.tlsutil import make_self_signed
from tests import dovecot_fixture as fx
from tests.support import ServerMixin, make_factory, memory_checker, record_events

LOGIN = ("USER", "PASS", "APOP", "AUTH")


def login_with(engine: str, url: str, creds: Credentials, **kw: Any) -> "defer.Deferred[Any]":
    """Log in with either engine and QUIT; fires with the mechanism used and whether UTF8 mode is on."""
    if engine == "twisted":
        @defer.inlineCallbacks
        def go() -> Any:
            client = yield connect(reactor, url, creds, timeout=10, **kw)
            state = client.mechanism_used, getattr(client, "utf8", None)
            yield client.quit()
            return state
        return go()

    def run() -> tuple[str | None, bool | None]:
        client = blocking.connect(parse_url(url), creds, timeout=10, **kw)
        state = client.mechanism_used, getattr(client, "utf8", None)
        client.quit()
        return state

    return threads.deferToThread(run)


class PopserviceUTF8Tests(ServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        tls_dir = os.path.abspath(self.mktemp())
        self.cert, key = make_self_signed(tls_dir, "localhost")
        self.tls = load_tls_options(self.cert, key)

    def start(self, **config: Any) -> list[tuple[str, dict[str, Any]]]:
        # "IX": what SASLprep makes of U+2168 ROMAN NUMERAL NINE, once UTF8 mode is on
        factory = make_factory(MemoryStore({"alice": [b"Subject: x\n\nbody\n"], "bob": []}),
                               [memory_checker(alice="secret", bob="IX")], **config)
        events = record_events(factory)
        self.listen(factory)
        return events

    def commands(self, events: list[tuple[str, dict[str, Any]]]) -> list[str]:
        return [f["command"] for name, f in events if name == "command"]

    @defer.inlineCallbacks
    def test_utf8_after_stls_before_login(self) -> Any:
        events = self.start(tls_context=self.tls)
        for engine in ("twisted", "blocking"):
            del events[:]
            yield login_with(engine, f"pop3://alice@localhost:{self.server_port.getHost().port}",
                             Credentials("alice", "secret"), ca_file=self.cert)
            commands = self.commands(events)
            self.assertIn("UTF8", commands, engine)
            utf8 = commands.index("UTF8")
            first_login = min(commands.index(c) for c in LOGIN if c in commands)
            self.assertEqual(commands[:utf8 + 1], ["CAPA", "STLS", "CAPA", "UTF8"], engine)
            self.assertLess(utf8, first_login, (engine, commands))
            self.assertEqual(commands.count("UTF8"), 1, engine)

    @defer.inlineCallbacks
    def test_utf8_before_user_pass(self) -> Any:
        """Plaintext, USER/PASS: UTF8 first, and the server's UTF8 mode is in effect (SASLprep)."""
        events = self.start(apop=False)
        for engine in ("twisted", "blocking"):
            del events[:]
            state = yield login_with(engine, f"pop3://bob@127.0.0.1:{self.server_port.getHost().port}",
                                     Credentials("bob", "\u2168", allow_plaintext=True), starttls="none")
            self.assertEqual(state, ("USER", True), engine)
            self.assertEqual(self.commands(events)[:4], ["CAPA", "UTF8", "USER", "PASS"], engine)


class _Recording(portforward.ProxyServer):
    """A relay that keeps every byte the client sent."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.sent.append(data)  # type: ignore[attr-defined]
        super().dataReceived(data)


class _RecordingFactory(portforward.ProxyFactory):
    protocol = _Recording

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.sent: list[bytes] = []


class DovecotUTF8Tests(unittest.TestCase):
    skip = fx.skip_reason()

    def setUp(self) -> None:
        self.server = fx.get_dovecot()
        self.server.set_mailbox("alice", fx.USERS["alice"], fx.bulk_messages("alice", 1, 300))

    @defer.inlineCallbacks
    def test_utf8_only_when_listed(self) -> Any:
        client = yield open_connection(reactor, f"pop3://127.0.0.1:{self.server.port}", starttls="none")
        listed = "UTF8" in client.capa
        client.abort()
        client = yield open_connection(reactor, f"pop3://127.0.0.1:{self.server.port}",
                                       ca_file=self.server.cert)
        listed_after_stls = "UTF8" in client.capa
        client.abort()
        relay = _RecordingFactory("127.0.0.1", self.server.port)
        port = reactor.listenTCP(0, relay, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"pop3://alice@127.0.0.1:{port.getHost().port}"
        for engine in ("twisted", "blocking"):
            del relay.sent[:]
            state = yield login_with(engine, url, Credentials("alice", fx.USERS["alice"],
                                                              allow_plaintext=True), starttls="none")
            self.assertEqual(state[1], listed, engine)
            lines = [line.split(b" ")[0] for line in b"".join(relay.sent).split(b"\r\n") if line]
            if listed:
                self.assertIn(b"UTF8", lines, engine)
                self.assertLess(lines.index(b"UTF8"),
                                min(lines.index(c.encode()) for c in LOGIN if c.encode() in lines))
            else:
                self.assertNotIn(b"UTF8", lines, engine)
            self.assertEqual(lines[0], b"CAPA", engine)
        # and over STLS, where the CAPA after TLS decides
        for engine in ("twisted", "blocking"):
            state = yield login_with(engine, f"pop3://alice@127.0.0.1:{self.server.port}",
                                     Credentials("alice", fx.USERS["alice"]), ca_file=self.server.cert)
            self.assertEqual(state[1], listed_after_stls, engine)

