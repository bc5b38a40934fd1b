"""STLS (RFC 2595), implicit TLS (RFC 8314) and the plaintext policy, over real sockets."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
from typing import Any

from twisted.internet import defer, endpoints, reactor, task, threads
from twisted.trial import unittest

from popservice.server.policy import Policy
from popservice.stores.memory import MemoryStore
from popservice.tap import load_tls_options
from popservice.tlsutil import make_self_signed
from tests.support import ServerMixin, make_factory, memory_checker, record_events, recv_line, shutdown

MSG = b"Subject: tls\n\nsecret body\n"


def recv_multi(sock: Any) -> bytes:
    lines = [recv_line(sock)]
    while lines[0].startswith(b"+OK") and lines[-1] != b".\r\n":
        lines.append(recv_line(sock))
    return b"".join(lines)


class TLSTestCase(ServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.tlsdir = os.path.abspath(self.mktemp())
        self.cert, self.key = make_self_signed(self.tlsdir)
        self.context = ssl.create_default_context(cafile=self.cert)
        self.store = MemoryStore({"alice": [MSG]})
        self.policy = Policy(failure_delay=0)

    def start(self, **config: Any) -> int:
        return self.listen(make_factory(self.store, [memory_checker(alice="secret")],
                                        tls_context=load_tls_options(self.cert, self.key),
                                        policy=self.policy, **config))

    def blocking(self, f: Any, *args: Any) -> Any:
        return threads.deferToThread(f, *args)

    def tls_socket(self, port: int, stls: bool, timeout: float = 10) -> Any:
        """A TLS connection to the server, its greeting read: after STLS, or implicit TLS."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if stls:
            recv_line(raw)
            raw.sendall(b"STLS\r\n")
            recv_line(raw)
        tls = self.context.wrap_socket(raw, server_hostname="localhost")
        if not stls:
            recv_line(tls)
        return tls

    def listen_ssl(self, factory: Any) -> Any:
        """C{factory} on an implicit-TLS C{ssl:} endpoint (a Deferred of the port)."""
        endpoint = endpoints.serverFromString(
            reactor, "ssl:0:privateKey=%s:certKey=%s:interface=127.0.0.1" % (self.key, self.cert))

        def listening(port: Any) -> Any:
            self.addCleanup(shutdown, port, factory)
            return port

        return endpoint.listen(factory).addCallback(listening)


class STLS(TLSTestCase):
    def stls_session(self, port: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            out["greeting"] = recv_line(raw)
            raw.sendall(b"CAPA\r\n")
            out["capa_before"] = recv_multi(raw)
            raw.sendall(b"STLS\r\n")
            out["stls"] = recv_line(raw)
            with self.context.wrap_socket(raw, server_hostname="localhost") as tls:
                out["version"] = tls.version()
                tls.sendall(b"CAPA\r\n")
                out["capa_after"] = recv_multi(tls)
                tls.sendall(b"STLS\r\n")
                out["stls_again"] = recv_line(tls)
                tls.sendall(b"USER alice\r\nPASS secret\r\nRETR 1\r\n")
                out["user"] = recv_line(tls)
                out["pass"] = recv_line(tls)
                out["retr"] = recv_multi(tls)
                tls.sendall(b"QUIT\r\n")
                out["quit"] = recv_line(tls)
        return out

    @defer.inlineCallbacks
    def test_stls_upgrade(self) -> Any:
        port = self.start()
        out = yield self.blocking(self.stls_session, port)
        self.assertIn(b"\r\nSTLS\r\n", out["capa_before"])
        self.assertTrue(out["stls"].startswith(b"+OK"))
        self.assertNotIn(b"STLS", out["capa_after"])
        self.assertTrue(out["stls_again"].startswith(b"-ERR"))
        self.assertTrue(out["pass"].startswith(b"+OK"), out)
        self.assertIn(b"secret body\r\n", out["retr"])
        self.assertIn(out["version"], ("TLSv1.2", "TLSv1.3"))

    def injection(self, port: int) -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            recv_line(raw)
            # Pipelined in the clear in the same packet as STLS: must be discarded.
            raw.sendall(b"STLS\r\nUSER alice\r\nPASS secret\r\n")
            stls = recv_line(raw)
            with self.context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"STAT\r\n")
                first = recv_line(tls)
        return stls, first

    @defer.inlineCallbacks
    def test_pipelined_plaintext_after_stls_discarded(self) -> Any:
        port = self.start()
        stls, first = yield self.blocking(self.injection, port)
        self.assertTrue(stls.startswith(b"+OK"))
        # Had USER/PASS survived, STAT would succeed or the first answer would be theirs.
        self.assertTrue(first.startswith(b"-ERR"), first)

    @defer.inlineCallbacks
    def test_no_stls_without_certificate(self) -> Any:
        self.listen(make_factory(self.store, [memory_checker(alice="secret")]))
        client = yield self.connect()
        first, body = yield client.command_multi(b"CAPA")
        self.assertNotIn(b"STLS", body)
        r = yield client.command(b"STLS")
        self.assertTrue(r.startswith(b"-ERR"))


class ImplicitTLS(TLSTestCase):
    def session(self, port: int) -> tuple[bytes, bytes, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with self.context.wrap_socket(raw, server_hostname="localhost") as tls:
                greeting = recv_line(tls)
                tls.sendall(b"CAPA\r\n")
                capa = recv_multi(tls)
                ts = re.search(rb"<[^>]*>", greeting).group(0)
                digest = hashlib.md5(ts + b"secret").hexdigest().encode()
                tls.sendall(b"APOP alice " + digest + b"\r\nRETR 1\r\nQUIT\r\n")
                recv_line(tls)
                retr = recv_multi(tls)
                recv_line(tls)
        return greeting, capa, retr

    @defer.inlineCallbacks
    def test_ssl_endpoint(self) -> Any:
        factory = make_factory(self.store, [memory_checker(alice="secret")], policy=self.policy)
        port = yield self.listen_ssl(factory)
        greeting, capa, retr = yield self.blocking(self.session, port.getHost().port)
        self.assertTrue(greeting.startswith(b"+OK"))
        self.assertNotIn(b"STLS", capa)  # already encrypted
        self.assertIn(b"secret body\r\n", retr)


class TLSAnswersAtOnce(TLSTestCase):
    """
    An answer over TLS is encrypted and sent when it is written, not a
    reactor turn later (Twisted gathers small TLS writes until then; the
    server writes a turn's answers in one write already).
    """

    def logged_in(self, port: int, stls: bool) -> Any:
        tls = self.tls_socket(port, stls, timeout=5)
        tls.sendall(b"USER alice\r\nPASS secret\r\n")
        recv_line(tls)
        recv_line(tls)
        return tls

    def tls_layer(self, server: Any) -> Any:
        from twisted.protocols.tls import TLSMemoryBIOProtocol
        transport = server.transport
        for layer in (transport, getattr(transport, "protocol", None)):
            if isinstance(layer, TLSMemoryBIOProtocol):
                return layer
        raise AssertionError("no TLS layer under %r" % (transport,))

    @defer.inlineCallbacks
    def test_implicit_tls_answer_sent_within_the_write(self) -> Any:
        import select
        factory = make_factory(self.store, [memory_checker(alice="secret")], policy=self.policy)
        port = yield self.listen_ssl(factory)
        tls = yield self.blocking(self.logged_in, port.getHost().port, False)
        self.addCleanup(tls.close)
        (server,) = list(factory.connections)
        self.assertNotIn("write", vars(self.tls_layer(server)))
        server.write(b"+OK probe\r\n")
        # The reactor does not turn here: the record is in the client's socket only if the write
        # itself encrypted and sent it.
        readable, _, _ = select.select([tls], [], [], 2.0)
        self.assertEqual(readable, [tls])
        self.assertEqual(recv_line(tls), b"+OK probe\r\n")

    @defer.inlineCallbacks
    def test_stls_answers_not_gathered(self) -> Any:
        port = self.start()
        tls = yield self.blocking(self.logged_in, port, True)
        self.addCleanup(tls.close)
        (server,) = list(self.factory.connections)
        self.assertNotIn("write", vars(self.tls_layer(server)))
        tls.sendall(b"STAT\r\n")
        answer = yield self.blocking(recv_line, tls)
        self.assertTrue(answer.startswith(b"+OK 1 "), answer)

    def test_writes_already_gathered_are_left_alone(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.testing import StringTransport
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from popservice.server.transport import write_tls_at_once
        tls_factory = TLSMemoryBIOFactory(load_tls_options(self.cert, self.key), False,
                                          Factory.forProtocol(Protocol), clock=task.Clock())
        layer = tls_factory.buildProtocol(None)
        layer.makeConnection(StringTransport())
        layer.write(b"gathered")  # waits for the next turn in Twisted's gatherer
        self.assertFalse(write_tls_at_once(layer))
        self.assertIn("write", vars(layer))
        layer._aggregator.flush()
        self.assertTrue(write_tls_at_once(layer))
        self.assertNotIn("write", vars(layer))
        layer.transport.loseConnection()
        layer.connectionLost(ConnectionDone())


class ServerClosesAfterQuit(TLSTestCase):
    """Regression: TLS kept the connection open after QUIT while our producer was registered."""

    def quit_and_wait_eof(self, port: int, stls: bool) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            if stls:
                recv_line(raw)
                raw.sendall(b"STLS\r\n")
                recv_line(raw)
            with self.context.wrap_socket(raw, server_hostname="localhost") as tls:
                if not stls:
                    recv_line(tls)
                tls.sendall(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
                recv_line(tls)
                recv_line(tls)
                answer = recv_line(tls)
                self.assertEqual(tls.recv(100), b"")  # EOF from the server, no timeout
        return answer

    @defer.inlineCallbacks
    def test_implicit_tls_quit_closes(self) -> Any:
        factory = make_factory(self.store, [memory_checker(alice="secret")], policy=self.policy)
        port = yield self.listen_ssl(factory)
        answer = yield self.blocking(self.quit_and_wait_eof, port.getHost().port, False)
        self.assertTrue(answer.startswith(b"+OK"))

    @defer.inlineCallbacks
    def test_stls_quit_closes(self) -> Any:
        port = self.start()
        answer = yield self.blocking(self.quit_and_wait_eof, port, True)
        self.assertTrue(answer.startswith(b"+OK"))


class ServerGoneAfterQuit(TLSTestCase):
    """
    Regression (NeoMutt): after QUIT over TLS the client reads +OK, sends its
    close_notify (or not) and closes; the server kept its socket in CLOSE-WAIT
    until the login or idle timer fired, because a closing connection stopped
    reading and TLS never saw the peer's close_notify or EOF.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, factory: Any) -> Any:
        self.events = record_events(factory)
        return factory

    def listen_implicit(self, **config: Any) -> Any:
        factory = self.record(make_factory(self.store, [memory_checker(alice="secret")], policy=self.policy,
                                           **config))
        d = self.listen_ssl(factory)

        def listening(port: Any) -> int:
            self.factory = factory
            return int(port.getHost().port)

        return d.addCallback(listening)

    def client(self, port: int, stls: bool, login: bool, close_notify: bool | None,
               held: list[Any] | None = None) -> bytes:
        """QUIT, read +OK Bye, then send close_notify (or not) and close (or hold the socket)."""
        tls = self.tls_socket(port, stls)
        if login:
            tls.sendall(b"USER alice\r\nPASS secret\r\n")
            recv_line(tls)
            recv_line(tls)
        tls.sendall(b"QUIT\r\n")
        answer = recv_line(tls)
        if close_notify is None:
            assert held is not None
            held.append(tls)  # a peer that neither answers the close_notify nor closes
        elif close_notify:
            tls.unwrap().close()
        else:
            tls.close()  # Python's close sends no close_notify: only the FIN
        return answer

    @defer.inlineCallbacks
    def logout_after(self, seconds: float) -> Any:
        """The logout event, waiting at most C{seconds} of real time for it."""
        for _ in range(int(seconds / 0.01)):
            logout = [f for name, f in self.events if name == "logout"]
            if logout and not self.factory.connections:
                return logout[0]
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("the server still holds the connection %.1f s after QUIT: %r"
                  % (seconds, [n for n, _ in self.events]))

    @defer.inlineCallbacks
    def check(self, port: int, stls: bool) -> Any:
        for login in (False, True):
            for close_notify in (True, False):
                del self.events[:]
                answer = yield self.blocking(self.client, port, stls, login, close_notify)
                self.assertTrue(answer.startswith(b"+OK"), answer)
                # The idle (600 s) and login (60 s) timers would end it otherwise.
                logout = yield self.logout_after(1.0)
                self.assertEqual(logout["reason"], "quit", (stls, login, close_notify))

    @defer.inlineCallbacks
    def test_stls(self) -> Any:
        port = self.start()
        self.record(self.factory)
        yield self.check(port, stls=True)

    @defer.inlineCallbacks
    def test_implicit_tls(self) -> Any:
        port = yield self.listen_implicit()
        yield self.check(port, stls=False)

    def plain_client(self, port: int, login: bool) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            recv_line(raw)
            if login:
                raw.sendall(b"USER alice\r\nPASS secret\r\n")
                recv_line(raw)
                recv_line(raw)
            raw.sendall(b"QUIT\r\n")
            return recv_line(raw)

    @defer.inlineCallbacks
    def test_plain_tcp(self) -> Any:
        port = self.start()
        self.record(self.factory)
        for login in (False, True):
            del self.events[:]
            answer = yield self.blocking(self.plain_client, port, login)
            self.assertTrue(answer.startswith(b"+OK"), answer)
            logout = yield self.logout_after(1.0)
            self.assertEqual(logout["reason"], "quit")

    @defer.inlineCallbacks
    def test_peer_that_never_closes_is_aborted_after_the_grace(self) -> Any:
        from popservice.server.protocol import CLOSE_GRACE

        clock = task.Clock()
        port = yield self.listen_implicit(clock=clock)
        held: list[Any] = []
        self.addCleanup(lambda: [s.close() for s in held])
        answer = yield self.blocking(self.client, port, False, True, None, held)
        self.assertTrue(answer.startswith(b"+OK"), answer)
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(self.factory.connections), 1)  # still waiting for the peer's close
        clock.advance(CLOSE_GRACE)
        logout = yield self.logout_after(5.0)
        self.assertEqual(logout["reason"], "quit")


class PlaintextPolicy(TLSTestCase):
    """A peer that is not trusted may not send passwords before STLS."""

    def setUp(self) -> None:
        super().setUp()
        self.policy = Policy(failure_delay=0, trust_loopback=False)

    @defer.inlineCallbacks
    def test_user_refused_before_stls(self) -> Any:
        self.start()
        client = yield self.connect()
        self.assertIsNone(re.search(rb"<[^>]*>", client.greeting))  # no APOP offered in the clear
        first, body = yield client.command_multi(b"CAPA")
        self.assertNotIn(b"\r\nUSER\r\n", b"\r\n" + body)
        self.assertIn(b"STLS", body)
        r = yield client.command(b"USER alice")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        self.assertIn(b"STLS", r)
        r = yield client.command(b"PASS secret")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)

    @defer.inlineCallbacks
    def test_poplib_user_pass_refused_without_tls(self) -> Any:
        import poplib

        port = self.start()

        def attempt() -> str:
            client = poplib.POP3("127.0.0.1", port, timeout=10)
            try:
                client.user("alice")
            except poplib.error_proto as e:
                return str(e)
            finally:
                client.close()
            return "accepted"

        refusal = yield self.blocking(attempt)
        self.assertIn("[AUTH]", refusal)
        self.assertIn("STLS", refusal)

    @defer.inlineCallbacks
    def test_allowed_after_stls(self) -> Any:
        port = self.start()
        out = yield self.blocking(STLS.stls_session, self, port)
        self.assertIn(b"USER", out["capa_after"])
        self.assertTrue(out["pass"].startswith(b"+OK"), out)

    @defer.inlineCallbacks
    def test_trusted_network(self) -> Any:
        from popservice.server.policy import parse_networks

        self.policy = Policy(failure_delay=0, trust_loopback=False,
                             trusted_networks=parse_networks("127.0.0.0/8"))
        self.start()
        client = yield self.connect()
        self.assertTrue((yield client.command(b"USER alice")).startswith(b"+OK"))
