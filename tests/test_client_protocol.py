"""
The POP3 client protocol against a scripted fake server on a real loopback
socket (and, for the exhaustive split tests, fed byte strings directly).
"""

from __future__ import annotations

import base64
import os
import random
import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.test.proto_helpers import StringTransport
from twisted.trial import unittest

from popservice import wire
from popservice.client.connect import parse_url, tls_options
from popservice.client.protocol import (
    AuthError,
    Capabilities,
    Credentials,
    InUseError,
    NoMechanismError,
    POP3Client,
    POP3ProtocolError,
    SysTempError,
)
from popservice.sasl import client as sasl

GREETING = b"+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n"
CAPA = b"+OK\r\nTOP\r\nUIDL\r\nUSER\r\nPIPELINING\r\nRESP-CODES\r\nSASL PLAIN CRAM-MD5\r\n.\r\n"


class ScriptedServer(protocol.Protocol):
    """
    Sends the greeting, then for each received line looks up the answer in
    C{factory.answers} (a callable: line -> bytes or None).  Records lines and,
    for each, how many lines were unanswered when it arrived.
    """

    def connectionMade(self) -> None:
        self.buf = b""
        self.factory.protos.append(self)
        self.lines: list[bytes] = []
        self.transport.setTcpNoDelay(True)
        self.send(self.factory.greeting)

    def send(self, data: bytes) -> None:
        if self.factory.bytewise:
            for i in range(len(data)):
                reactor.callLater(0.0005 * i, self.transport.write, data[i:i + 1])
        else:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        batch = []
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            self.lines.append(line)
            batch.append(line)
        self.factory.batches.append(batch)
        for line in batch:
            answer = self.factory.answer(self, line)
            if answer is not None:
                self.send(answer)


class ServerFactory(protocol.ServerFactory):
    protocol = ScriptedServer

    def __init__(self, answer: Any, greeting: bytes = GREETING, bytewise: bool = False) -> None:
        self.answer = answer
        self.greeting = greeting
        self.bytewise = bytewise
        self.protos: list[ScriptedServer] = []
        self.batches: list[list[bytes]] = []


def table(answers: dict[bytes, bytes]) -> Any:
    def answer(proto: ScriptedServer, line: bytes) -> bytes | None:
        return answers.get(line, b"-ERR unknown\r\n")
    return answer


class LoopbackMixin:
    def serve(self, answer: Any, **kw: Any) -> ServerFactory:
        factory = ServerFactory(answer, **kw)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        self.port = port.getHost().port
        return factory

    @defer.inlineCallbacks
    def client(self) -> Any:
        c = POP3Client()
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        yield connectProtocol(ep, c)
        self.addCleanup(c.abort)  # type: ignore[attr-defined]
        yield c.greeting
        return c


def message_bytes(n: int) -> bytes:
    rnd = random.Random(n)
    lines = []
    for i in range(200):
        kind = rnd.random()
        if kind < 0.1:
            lines.append(b"." * rnd.randint(1, 3) + b"dotted %d" % i)
        elif kind < 0.15:
            lines.append(b"")
        else:
            lines.append(bytes(rnd.randint(32, 126) for _ in range(rnd.randint(0, 120))))
    return b"\r\n".join(lines) + b"\r\n"


def retr_answer(content: bytes) -> bytes:
    return wire.multiline(b"+OK message follows\r\n", content.split(b"\r\n")[:-1])


class BasicTests(LoopbackMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_greeting_timestamp_and_capa(self) -> Any:
        self.serve(table({b"CAPA": b"+OK\r\nTOP\r\nSASL PLAIN SCRAM-SHA-256\r\nLOGIN-DELAY 900\r\n"
                                   b"EXPIRE NEVER\r\nIMPLEMENTATION Shlemazle Plus\r\nPIPELINING\r\n.\r\n"}),
                   greeting=b"+OK hello <x.1@host> and more\r\n")
        c = yield self.client()
        self.assertEqual(c.apop_timestamp, b"<x.1@host>")
        caps = yield c.capabilities()
        self.assertEqual(caps.sasl, ("PLAIN", "SCRAM-SHA-256"))
        self.assertEqual(caps.login_delay, 900)
        self.assertEqual(caps.expire, "NEVER")
        self.assertEqual(caps.implementation, "Shlemazle Plus")
        self.assertTrue(caps.pipelining)
        self.assertTrue(caps.top)
        self.assertFalse(caps.stls)

    @defer.inlineCallbacks
    def test_error_greeting(self) -> Any:
        self.serve(table({}), greeting=b"-ERR [SYS/TEMP] go away\r\n")
        c = POP3Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), c)
        e = yield self.assertFailure(c.greeting, SysTempError)
        self.assertEqual(e.code, "SYS/TEMP")

    @defer.inlineCallbacks
    def test_user_pass_stat_list_uidl_quit(self) -> Any:
        self.serve(table({
            b"USER bob": b"+OK\r\n", b"PASS s e cret": b"+OK logged in\r\n",
            b"STAT": b"+OK 2 320\r\n", b"LIST": b"+OK\r\n1 120\r\n2 200\r\n.\r\n",
            b"LIST 2": b"+OK 2 200\r\n",
            b"UIDL": b"+OK\r\n1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\r\n.\r\n",
            b"UIDL 1": b"+OK 1 whqtswO00WBw418f9t5JxYwZ\r\n", b"NOOP": b"+OK\r\n",
            b"DELE 1": b"+OK\r\n", b"RSET": b"+OK\r\n", b"QUIT": b"+OK bye\r\n",
        }))
        c = yield self.client()
        yield c.user("bob")
        yield c.password("s e cret")
        self.assertEqual((yield c.stat()), (2, 320))
        self.assertEqual([(e.number, e.size) for e in (yield c.list())], [(1, 120), (2, 200)])
        self.assertEqual((yield c.list(2)).size, 200)
        self.assertEqual([e.uid for e in (yield c.uidl())],
                         ["whqtswO00WBw418f9t5JxYwZ", "QhdPYR:00WBw1Ph7x7"])
        self.assertEqual((yield c.uidl(1)).uid, "whqtswO00WBw418f9t5JxYwZ")
        yield c.noop()
        yield c.delete(1)
        yield c.reset()
        yield c.quit()
        yield c.when_closed()

    @defer.inlineCallbacks
    def test_error_codes(self) -> Any:
        self.serve(table({
            b"USER a": b"+OK\r\n", b"PASS locked": b"-ERR [IN-USE] mailbox locked\r\n",
            b"PASS wrong": b"-ERR [AUTH] invalid password\r\n", b"PASS nocode": b"-ERR no\r\n",
        }))
        c = yield self.client()
        yield c.user("a")
        e = yield self.assertFailure(c.password("locked"), InUseError)
        self.assertEqual(e.code, "IN-USE")
        self.assertTrue(e.temporary)
        yield c.user("a")
        e = yield self.assertFailure(c.password("wrong"), AuthError)
        self.assertEqual(e.code, "AUTH")
        self.assertFalse(e.temporary)
        yield c.user("a")
        e = yield self.assertFailure(c.password("nocode"), AuthError)
        self.assertIsNone(e.code)

    @defer.inlineCallbacks
    def test_quit_sys_temp(self) -> Any:
        self.serve(table({b"QUIT": b"-ERR [SYS/TEMP] some deleted messages not removed\r\n"}))
        c = yield self.client()
        e = yield self.assertFailure(c.quit(), SysTempError)
        self.assertIn("not removed", e.text)

    @defer.inlineCallbacks
    def test_retrieve_bytes_and_consumer(self) -> Any:
        content = message_bytes(1)
        self.serve(table({b"RETR 1": retr_answer(content), b"TOP 1 0": retr_answer(b"H: v\r\n\r\n")}))
        c = yield self.client()
        self.assertEqual((yield c.retrieve(1)), content)
        chunks: list[bytes] = []
        result = yield c.retrieve(1, chunks.append)
        self.assertIsNone(result)
        self.assertEqual(b"".join(chunks), content)
        lf = yield c.retrieve(1, crlf=False)
        self.assertEqual(lf, content.replace(b"\r\n", b"\n"))
        self.assertEqual((yield c.top(1, 0)), b"H: v\r\n\r\n")

    @defer.inlineCallbacks
    def test_lines_longer_than_64k(self) -> Any:
        content = b"Subject: long\r\n\r\n" + b"a" * 300_000 + b"\r\n." + b"b" * 70_000 + b"\r\nend\r\n"
        self.serve(table({b"RETR 1": retr_answer(content)}))
        c = yield self.client()
        self.assertEqual((yield c.retrieve(1)), content)

    @defer.inlineCallbacks
    def test_status_line_too_long_is_protocol_error(self) -> Any:
        self.serve(table({b"NOOP": b"+OK " + b"x" * 70_000 + b"\r\n"}))
        c = yield self.client()
        yield self.assertFailure(c.noop(), POP3ProtocolError)

    @defer.inlineCallbacks
    def test_garbage_is_protocol_error(self) -> Any:
        self.serve(table({b"NOOP": b"HTTP/1.0 200 OK\r\n"}))
        c = yield self.client()
        yield self.assertFailure(c.noop(), POP3ProtocolError)

    @defer.inlineCallbacks
    def test_connection_lost_mid_body(self) -> Any:
        def answer(proto: ScriptedServer, line: bytes) -> bytes | None:
            proto.transport.write(b"+OK\r\npartial line\r\n")
            proto.transport.loseConnection()
            return None
        self.serve(answer)
        c = yield self.client()
        chunks: list[bytes] = []
        yield self.assertFailure(c.retrieve(1, chunks.append), Exception)
        self.assertEqual(b"".join(chunks), b"partial line\r\n")

    @defer.inlineCallbacks
    def test_bytewise_server(self) -> Any:
        """Every byte of every response in its own TCP segment."""
        content = message_bytes(2)
        content = content[:content.index(b"\r\n", 3000) + 2]
        self.serve(table({b"CAPA": CAPA, b"RETR 1": retr_answer(content), b"STAT": b"+OK 1 5\r\n"}),
                   bytewise=True)
        c = yield self.client()
        self.assertEqual(c.apop_timestamp, b"<1896.697170952@dbc.mtview.ca.us>")
        caps = yield c.capabilities()
        self.assertTrue(caps.pipelining)
        self.assertEqual((yield c.stat()), (1, 5))
        self.assertEqual((yield c.retrieve(1)), content)


class PipeliningTests(LoopbackMixin, unittest.TestCase):
    def pipelined_server(self, expect: int, pipelining: bool = True) -> ServerFactory:
        """Answers nothing in TRANSACTION until C{expect} commands have arrived."""
        held: list[bytes] = []
        capa = CAPA if pipelining else CAPA.replace(b"PIPELINING\r\n", b"")

        def answer(proto: ScriptedServer, line: bytes) -> bytes | None:
            if line == b"CAPA":
                return capa
            if line.startswith((b"USER", b"PASS")):
                return b"+OK\r\n"
            if line.startswith(b"RETR"):
                n = int(line.split()[1])
                held.append(retr_answer(message_bytes(n)))
            elif line.startswith(b"DELE"):
                held.append(b"+OK deleted\r\n")
            elif line == b"QUIT":
                return b"+OK\r\n"
            if not pipelining or len(held) >= expect:
                out = b"".join(held)
                del held[:]
                return out
            return None
        return self.serve(answer)

    @defer.inlineCallbacks
    def login(self) -> Any:
        c = yield self.client()
        yield c.login(Credentials("u", "p", mechanisms=("USER",), allow_plaintext=True))
        return c

    @defer.inlineCallbacks
    def test_commands_pipelined(self) -> Any:
        factory = self.pipelined_server(expect=10)
        c = yield self.login()
        ds = [c.retrieve(n) for n in range(1, 6)] + [c.delete(n) for n in range(1, 6)]
        results = yield defer.gatherResults(ds)
        for n in range(1, 6):
            self.assertEqual(results[n - 1], message_bytes(n))
        proto = factory.protos[0]
        self.assertEqual(proto.lines[-10:],
                         [b"RETR %d" % n for n in range(1, 6)] + [b"DELE %d" % n for n in range(1, 6)])

    @defer.inlineCallbacks
    def test_serialised_without_pipelining(self) -> Any:
        factory = self.pipelined_server(expect=1, pipelining=False)
        c = yield self.login()
        ds = [c.retrieve(n) for n in range(1, 4)]
        results = yield defer.gatherResults(ds)
        self.assertEqual(results, [message_bytes(n) for n in range(1, 4)])
        # no batch of received lines held more than one command
        self.assertTrue(all(len(b) <= 1 for b in factory.batches))

    @defer.inlineCallbacks
    def test_pipelined_answers_in_one_segment(self) -> Any:
        """All responses arriving at once are split by lines, not packets."""
        self.pipelined_server(expect=3)
        c = yield self.login()
        chunks: list[list[bytes]] = [[], [], []]
        yield defer.gatherResults([c.retrieve(n + 1, chunks[n].append) for n in range(3)])
        self.assertEqual([b"".join(x) for x in chunks], [message_bytes(n) for n in range(1, 4)])


class AuthTests(LoopbackMixin, unittest.TestCase):
    def sasl_server(self, mechs: bytes, handler: Any) -> ServerFactory:
        state: dict[str, Any] = {}

        def answer(proto: ScriptedServer, line: bytes) -> bytes | None:
            if line == b"CAPA":
                return b"+OK\r\nSASL " + mechs + b"\r\nUSER\r\n.\r\n"
            if line.startswith(b"AUTH ") or state.get("in_auth"):
                state["in_auth"] = True
                out: bytes = handler(state, line)
                if not out.startswith(b"+ "):
                    state["in_auth"] = False
                return out
            return b"+OK\r\n"
        return self.serve(answer)

    @defer.inlineCallbacks
    def test_plain_initial_response(self) -> Any:
        seen = []

        def handler(state: dict[str, Any], line: bytes) -> bytes:
            seen.append(line)
            return b"+OK\r\n"
        self.sasl_server(b"PLAIN", handler)
        c = yield self.client()
        c.tls = True  # pretend: PLAIN needs TLS
        yield c.login(Credentials("tim", "tanstaaftanstaaf"))
        self.assertEqual(seen, [b"AUTH PLAIN " + base64.b64encode(b"\0tim\0tanstaaftanstaaf")])
        self.assertEqual(c.mechanism_used, "PLAIN")

    @defer.inlineCallbacks
    def test_cram_md5_preferred_over_plain(self) -> Any:
        challenge = b"<1896.697170952@postoffice.reston.mci.net>"
        seen = []

        def handler(state: dict[str, Any], line: bytes) -> bytes:
            seen.append(line)
            if line == b"AUTH CRAM-MD5":
                return b"+ " + base64.b64encode(challenge) + b"\r\n"
            return b"+OK\r\n"
        self.sasl_server(b"PLAIN CRAM-MD5", handler)
        c = yield self.client()
        yield c.login(Credentials("tim", "tanstaaftanstaaf"))
        # RFC 2195 example
        self.assertEqual(base64.b64decode(seen[1]), b"tim b913a602c7eda7a495b4e6e7334d3890")

    @defer.inlineCallbacks
    def test_login_mechanism(self) -> Any:
        def handler(state: dict[str, Any], line: bytes) -> bytes:
            step = state.setdefault("step", 0)
            state["step"] = step + 1
            if step == 0:
                return b"+ " + base64.b64encode(b"Username:") + b"\r\n"
            if step == 1:
                state["user"] = base64.b64decode(line)
                return b"+ " + base64.b64encode(b"Password:") + b"\r\n"
            state["pw"] = base64.b64decode(line)
            return b"+OK\r\n"
        f = self.sasl_server(b"LOGIN", handler)
        c = yield self.client()
        c.tls = True
        yield c.login(Credentials("bob", "pw pw"))
        self.assertEqual(f.protos[0].lines[1], b"AUTH LOGIN")

    @defer.inlineCallbacks
    def test_scram_sha_256(self) -> Any:
        from scramp import ScramMechanism
        mech = ScramMechanism("SCRAM-SHA-256")
        salt, stored, server_key, iters = mech.make_auth_info("pencil", iteration_count=4096)

        def handler(state: dict[str, Any], line: bytes) -> bytes:
            if line.startswith(b"AUTH "):
                srv = mech.make_server(lambda u: (salt, stored, server_key, iters))
                state["srv"] = srv
                srv.set_client_first(base64.b64decode(line.split()[2]).decode())
                return b"+ " + base64.b64encode(srv.get_server_first().encode()) + b"\r\n"
            srv = state["srv"]
            if "final" not in state:
                srv.set_client_final(base64.b64decode(line).decode())
                state["final"] = True
                return b"+ " + base64.b64encode(srv.get_server_final().encode()) + b"\r\n"
            return b"+OK\r\n"
        self.sasl_server(b"PLAIN SCRAM-SHA-256 CRAM-MD5", handler)
        c = yield self.client()
        yield c.login(Credentials("user", "pencil"))
        self.assertEqual(c.mechanism_used, "SCRAM-SHA-256")

    @defer.inlineCallbacks
    def test_scram_wrong_server_signature_aborts(self) -> Any:
        from scramp import ScramMechanism
        mech = ScramMechanism("SCRAM-SHA-256")
        info = mech.make_auth_info("pencil", iteration_count=4096)

        def handler(state: dict[str, Any], line: bytes) -> bytes:
            if line.startswith(b"AUTH "):
                srv = mech.make_server(lambda u: info)
                state["srv"] = srv
                srv.set_client_first(base64.b64decode(line.split()[2]).decode())
                return b"+ " + base64.b64encode(srv.get_server_first().encode()) + b"\r\n"
            if line == b"*":
                return b"-ERR cancelled\r\n"
            if "final" not in state:
                state["final"] = True
                return b"+ " + base64.b64encode(b"v=" + base64.b64encode(b"x" * 32)) + b"\r\n"
            return b"+OK\r\n"
        self.sasl_server(b"SCRAM-SHA-256", handler)
        c = yield self.client()
        yield self.assertFailure(c.login(Credentials("user", "pencil")), sasl.SASLError)

    @defer.inlineCallbacks
    def test_oauthbearer_and_xoauth2(self) -> Any:
        seen = []

        def handler(state: dict[str, Any], line: bytes) -> bytes:
            seen.append(line)
            return b"+OK\r\n"
        self.sasl_server(b"XOAUTH2 OAUTHBEARER PLAIN", handler)
        c = yield self.client()
        c.tls = True
        yield c.login(Credentials("a@b.c", token="tok"))
        self.assertEqual(c.mechanism_used, "OAUTHBEARER")
        self.assertEqual(base64.b64decode(seen[0].split()[2]), b"n,a=a@b.c,\x01auth=Bearer tok\x01\x01")
        x = sasl.XOAuth2(sasl.SASLCredentials("a@b.c", token="tok")).initial()
        self.assertEqual(x, b"user=a@b.c\x01auth=Bearer tok\x01\x01")

    @defer.inlineCallbacks
    def test_apop_beats_plaintext_without_tls(self) -> Any:
        seen = []

        def answer(proto: ScriptedServer, line: bytes) -> bytes | None:
            seen.append(line)
            if line == b"CAPA":
                return b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n"
            return b"+OK\r\n"
        self.serve(answer)
        c = yield self.client()
        yield c.login(Credentials("mrose", "tanstaaf", allow_plaintext=True))
        # RFC 1939 section 7 example digest
        self.assertEqual(seen[1], b"APOP mrose c4c9334bac560ecc979e58001b3e22fb")

    @defer.inlineCallbacks
    def test_plaintext_refused_without_tls(self) -> Any:
        self.serve(table({b"CAPA": b"+OK\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"}),
                   greeting=b"+OK no timestamp\r\n")
        c = yield self.client()
        yield self.assertFailure(c.login(Credentials("u", "p")), NoMechanismError)


class SplitTests(unittest.TestCase):
    """A whole session's server bytes, split at every byte boundary, parse the same."""

    def transcript(self) -> tuple[bytes, bytes]:
        content = b"Subject: x\r\n\r\n.dot\r\n..two\r\n.\r\nbody\r\n"
        server = (GREETING + CAPA + b"+OK\r\n+OK\r\n+OK 1 44\r\n"
                  + retr_answer(content) + b"+OK\r\n1 abc\r\n.\r\n" + b"-ERR [SYS/TEMP] x\r\n")
        return server, content

    def run_session(self, chunks: list[bytes]) -> list[Any]:
        c = POP3Client()
        t = StringTransport()
        c.makeConnection(t)
        results: list[Any] = []
        c.greeting.addCallback(lambda r: results.append(("greeting", c.apop_timestamp)))
        c.capabilities().addCallback(lambda caps: results.append(("capa", caps.sasl, caps.pipelining)))
        c.user("u").addCallback(lambda r: results.append("user"))
        c.password("p").addCallback(lambda r: results.append("pass"))
        c.stat().addCallback(lambda r: results.append(r))
        c.retrieve(1).addCallback(lambda r: results.append(r))
        c.uidl().addCallback(lambda r: results.append([(e.number, e.uid) for e in r]))
        c.quit().addErrback(lambda f: results.append(f.value.code))
        for chunk in chunks:
            c.dataReceived(chunk)
        c.connectionLost(Failure(ConnectionDone()))
        return results

    def test_every_split(self) -> None:
        data, content = self.transcript()
        expected = self.run_session([data])
        self.assertEqual(expected[-1], "SYS/TEMP")
        self.assertIn(content, expected)
        for k in range(len(data) + 1):
            self.assertEqual(self.run_session([data[:k], data[k:]]), expected, k)

    def test_byte_by_byte(self) -> None:
        data, _ = self.transcript()
        self.assertEqual(self.run_session([data[i:i + 1] for i in range(len(data))]),
                         self.run_session([data]))


class CapabilitiesTests(unittest.TestCase):
    def test_parse(self) -> None:
        caps = Capabilities.parse([b"TOP", b"sasl plain login", b"EXPIRE 30 USER", b"LOGIN-DELAY x"])
        self.assertEqual(caps.sasl, ("PLAIN", "LOGIN"))
        self.assertEqual(caps.expire, 30)
        self.assertIsNone(caps.login_delay)
        self.assertIn("top", caps)


class URLTests(unittest.TestCase):
    def test_parse(self) -> None:
        u = parse_url("pop3://rg;AUTH=+APOP@mailsrv.qualcomm.com:8110")
        self.assertEqual((u.scheme, u.host, u.port, u.user, u.mechanisms),
                         ("pop3", "mailsrv.qualcomm.com", 8110, "rg", ("APOP",)))
        u = parse_url("pop3s://alice%40example.org@[::1]")
        self.assertEqual((u.host, u.port, u.user, u.mechanisms), ("::1", 995, "alice@example.org", None))
        u = parse_url("pop3://baz;AUTH=SCRAM-SHA-256@host")
        self.assertEqual(u.mechanisms, ("SCRAM-SHA-256",))
        self.assertRaises(ValueError, parse_url, "imap://host")
        self.assertRaises(ValueError, parse_url, "pop3://host/path")

    def test_parse_details(self) -> None:
        u = parse_url("POP3://User:ignored@Mail.Example.ORG:/")
        self.assertEqual((u.scheme, u.host, u.port, u.user, u.auth),
                         ("pop3", "mail.example.org", 110, "User", None))
        self.assertEqual(parse_url("pop3s://a%C3%A9;auth=*@h:1").user, "a\u00e9")
        self.assertIsNone(parse_url("pop3s://a;auth=*@h:1").mechanisms)
        self.assertEqual(str(parse_url("pop3://u;AUTH=PLAIN@[::1]:1110")), "pop3://u;AUTH=PLAIN@[::1]:1110")
        self.assertEqual(parse_url("pop3://h"), parse_url("pop3://h:110/"))
        for bad in ("pop3://", "pop3://host?q", "pop3://host#f", "pop3://h:0", "pop3://h:65536",
                    "pop3://h:x", "pop3://[1.2.3.4]", "pop3://[::1", "pop3://a b@h", "pop3://h\n",
                    "pop3:host", "pop3://u@v@h"):
            self.assertRaises(ValueError, parse_url, bad)


class SASLUnitTests(unittest.TestCase):
    def test_choice(self) -> None:
        creds = sasl.SASLCredentials("u", "p")
        self.assertEqual(sasl.choose_mechanism(["PLAIN", "CRAM-MD5", "SCRAM-SHA-256"], creds).name,
                         "SCRAM-SHA-256")
        self.assertIsNone(sasl.choose_mechanism(["PLAIN", "LOGIN"], creds, allow_plaintext=False))
        self.assertEqual(sasl.choose_mechanism(["PLAIN", "LOGIN"], creds, allowed=["LOGIN"]).name, "LOGIN")

    def test_cram_md5(self) -> None:
        m = sasl.CramMD5(sasl.SASLCredentials("tim", "tanstaaftanstaaf"))
        self.assertEqual(m.respond(b"<1896.697170952@postoffice.reston.mci.net>"),
                         b"tim b913a602c7eda7a495b4e6e7334d3890")


def _tls_server_context(tmp: str) -> tuple[Any, str]:
    from tests.dovecot_fixture import make_cert
    cert, key = make_cert(tmp)
    pem = open(cert, "rb").read() + open(key, "rb").read()
    return ssl.PrivateCertificate.loadPEM(pem).options(), cert


class STLSTests(LoopbackMixin, unittest.TestCase):
    def stls_server(self, inject: bytes = b"") -> tuple[ServerFactory, str]:
        tmp = tempfile.mkdtemp()
        ctx, cert = _tls_server_context(tmp)

        def answer(proto: ScriptedServer, line: bytes) -> bytes | None:
            tls = getattr(proto, "tls", False)
            if line == b"CAPA":
                return (b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n" if tls
                        else b"+OK\r\nSTLS\r\nUSER\r\n.\r\n")
            if line == b"STLS":
                proto.transport.write(b"+OK begin TLS\r\n" + inject)
                proto.transport.startTLS(ctx)
                proto.tls = True
                return None
            if line.startswith(b"AUTH PLAIN") and tls:
                return b"+OK\r\n"
            return b"-ERR no\r\n"
        return self.serve(answer), cert

    @defer.inlineCallbacks
    def test_stls_verified_and_capa_reread(self) -> Any:
        factory, cert = self.stls_server()
        c = yield self.client()
        caps = yield c.capabilities()
        self.assertTrue(caps.stls)
        caps2 = yield c.starttls(tls_options("127.0.0.1", ca_file=cert))
        self.assertFalse(caps2.stls)
        self.assertEqual(caps2.sasl, ("PLAIN",))
        self.assertTrue(c.tls)
        yield c.login(Credentials("u", "p"))
        self.assertEqual(c.mechanism_used, "PLAIN")

    @defer.inlineCallbacks
    def test_stls_injected_response_discarded(self) -> Any:
        """CVE-2011-0411 family: plaintext sent with +OK must not be read as TLS-protected."""
        factory, cert = self.stls_server(inject=b"+OK\r\nSASL INJECTED\r\n.\r\n")
        c = yield self.client()
        yield c.capabilities()
        try:
            caps = yield c.starttls(tls_options("127.0.0.1", ca_file=cert))
        except Exception:
            return  # dropping the connection is also safe
        self.assertNotIn("INJECTED", caps.sasl)

    @defer.inlineCallbacks
    def test_stls_wrong_name_fails(self) -> Any:
        factory, cert = self.stls_server()
        c = yield self.client()
        yield c.capabilities()
        yield self.assertFailure(c.starttls(tls_options("mail.example.org", ca_file=cert)), Exception)
        self.assertFalse(c.logged_in)

    @defer.inlineCallbacks
    def test_stls_untrusted_fails_unless_insecure(self) -> Any:
        factory, cert = self.stls_server()
        other = tempfile.mkdtemp()
        from tests.dovecot_fixture import make_cert
        other_cert, _ = make_cert(other)
        c = yield self.client()
        yield c.capabilities()
        yield self.assertFailure(c.starttls(tls_options("127.0.0.1", ca_file=other_cert)), Exception)
        c2 = yield self.client()
        yield c2.capabilities()
        yield c2.starttls(tls_options("127.0.0.1", insecure=True))
        self.assertTrue(c2.tls)


del os  # keep the namespace tidy for trial's discovery
