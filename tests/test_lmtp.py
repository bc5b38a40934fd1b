"""
The LMTP server (popservice.delivery.lmtp) driven by a real LMTP client,
Python's smtplib.LMTP, over TCP and UNIX sockets on this host; delivered mail
is read back through popservice's own POP3 server with poplib.

smtplib.LMTP speaks LHLO, but its data() reads one reply only: the replies of
the other accepted recipients are read with getreply(), as RFC 2033 orders.
"""

from __future__ import annotations

import errno
import os
import poplib
import shutil
import smtplib
import socket
import tempfile
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest
from zope.interface import implementer

from popservice.delivery.lmtp import LMTPFactory
from popservice.interfaces import IMailDelivery, MailboxUnavailable, NoSuchMailbox
from popservice.stores.maildir import MaildirStore, ensure_maildir
from tests import pg
from tests.support import ServerMixin, make_factory, memory_checker

SENDER = "mta@example.net"
MESSAGE = (b"From: Bob <bob@example.net>\r\nTo: alice@example.org\r\nSubject: over LMTP\r\n"
           b"Message-ID: <lmtp.1@example.net>\r\n\r\nHello Alice.\r\n.a line with a leading dot\r\n"
           b"..two dots\r\n.\r\nlast line\r\n")


@defer.inlineCallbacks
def drain(factory: LMTPFactory) -> Any:
    """Close what is still connected and wait until it is gone (no dirty reactor)."""
    for connection in list(factory.connections):
        connection.transport.abortConnection()
    for _ in range(200):
        if not factory.connections:
            return
        yield task.deferLater(reactor, 0.01, lambda: None)


class LMTPTestBase(ServerMixin, unittest.TestCase):
    max_size = 50 * 1024 * 1024

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        for user in ("alice", "bob"):
            ensure_maildir(os.path.join(self.root, user))
        self.store = MaildirStore(os.path.join(self.root, "%u"))
        self.lmtp_factory = LMTPFactory(self.store, max_size=self.max_size, hostname="lmtp.test")
        self.addCleanup(drain, self.lmtp_factory)
        port = reactor.listenTCP(0, self.lmtp_factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.lmtp_port = port.getHost().port
        self.pop3_port = self.listen(make_factory(self.store, [memory_checker(alice="secret", bob="pw")]))

    def files(self, user: str = "alice") -> list[str]:
        out = []
        for sub in ("new", "cur"):
            directory = os.path.join(self.root, user, sub)
            out += [os.path.join(directory, name) for name in os.listdir(directory)]
        return out

    def lmtp(self, host: str | None = None) -> smtplib.LMTP:
        client = smtplib.LMTP(timeout=10)
        if host is None:
            client.connect("127.0.0.1", self.lmtp_port)
        else:
            client.connect(host)
        return client

    def pop3_messages(self, user: str = "alice", password: str = "secret") -> list[bytes]:
        """Every message of C{user}, retrieved with poplib, CRLF line ends (blocking: run in a thread)."""
        client = poplib.POP3("127.0.0.1", self.pop3_port, timeout=10)
        try:
            client.user(user)
            client.pass_(password)
            count, _ = client.stat()
            return [b"".join(line + b"\r\n" for line in client.retr(i + 1)[1]) for i in range(count)]
        finally:
            client.quit()


class DeliveryOverTCP(LMTPTestBase):
    @defer.inlineCallbacks
    def test_stored_and_unknown_recipient(self) -> Any:
        """A second, unknown recipient gets 550 at RCPT while the first is stored and served over POP3."""

        def send() -> Any:
            client = self.lmtp()
            code, features = client.ehlo("mta.example.net")
            assert code == 250, (code, features)
            assert client.has_extn("pipelining") and client.has_extn("size"), features
            refused = client.sendmail(SENDER, ["alice@example.org", "nobody@example.org"], MESSAGE)
            client.quit()
            return refused

        refused = yield threads.deferToThread(send)
        self.assertEqual(list(refused), ["nobody@example.org"])
        self.assertEqual(refused["nobody@example.org"][0], 550)
        self.assertEqual(len(self.files()), 1)
        messages = yield threads.deferToThread(self.pop3_messages)
        self.assertEqual(messages, [MESSAGE])  # byte for byte, CRLF line ends on the wire

    @defer.inlineCallbacks
    def test_one_reply_per_recipient_after_the_dot(self) -> Any:
        def send() -> Any:
            client = self.lmtp()
            client.ehlo("mta.example.net")
            client.mail(SENDER)
            recipients = ("alice@example.org", "ghost@example.org", "bob@example.org")
            answers = [client.rcpt(r)[0] for r in recipients]
            first = client.data(MESSAGE)
            second = client.getreply()  # LMTP: one reply per accepted recipient, in RCPT order
            after = client.noop()  # the stream is in step: no stray reply is waiting
            client.quit()
            return answers, first, second, after

        answers, first, second, after = yield threads.deferToThread(send)
        self.assertEqual(answers, [250, 550, 250])
        self.assertEqual(first[0], 250)
        self.assertIn(b"<alice@example.org>", first[1])
        self.assertEqual(second[0], 250)
        self.assertIn(b"<bob@example.org>", second[1])
        self.assertEqual(after[0], 250)
        self.assertEqual(len(self.files("alice")), 1)
        self.assertEqual(len(self.files("bob")), 1)

    @defer.inlineCallbacks
    def test_a_retry_stores_nothing_more(self) -> Any:
        def send() -> list[tuple[int, bytes]]:
            replies = []
            for _ in range(2):  # the MTA never saw the first reply and sends again
                client = self.lmtp()
                client.ehlo("mta.example.net")
                client.mail(SENDER)
                client.rcpt("alice@example.org")
                replies.append(client.data(MESSAGE))
                client.quit()
            return replies

        replies = yield threads.deferToThread(send)
        self.assertEqual([code for code, _ in replies], [250, 250])
        self.assertIn(b"already stored", replies[1][1])
        self.assertEqual(len(self.files()), 1)
        # the same recipient twice in one transaction: one message, two 250s
        def twice() -> tuple[Any, Any]:
            client = self.lmtp()
            client.ehlo("mta.example.net")
            client.mail(SENDER)
            client.rcpt("bob@example.org")
            client.rcpt("bob@example.org")
            first = client.data(b"Subject: twice\r\n\r\nonce\r\n")
            second = client.getreply()
            client.quit()
            return first, second

        first, second = yield threads.deferToThread(twice)
        self.assertEqual((first[0], second[0]), (250, 250))
        self.assertEqual(len(self.files("bob")), 1)

    @defer.inlineCallbacks
    def test_delivery_during_a_pop3_session_shows_at_the_next_login(self) -> Any:
        def scenario() -> tuple[int, int, int, list[bytes]]:
            session = poplib.POP3("127.0.0.1", self.pop3_port, timeout=10)
            session.user("alice")
            session.pass_("secret")  # the session holds alice's mailbox lock
            before = session.stat()[0]
            client = self.lmtp()
            refused = client.sendmail(SENDER, ["alice@example.org"], MESSAGE)  # never waits for the lock
            client.quit()
            assert refused == {}, refused
            during = session.stat()[0]
            session.quit()
            return before, during, len(self.files()), self.pop3_messages()

        before, during, stored, after = yield threads.deferToThread(scenario)
        self.assertEqual((before, during, stored), (0, 0, 1))
        self.assertEqual(len(after), 1)
        self.assertIn(b"Subject: over LMTP\r\n", after[0])

    @defer.inlineCallbacks
    def test_lhlo_required_helo_and_ehlo_refused(self) -> Any:
        def talk() -> list[int]:
            client = self.lmtp()
            codes = [client.docmd("HELO", "x")[0], client.docmd("EHLO", "x")[0],
                     client.docmd("MAIL", "FROM:<a@example.net>")[0], client.docmd("LHLO", "")[0]]
            codes.append(client.ehlo("mta.example.net")[0])
            codes.append(client.docmd("MAIL", "FROM:<a@example.net>")[0])
            codes.append(client.docmd("DATA")[0])  # no recipient yet
            client.quit()
            return codes

        self.assertEqual((yield threads.deferToThread(talk)), [500, 500, 503, 501, 250, 250, 503])

    @defer.inlineCallbacks
    def test_pipelined_commands_wait_for_the_replies_of_the_message(self) -> Any:
        """Commands sent in the same packet as the final dot are answered after its replies."""

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", self.lmtp_port), timeout=10) as s:
                f = s.makefile("rb")
                f.readline()
                s.sendall(b"LHLO mta\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\n"
                          b"RCPT TO:<bob@example.org>\r\nDATA\r\n")
                lines = []
                while not lines or not lines[-1].startswith(b"354"):
                    lines.append(f.readline())
                s.sendall(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
                out = b"".join(f.readline() for _ in range(4))
                return out

        replies = yield threads.deferToThread(talk)
        codes = [line[:3] for line in replies.splitlines()]
        self.assertEqual(codes, [b"250", b"250", b"250", b"221"])
        self.assertIn(b"alice", replies.splitlines()[0])
        self.assertIn(b"bob", replies.splitlines()[1])

    @defer.inlineCallbacks
    def test_long_lines_and_dots_across_reads(self) -> Any:
        """A 300 KB line with no line end in it, leading dots, bare LF: stored byte for byte."""
        body = (b"Subject: long\r\n\r\n" + b"x" * 300_000 + b"\r\n.\r\n..\r\n.x\nnot a line end\r\n"
                + b"y" * 70_000)

        def send() -> Any:
            client = self.lmtp()
            client.ehlo("mta.example.net")
            client.mail(SENDER)
            client.rcpt("alice@example.org")
            reply = client.data(body)  # smtplib stuffs the dots and adds the final CRLF
            client.quit()
            return reply

        code, _ = yield threads.deferToThread(send)
        self.assertEqual(code, 250)
        [path] = self.files()
        with open(path, "rb") as f:
            self.assertEqual(f.read(), (body + b"\r\n").replace(b"\r\n", b"\n"))


class SizeLimit(LMTPTestBase):
    max_size = 4096

    @defer.inlineCallbacks
    def test_over_size_gets_552(self) -> Any:
        big = b"Subject: big\r\n\r\n" + b"0123456789abcdef\r\n" * 400

        def send() -> Any:
            client = self.lmtp()
            client.ehlo("mta.example.net")
            self.assertEqual(client.esmtp_features.get("size"), "4096")
            try:
                client.sendmail(SENDER, ["alice@example.org"], big)  # declares SIZE=: refused at MAIL
            except smtplib.SMTPSenderRefused as e:
                at_mail = e.smtp_code
            else:
                at_mail = 0
            client.rset()
            client.docmd("MAIL", "FROM:<%s>" % SENDER)  # no SIZE=: refused after the dot
            client.rcpt("alice@example.org")
            client.rcpt("bob@example.org")
            first = client.data(big)[0]
            second = client.getreply()[0]
            after = client.noop()[0]
            small = client.sendmail(SENDER, ["alice@example.org"], b"Subject: small\r\n\r\nfits\r\n")
            client.quit()
            return at_mail, first, second, after, small

        at_mail, first, second, after, small = yield threads.deferToThread(send)
        self.assertEqual((at_mail, first, second, after, small), (552, 552, 552, 250, {}))
        self.assertEqual(len(self.files("alice")), 1)
        self.assertEqual(len(self.files("bob")), 0)


class DeliveryOverUNIX(LMTPTestBase):
    def setUp(self) -> None:
        super().setUp()
        directory = tempfile.mkdtemp(prefix="lmtp-")  # short: socket paths are limited to ~100 bytes
        self.addCleanup(shutil.rmtree, directory, True)
        self.socket_path = os.path.join(directory, "lmtp")
        port = reactor.listenUNIX(self.socket_path, self.lmtp_factory)
        self.addCleanup(port.stopListening)

    @defer.inlineCallbacks
    def test_unix_socket(self) -> Any:
        def send() -> Any:
            client = self.lmtp(self.socket_path)
            client.ehlo("mta.example.net")
            client.mail(SENDER)
            answers = [client.rcpt("alice@example.org")[0], client.rcpt("nobody@example.org")[0]]
            reply = client.data(MESSAGE)
            client.quit()
            return answers, reply

        answers, reply = yield threads.deferToThread(send)
        self.assertEqual(answers, [250, 550])
        self.assertEqual(reply[0], 250)
        messages = yield threads.deferToThread(self.pop3_messages)
        self.assertEqual(len(messages), 1)
        self.assertTrue(messages[0].endswith(b"\r\n..two dots\r\n.\r\nlast line\r\n"), messages[0])


@implementer(IMailDelivery)
class TroubledStore:
    """A store (not a peer) failing the ways stores fail, to see the reply codes."""

    def exists(self, user: str, home: str | None) -> "defer.Deferred[bool]":
        if user == "rcpt-trouble":
            return defer.fail(MailboxUnavailable("database unavailable"))
        return defer.succeed(True)

    def deliver(self, user: str, home: str | None, message: bytes, key: str | None) -> "defer.Deferred[bool]":
        failures: dict[str, Exception] = {
            "gone": NoSuchMailbox("deleted meanwhile"),
            "busy": MailboxUnavailable("cannot write now"),
            "bug": RuntimeError("unexpected"),
        }
        if user == "full":
            try:
                raise MailboxUnavailable("cannot write now") from OSError(errno.ENOSPC, "No space left")
            except MailboxUnavailable as e:
                return defer.fail(e)
        if user in failures:
            return defer.fail(failures[user])
        return defer.succeed(True)


class StoreFailures(unittest.TestCase):
    @defer.inlineCallbacks
    def test_reply_codes(self) -> Any:
        factory = LMTPFactory(TroubledStore())
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(drain, factory)
        self.addCleanup(port.stopListening)

        def send() -> Any:
            client = smtplib.LMTP("127.0.0.1", port.getHost().port, timeout=10)
            client.ehlo("mta.example.net")
            client.mail(SENDER)
            users = ["ok", "rcpt-trouble", "gone", "busy", "full", "bug"]
            at_rcpt = [client.rcpt(u + "@example.org")[0] for u in users]
            replies = [client.data(b"Subject: x\r\n\r\ny\r\n")[0]]
            replies += [client.getreply()[0] for _ in range(len(users) - 2)]
            client.quit()
            return at_rcpt, replies

        at_rcpt, replies = yield threads.deferToThread(send)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(at_rcpt, [250, 451, 250, 250, 250, 250])
        self.assertEqual(replies, [250, 550, 451, 452, 451])


class TwistdOption(unittest.TestCase):
    """C{twistd pop3 --lmtp ENDPOINT}: LMTP beside the POP3 listeners, into the same store."""

    def test_refused_for_a_store_that_cannot_deliver(self) -> None:
        from twisted.python import usage

        from popservice import tap

        options = tap.Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions,
                                  ["--auth", "memory:a:b", "--mail", "mbox:/var/mail/%u", "--lmtp", "tcp:24"])
        self.assertIn("--lmtp", str(error))

    @defer.inlineCallbacks
    def test_lmtp_beside_pop3(self) -> Any:
        from popservice import tap

        root = os.path.abspath(self.mktemp())
        ensure_maildir(os.path.join(root, "alice"))
        directory = tempfile.mkdtemp(prefix="lmtp-")
        self.addCleanup(shutil.rmtree, directory, True)
        socket_path = os.path.join(directory, "lmtp")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            pop3_port = s.getsockname()[1]
        options = tap.Options()
        options.parseOptions(["--mail", "maildir:%s/%%u" % (root,), "--auth", "memory:alice:secret",
                              "--listen", "tcp:%d:interface=127.0.0.1" % (pop3_port,),
                              "--lmtp", "unix:%s" % (socket_path,)])
        top = tap.makeService(options)
        top.startService()

        @defer.inlineCallbacks
        def stop() -> Any:
            factories = [s.factory for s in top]
            yield top.stopService()
            for factory in factories:
                if isinstance(factory, LMTPFactory):
                    yield drain(factory)
                else:
                    yield shutdown_pop3(factory)

        self.addCleanup(stop)

        def scenario() -> list[bytes]:
            client = smtplib.LMTP(socket_path, timeout=10)
            refused = client.sendmail(SENDER, ["alice@example.org"], MESSAGE)
            client.quit()
            assert refused == {}, refused
            pop = poplib.POP3("127.0.0.1", pop3_port, timeout=10)
            pop.user("alice")
            pop.pass_("secret")
            lines = pop.retr(1)[1]
            pop.quit()
            return lines

        lines = yield threads.deferToThread(scenario)
        self.assertEqual(b"".join(line + b"\r\n" for line in lines), MESSAGE)


@defer.inlineCallbacks
def shutdown_pop3(factory: Any) -> Any:
    for connection in list(factory.connections):
        connection.transport.abortConnection()
    for _ in range(200):
        if not factory.connections:
            return
        yield task.deferLater(reactor, 0.01, lambda: None)


class IntoPostgreSQL(ServerMixin, unittest.TestCase):
    """The same LMTP server over the PostgreSQL store: it only knows IMailDelivery."""

    skip = pg.SKIP

    @defer.inlineCallbacks
    def test_lmtp_into_postgresql(self) -> Any:
        from popservice.stores.postgres import PostgresStore

        store = PostgresStore.from_description(pg.fresh_database())
        self.addCleanup(store.db.close)
        factory = LMTPFactory(store)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(drain, factory)
        self.addCleanup(port.stopListening)
        pop3_port = self.listen(make_factory(store, [memory_checker(alice="secret")]))

        def scenario() -> tuple[list[int], list[bytes]]:
            codes = []
            for _ in range(2):  # the second time a retry: stored once
                client = smtplib.LMTP("127.0.0.1", port.getHost().port, timeout=10)
                client.ehlo("mta.example.net")
                client.mail(SENDER)
                client.rcpt("alice@example.org")
                codes.append(client.data(MESSAGE)[0])
                client.quit()
            pop = poplib.POP3("127.0.0.1", pop3_port, timeout=10)
            pop.user("alice")
            pop.pass_("secret")
            messages = [b"".join(line + b"\r\n" for line in pop.retr(i + 1)[1]) for i in range(pop.stat()[0])]
            pop.quit()
            return codes, messages

        codes, messages = yield threads.deferToThread(scenario)
        self.assertEqual(codes, [250, 250])
        self.assertEqual(messages, [MESSAGE])
