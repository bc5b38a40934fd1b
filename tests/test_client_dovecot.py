"""
The client against a live Dovecot (started once per test process by
L{tests.dovecot_fixture}): plaintext, STLS and implicit TLS, every login
method Dovecot offers that the client implements, byte-exact RETR.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from popservice.client.connect import connect, open_connection
from popservice.client.protocol import AuthError, Credentials, POP3Client, TLSRequiredError
from tests import dovecot_fixture as fx

SKIP = fx.skip_reason()
USER, PASSWORD = "alice", "alice pw"


def expected_retr(content: bytes) -> bytes:
    """What RETR yields for a stored message (CRLF, last line terminated)."""
    data = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


class DovecotTestsBase(unittest.TestCase):
    skip = SKIP
    messages: list[bytes] = []

    def setUp(self) -> None:
        self.server = fx.get_dovecot()
        if not DovecotTestsBase.messages:
            DovecotTestsBase.messages = fx.varied_messages(USER)
            self.server.set_mailbox(USER, PASSWORD, DovecotTestsBase.messages)

    def url(self, scheme: str = "pop3", host: str = "127.0.0.1", auth: str = "") -> str:
        port = self.server.tls_port if scheme == "pop3s" else self.server.port
        auth = f";AUTH={auth}" if auth else ""
        return f"{scheme}://{USER}{auth}@{host}:{port}"

    @defer.inlineCallbacks
    def login(self, url: str, **kw: Any) -> Any:
        kw.setdefault("ca_file", self.server.cert)
        creds = Credentials(USER, PASSWORD, allow_plaintext=kw.pop("allow_plaintext", False))
        client = yield connect(reactor, url, creds, **kw)
        self.addCleanup(client.abort)
        return client


class DovecotLoginTests(DovecotTestsBase):
    @defer.inlineCallbacks
    def check_session(self, client: POP3Client) -> Any:
        count, size = yield client.stat()
        self.assertEqual(count, len(self.messages))
        listing = yield client.list()
        self.assertEqual(sum(e.size for e in listing), size)
        uidls = yield client.uidl()
        self.assertEqual(len({e.uid for e in uidls}), count)
        yield client.quit()

    @defer.inlineCallbacks
    def test_stls_default_strongest_mechanism(self) -> Any:
        c = yield self.login(self.url())
        self.assertTrue(c.tls)
        self.assertIsNotNone(c.capa_before_tls)
        self.assertTrue(c.capa_before_tls.stls)
        self.assertEqual(c.mechanism_used, "SCRAM-SHA-256")
        yield self.check_session(c)

    @defer.inlineCallbacks
    def test_implicit_tls_by_name(self) -> Any:
        c = yield self.login(self.url("pop3s", host="localhost"))
        self.assertTrue(c.tls)
        yield self.check_session(c)

    @defer.inlineCallbacks
    def test_implicit_tls_ip_address_checked(self) -> Any:
        """RFC 7817 name checks include IP addresses (the certificate has an IP SAN)."""
        c = yield self.login(self.url("pop3s", host="127.0.0.1"))
        yield self.check_session(c)

    @defer.inlineCallbacks
    def test_untrusted_certificate_rejected(self) -> Any:
        import tempfile
        other_cert, _ = fx.make_cert(tempfile.mkdtemp())
        yield self.assertFailure(self.login(self.url("pop3s"), ca_file=other_cert), Exception)
        yield self.assertFailure(self.login(self.url(), ca_file=other_cert), Exception)

    @defer.inlineCallbacks
    def test_insecure_option(self) -> Any:
        c = yield self.login(self.url("pop3s"), ca_file=None, insecure=True)
        yield self.check_session(c)

    @defer.inlineCallbacks
    def test_each_mechanism_plaintext(self) -> Any:
        for mech in ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "+APOP", "USER"):
            c = yield self.login(self.url(auth=mech), starttls="none", allow_plaintext=True)
            self.assertFalse(c.tls)
            self.assertEqual(c.mechanism_used, mech.lstrip("+"))
            yield self.check_session(c)

    @defer.inlineCallbacks
    def test_each_mechanism_over_stls(self) -> Any:
        for mech in ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "+APOP", "USER"):
            c = yield self.login(self.url(auth=mech))
            self.assertTrue(c.tls)
            self.assertEqual(c.mechanism_used, mech.lstrip("+"))
            yield self.check_session(c)

    @defer.inlineCallbacks
    def test_plaintext_password_refused_without_tls(self) -> Any:
        creds = Credentials(USER, PASSWORD, mechanisms=("PLAIN",))
        d = connect(reactor, self.url(), creds, starttls="none")
        yield self.assertFailure(d, Exception)

    @defer.inlineCallbacks
    def test_stls_required_by_default(self) -> Any:
        # the plaintext port does offer STLS; "required" must succeed, and a server
        # without STLS is refused (simulated by asking TLS of a client that cannot see it)
        c = yield open_connection(reactor, self.url(), ca_file=self.server.cert)
        self.addCleanup(c.abort)
        self.assertTrue(c.tls)
        self.assertTrue(issubclass(TLSRequiredError, Exception))

    @defer.inlineCallbacks
    def test_wrong_password_is_auth_error(self) -> Any:
        """From 127.0.0.2 so Dovecot's auth penalty does not slow other tests."""
        c = POP3Client()
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port, bindAddress=("127.0.0.2", 0))
        yield connectProtocol(ep, c)
        self.addCleanup(c.abort)
        yield c.greeting
        yield self.assertFailure(
            c.login(Credentials(USER, "wrong", mechanisms=("USER",), allow_plaintext=True)), AuthError)


class DovecotRetrieveTests(DovecotTestsBase):
    @defer.inlineCallbacks
    def by_message_id(self, client: POP3Client) -> Any:
        count, _ = yield client.stat()
        out = {}
        for n in range(1, count + 1):
            data = yield client.retrieve(n)
            mid = [line for line in data.split(b"\r\n") if line.startswith(b"Message-ID:")][0]
            out[mid] = (n, data)
        return out

    @defer.inlineCallbacks
    def test_retrieve_byte_exact_plain_and_tls(self) -> Any:
        expected = {}
        for content in self.messages:
            mid = [line for line in content.split(b"\n") if line.startswith(b"Message-ID:")][0]
            expected[mid] = expected_retr(content)
        for url, kw in ((self.url(), {"starttls": "none", "allow_plaintext": True}),
                        (self.url(), {}), (self.url("pop3s"), {})):
            c = yield self.login(url, **kw)
            got = yield self.by_message_id(c)
            self.assertEqual({k: v[1] for k, v in got.items()}, expected)
            yield c.quit()

    @defer.inlineCallbacks
    def test_streaming_consumer_and_lf(self) -> Any:
        c = yield self.login(self.url())
        listing = yield c.list()
        big = max(listing, key=lambda e: e.size)
        chunks: list[bytes] = []
        yield c.retrieve(big.number, chunks.append, crlf=False)
        self.assertGreater(len(chunks), 1)
        data = b"".join(chunks)
        self.assertNotIn(b"\r\n", data)
        self.assertEqual(len(data) + data.count(b"\n"), big.size)

    @defer.inlineCallbacks
    def test_pipelined_retrieve_all(self) -> Any:
        c = yield self.login(self.url())
        self.assertTrue(c.capa.pipelining)
        listing = yield c.list()
        results = yield defer.gatherResults([c.retrieve(e.number) for e in listing])
        self.assertEqual([len(r) for r in results],
                         [e.size + (0 if e.size == 0 else 0) for e in listing])
        yield c.quit()

    @defer.inlineCallbacks
    def test_top(self) -> Any:
        c = yield self.login(self.url())
        head = yield c.top(1, 0)
        self.assertTrue(head.endswith(b"\r\n\r\n"))
        self.assertIn(b"Subject:", head)
        two = yield c.top(1, 2)
        self.assertEqual(two[len(head):].count(b"\r\n"), 2)

    @defer.inlineCallbacks
    def test_dele_rset_quit(self) -> Any:
        user = "deleter"
        msgs = fx.bulk_messages(user, 3, 500)
        self.server.set_mailbox(user, "pw", msgs)
        creds = Credentials(user, "pw")
        c = yield connect(reactor, f"pop3://127.0.0.1:{self.server.port}", creds, ca_file=self.server.cert)
        uidls = yield c.uidl()
        yield c.delete(1)
        yield c.reset()
        yield c.delete(2)
        yield c.quit()
        c = yield connect(reactor, f"pop3://127.0.0.1:{self.server.port}", creds, ca_file=self.server.cert)
        after = yield c.uidl()
        self.assertEqual([e.uid for e in after], [uidls[0].uid, uidls[2].uid])
        yield c.quit()
        self.assertEqual(len(os.listdir(os.path.join(self.server.maildir(user), "cur"))), 2)
