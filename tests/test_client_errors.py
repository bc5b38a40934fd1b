"""
One error vocabulary and one set of exit statuses for both engines: the
same situation gives C{popservice fetch} the same message and status with
C{--engine twisted} as with the blocking engine (an untrusted certificate,
TLS to a plaintext port, a refused connection, a server that never answers,
one that hangs up, a temporary server error, STLS required but not offered,
a wrong password); and the summary of a run that deletes says what is left
on the server.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from popservice.client.cli_common import EX_FAIL, EX_TEMPFAIL, EX_USAGE
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, memory_checker, record_events
from tests.test_client_tls import PASSWORD, TLSServers, run_cli

ENGINES = ("twisted", "blocking")


class _Silent(protocol.Protocol):
    """Accepts, and never says a word."""


class _Scripted(protocol.Protocol):
    """Sends C{factory.greeting} (or hangs up when it is empty)."""

    def connectionMade(self) -> None:
        greeting: bytes = self.factory.greeting  # type: ignore[attr-defined]
        if greeting:
            self.transport.write(greeting)  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]


class SameErrorTests(TLSServers, unittest.TestCase):
    @defer.inlineCallbacks
    def fetch_both(self, url: str, *args: str, password: str = PASSWORD) -> Any:
        """C{fetch URL ARGS} with each engine: {engine: (status, stderr)}."""
        runs = yield defer.gatherResults([
            run_cli("fetch", url, "--to", f"maildir:{self.tmp}/Mail-{engine}", "--state-dir",
                    f"{self.tmp}/state-{engine}", "--engine", engine, "-q", *args, password=password)
            for engine in ENGINES])
        return {engine: (p.returncode, p.stderr) for engine, p in zip(ENGINES, runs)}

    def assertSame(self, runs: dict[str, tuple[int, str]], status: int, stderr: str) -> None:
        self.assertEqual(runs, {engine: (status, stderr) for engine in ENGINES})

    def listen_raw(self, factory: protocol.ServerFactory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    @defer.inlineCallbacks
    def test_untrusted_certificate(self) -> Any:
        ports, _ = self.serve("other_ca")
        runs = yield self.fetch_both(f"pop3s://alice@127.0.0.1:{ports['tls']}", "--ca-file", self.pki.ca_pem)
        self.assertSame(runs, EX_FAIL, "popservice: TLS: certificate verification failed for 127.0.0.1: "
                                       "unable to get local issuer certificate\n")

    @defer.inlineCallbacks
    def test_tls_to_a_plaintext_port(self) -> Any:
        ports, _ = self.serve("good")
        runs = yield self.fetch_both(f"pop3s://alice@127.0.0.1:{ports['stls']}", "--ca-file", self.pki.ca_pem)
        self.assertSame(runs, EX_FAIL,
                        "popservice: TLS: handshake with 127.0.0.1 failed: wrong version number\n")

    @defer.inlineCallbacks
    def test_connection_refused(self) -> Any:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        runs = yield self.fetch_both(f"pop3s://alice@127.0.0.1:{port}", "--ca-file", self.pki.ca_pem)
        self.assertSame(runs, EX_TEMPFAIL, "popservice: network: connection refused\n")

    @defer.inlineCallbacks
    def test_server_never_answers(self) -> Any:
        factory = protocol.ServerFactory()
        factory.protocol = _Silent
        port = self.listen_raw(factory)
        for scheme in ("pop3", "pop3s"):  # no greeting; no TLS handshake
            runs = yield self.fetch_both(f"{scheme}://alice@127.0.0.1:{port}", "--ca-file", self.pki.ca_pem,
                                         "--timeout", "0.5")
            self.assertSame(runs, EX_TEMPFAIL, "popservice: network: timed out\n")

    @defer.inlineCallbacks
    def test_server_hangs_up(self) -> Any:
        factory = protocol.ServerFactory()
        factory.protocol = _Scripted
        factory.greeting = b""  # type: ignore[attr-defined]
        port = self.listen_raw(factory)
        runs = yield self.fetch_both(f"pop3://alice@127.0.0.1:{port}", "--ca-file", self.pki.ca_pem)
        self.assertSame(runs, EX_TEMPFAIL, "popservice: network: connection closed by the server\n")

    @defer.inlineCallbacks
    def test_temporary_server_error(self) -> Any:
        factory = protocol.ServerFactory()
        factory.protocol = _Scripted
        factory.greeting = b"-ERR [SYS/TEMP] too busy\r\n"  # type: ignore[attr-defined]
        port = self.listen_raw(factory)
        runs = yield self.fetch_both(f"pop3://alice@127.0.0.1:{port}", "--ca-file", self.pki.ca_pem)
        self.assertSame(runs, EX_TEMPFAIL, "popservice: server: greeting: -ERR [SYS/TEMP] too busy\n")

    @defer.inlineCallbacks
    def test_stls_not_offered(self) -> Any:
        """A configuration problem (STLS required, the server has none): EX_USAGE, nothing sent."""
        factory = make_factory(MemoryStore({"alice": []}), [memory_checker(alice=PASSWORD)])
        events = record_events(factory)
        port = self.listen(factory)
        runs = yield self.fetch_both(f"pop3://alice@127.0.0.1:{port}")
        self.assertSame(runs, EX_USAGE, "popservice: TLS: 127.0.0.1 does not offer STLS "
                                        "(use pop3s://, or allow plaintext explicitly)\n")
        self.assertEqual([f["command"] for name, f in events if name == "command"], ["CAPA", "CAPA"])

    @defer.inlineCallbacks
    def test_wrong_password(self) -> Any:
        ports, events = self.serve("good")
        runs = yield self.fetch_both(f"pop3s://alice@localhost:{ports['tls']}", "--ca-file", self.pki.ca_pem,
                                     "--auth", "USER", password="wrong")
        self.assertSame(runs, EX_FAIL,
                        "popservice: authentication failed: PASS: -ERR [AUTH] Authentication failed\n")
        self.assertEqual([name for name, _ in events].count("login_failed"), 2)


class SummaryTests(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_delete_run_says_what_is_left(self) -> Any:
        tmp = os.path.abspath(self.mktemp())
        store = MemoryStore({"alice": [b"Subject: %d\n\nbody %d\n" % (i, i) for i in range(3)]})
        self.listen(make_factory(store, [memory_checker(alice="secret")]))
        url = f"pop3://alice@127.0.0.1:{self.server_port.getHost().port}"
        for engine, limit in (("twisted", "2"), ("blocking", "5")):
            p = yield run_cli("fetch", url, "--to", f"maildir:{tmp}/Mail", "--state-dir", f"{tmp}/state",
                              "--engine", engine, "--starttls", "none", "--allow-plaintext",
                              "--limit", limit)
            self.assertEqual(p.returncode, 0, p.stderr)
            if engine == "twisted":  # 2 of 3 fetched and deleted: 1 left
                self.assertIn(", 2 deleted on server, 1 left on server\n", p.stderr)
            else:  # the last one: nothing left
                self.assertIn("1 message fetched", p.stderr)
                self.assertIn(", 1 deleted on server, 0 left on server\n", p.stderr)
            self.assertNotIn(" 3 on server", p.stderr)
