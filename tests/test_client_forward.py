"""
Forwarding fetched mail by LMTP and SMTP (popservice.client.forward), for
real over loopback sockets: popservice's own POP3 server (over a
MemoryStore) is the source, popservice's LMTP service (an in-process
LMTPFactory over a MaildirStore, wrapped to count every delivery and to fail
on demand) and Twisted's own ESMTP server (an in-process twisted.mail.smtp
ESMTP with a delivery that records messages) receive.  Both fetch engines:
the Twisted one in-process, the blocking one in a thread.

Exactly once: a message is DELE'd or recorded only after the receiving
server accepted it for every recipient; a 4xx keeps it on the POP3 server
for the next run (exit 75); a 5xx is reported and kept (exit 1), or recorded
and deleted with on_reject="delete".
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from typing import Any

from twisted.internet import defer, protocol, reactor, task, threads, utils
from twisted.mail import smtp
from twisted.trial import unittest
from zope.interface import implementer

from popservice.client import blocking
from popservice.client.cli_common import EX_FAIL, EX_OK, EX_TEMPFAIL, describe_error, result_status
from popservice.client.common import Credentials
from popservice.client.connect import connect
from popservice.client.delivery import FetchOptions, FetchResult, make_target
from popservice.client.fetch import fetch
from popservice.client.forward import ForwardError, envelope_sender, parse_forward_spec, wire_form
from popservice.client.url import parse_url
from popservice.delivery.key import message_id
from popservice.delivery.lmtp import LMTPFactory
from popservice.interfaces import IMailDelivery, MailboxUnavailable
from popservice.stores.maildir import MaildirStore, ensure_maildir
from popservice.stores.memory import MemoryStore
from tests.support import ServerMixin, make_factory, memory_checker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "carol pw"


def message(i: int, body: bytes = b"hello\n") -> bytes:
    return (b"Return-Path: <sender%d@example.net>\nFrom: Sender <sender@example.net>\n"
            b"To: carol@example.org\nSubject: forwarded %d\n" % (i, i)
            + b"Message-ID: <fwd.%d@popservice.test>\n\n" % i + body)


def maildir_ids(path: str) -> list[str]:
    out = []
    for sub in ("new", "cur"):
        d = os.path.join(path, sub)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            with open(os.path.join(d, name), "rb") as f:
                out.append(message_id(f.read()) or "?")
    return sorted(out)


@implementer(IMailDelivery)
class CountingStore:
    """A MaildirStore that records every delivery attempt, and fails for the users in C{fail}."""

    def __init__(self, root: str) -> None:
        self.inner = MaildirStore(os.path.join(root, "%u"))
        #: (user, Message-ID) of every message the LMTP server handed over (duplicates included)
        self.attempts: list[tuple[str, str | None]] = []
        #: user -> exception to fail their deliveries with
        self.fail: dict[str, Exception] = {}

    def deliver(self, user: str, home: str | None, message: bytes, key: str | None) -> Any:
        self.attempts.append((user, message_id(message)))
        if user in self.fail:
            return defer.fail(self.fail[user])
        return self.inner.deliver(user, home, message, key)

    def exists(self, user: str, home: str | None) -> Any:
        return self.inner.exists(user, home)


class _Message:
    def __init__(self, server: RecordingSMTP, recipient: bytes) -> None:
        self.server = server
        self.recipient = recipient
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Any:
        if self.server.fail_at_end:
            return defer.fail(RuntimeError("refused at the end of DATA"))
        data = b"\n".join(self.lines) + b"\n"
        self.server.messages.append((self.recipient, data))
        return defer.succeed(b"stored")

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class RecordingSMTP(protocol.ServerFactory):
    """Twisted's ESMTP server with a delivery that records (recipient, message)."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.senders: list[bytes] = []
        #: recipients answered 451 at RCPT
        self.busy: set[bytes] = set()
        #: the whole message refused after the dot (Twisted's server answers 550)
        self.fail_at_end = False
        self.connections: set[smtp.ESMTP] = set()

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:
        factory = self

        class Server(smtp.ESMTP):
            def connectionMade(self) -> None:
                factory.connections.add(self)
                smtp.ESMTP.connectionMade(self)

            def connectionLost(self, reason: Any = None) -> None:
                factory.connections.discard(self)
                smtp.ESMTP.connectionLost(self, reason)

        server = Server()
        server.delivery = self
        server.host = b"smtp.test"
        server.factory = self
        return server

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        self.senders.append(bytes(origin))
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        address = bytes(user.dest)
        if address in self.busy:
            raise smtp.SMTPServerError(451, "Mailbox busy, try again later")
        if address.startswith(b"nobody@"):
            raise smtp.SMTPBadRcpt(user)
        return lambda: _Message(self, address)


@defer.inlineCallbacks
def drain(connections: Any) -> Any:
    for connection in list(connections):
        connection.transport.abortConnection()
    for _ in range(200):
        if not connections:
            return
        yield task.deferLater(reactor, 0.01, lambda: None)


class SpecTests(unittest.TestCase):
    def test_specs(self) -> None:
        self.assertEqual(parse_forward_spec("lmtp:127.0.0.1:24"), ("lmtp", ("127.0.0.1", 24)))
        self.assertEqual(parse_forward_spec("lmtp:/run/dovecot/lmtp"), ("lmtp", "/run/dovecot/lmtp"))
        self.assertEqual(parse_forward_spec("smtp:localhost"), ("smtp", ("localhost", 25)))
        self.assertEqual(parse_forward_spec("smtp:[::1]:2525"), ("smtp", ("::1", 2525)))
        for bad in ("lmtp:localhost", "smtp:/tmp/sock", "lmtp:", "smtp::25", "smtp:h:99999", "smtp:::1:25",
                    "lmtp:[::1", "imap:x"):
            self.assertRaises(ValueError, parse_forward_spec, bad)

    def test_smtp_needs_a_recipient_and_lmtp_defaults_to_the_local_user(self) -> None:
        self.assertRaises(ValueError, make_target, "smtp:localhost:25", username="u", state_dir=self.mktemp())
        import getpass

        target: Any = make_target("lmtp:127.0.0.1:24", username="u", state_dir=self.mktemp())
        self.assertEqual(target.recipients, [getpass.getuser()])
        self.assertRaises(ValueError, make_target, "maildir:/tmp/x", username="u", state_dir="/tmp",
                          recipients=["a@b"])

    def test_envelope_and_line_ends(self) -> None:
        self.assertEqual(envelope_sender(wire_form(message(3))), "sender3@example.net")
        self.assertEqual(envelope_sender(b"From: x\r\n\r\nReturn-Path: <late@x>\r\n"), "")
        self.assertEqual(envelope_sender(b"Return-Path: <>\r\n\r\n"), "")
        self.assertEqual(wire_form(b"a\nb\r\nc\rd\r\n"), b"a\r\nb\r\nc\r\nd\r\n")


class ForwardBase(ServerMixin, unittest.TestCase):
    """A POP3 source (carol, MemoryStore), an LMTP server (TCP and UNIX) and an ESMTP server."""

    ENGINE = "twisted"
    COUNT = 5

    def setUp(self) -> None:
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.messages = [message(i) for i in range(1, self.COUNT + 1)]
        self.pop3 = MemoryStore({"carol": list(self.messages)})
        self.pop3_port = self.listen(make_factory(self.pop3, [memory_checker(carol=PASSWORD)]))
        mail = os.path.join(self.tmp, "lmtp-mail")
        for user in ("alice", "bob"):
            ensure_maildir(os.path.join(mail, user))
        self.mail = mail
        self.store = CountingStore(mail)
        self.lmtp_factory = LMTPFactory(self.store, hostname="lmtp.test")
        self.addCleanup(drain, self.lmtp_factory.connections)
        port = reactor.listenTCP(0, self.lmtp_factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.lmtp_port = port.getHost().port
        sockets = tempfile.mkdtemp(prefix="pfwd-")  # AF_UNIX paths are short: not under _trial_temp
        self.addCleanup(shutil.rmtree, sockets, True)
        self.socket_path = os.path.join(sockets, "lmtp.sock")
        unix = reactor.listenUNIX(self.socket_path, self.lmtp_factory)
        self.addCleanup(unix.stopListening)
        self.smtp = RecordingSMTP()
        self.addCleanup(drain, self.smtp.connections)
        port = reactor.listenTCP(0, self.smtp, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.smtp_port = port.getHost().port
        self.runs = 0

    def on_server(self) -> list[bytes]:
        return self.pop3.messages.get("carol", [])

    @defer.inlineCallbacks
    def run_fetch(self, spec: str, recipients: list[str], keep: bool = False,
                  on_reject: str = "keep") -> Any:
        """One fetch of carol into C{spec}; fires with the FetchResult or the exception raised."""
        self.runs += 1
        state = os.path.join(self.tmp, "state")
        warnings: list[str] = []
        target = make_target(spec, username="carol", state_dir=state, recipients=recipients, timeout=10,
                             warn=warnings.append)
        options = FetchOptions(keep=keep, on_reject=on_reject)
        creds = Credentials("carol", PASSWORD, allow_plaintext=True)
        url = f"pop3://carol@127.0.0.1:{self.pop3_port}"
        try:
            if self.ENGINE == "twisted":
                client = yield connect(reactor, url, creds, starttls="none", timeout=10)
                try:
                    result = yield fetch(client, target, state, options)
                except BaseException:
                    client.abort()
                    raise
            else:
                result = yield threads.deferToThread(blocking.run_fetch, parse_url(url), creds, target, state,
                                                     options, None, starttls="none", timeout=10)
        except Exception as e:
            return e
        finally:
            target_any: Any = target
            target_any.disconnect()
        self.assertIsInstance(result, FetchResult)
        result.warnings.extend(warnings)
        return result

    def delivered(self, user: str) -> list[str]:
        return maildir_ids(os.path.join(self.mail, user))


class LMTPForwarding(ForwardBase):
    @defer.inlineCallbacks
    def test_exactly_once_over_tcp_and_unix_socket(self) -> Any:
        r = yield self.run_fetch(f"lmtp:127.0.0.1:{self.lmtp_port}", ["alice"])
        self.assertEqual((r.fetched, r.deleted, r.deferred, r.rejected), (self.COUNT, self.COUNT, 0, 0))
        self.assertEqual(result_status(r), EX_OK)
        expected = sorted(message_id(m) or "" for m in self.messages)
        self.assertEqual(self.delivered("alice"), expected)
        self.assertEqual(len(self.store.attempts), self.COUNT)  # handed over once each: no retries
        self.assertEqual(self.on_server(), [])
        # new mail, over the UNIX socket; the old messages are not sent again
        extra = [message(i) for i in range(10, 13)]
        self.pop3.messages["carol"] = list(extra)
        r = yield self.run_fetch(f"lmtp:{self.socket_path}", ["alice"])
        self.assertEqual((r.fetched, r.deleted), (3, 3))
        self.assertEqual(self.delivered("alice"), sorted(expected + [message_id(m) or "" for m in extra]))
        self.assertEqual(len(self.store.attempts), self.COUNT + 3)

    @defer.inlineCallbacks
    def test_bytes_dots_and_line_ends(self) -> Any:
        body = b".leading dot\n..two dots\n.\nlone \r CR\nlast line"
        self.pop3.messages["carol"] = [message(1, body)]
        r = yield self.run_fetch(f"lmtp:127.0.0.1:{self.lmtp_port}", ["alice"])
        self.assertEqual(r.fetched, 1)
        d = os.path.join(self.mail, "alice", "new")
        (name,) = os.listdir(d)
        with open(os.path.join(d, name), "rb") as f:
            stored = f.read().replace(b"\r\n", b"\n")
        # the POP3 server ends the last line; a lone CR went out as a line end (no bare CR on the wire)
        self.assertEqual(stored, message(1, body.replace(b" \r ", b" \n ")) + b"\n")

    @defer.inlineCallbacks
    def test_temporary_failure_keeps_the_message_for_the_next_run(self) -> Any:
        self.store.fail["alice"] = MailboxUnavailable("disk busy")  # LMTP 451 after the dot
        r = yield self.run_fetch(f"lmtp:127.0.0.1:{self.lmtp_port}", ["alice"])
        self.assertEqual((r.fetched, r.deleted, r.deferred), (0, 0, self.COUNT))
        self.assertEqual(result_status(r), EX_TEMPFAIL)
        self.assertIn("451", r.warnings[0])
        self.assertIn("left on the server for the next run", r.summary() + r.warnings[0])
        self.assertEqual(len(self.on_server()), self.COUNT)
        self.assertEqual(self.delivered("alice"), [])
        del self.store.fail["alice"]
        r = yield self.run_fetch(f"lmtp:127.0.0.1:{self.lmtp_port}", ["alice"])
        self.assertEqual((r.fetched, r.deleted, r.deferred), (self.COUNT, self.COUNT, 0))
        self.assertEqual(r.warnings, [])  # a refusal left no "interrupted" record behind
        self.assertEqual(self.delivered("alice"), sorted(message_id(m) or "" for m in self.messages))
        self.assertEqual(self.on_server(), [])

    @defer.inlineCallbacks
    def test_every_recipient_must_accept(self) -> Any:
        """LMTP's per-recipient replies: bob's 451 keeps the message; alice's copy is not doubled later."""
        self.pop3.messages["carol"] = self.messages[:2]
        self.store.fail["bob"] = MailboxUnavailable("over quota for now")
        r = yield self.run_fetch(f"lmtp:127.0.0.1:{self.lmtp_port}", ["alice", "bob"])
        self.assertEqual((r.fetched, r.deferred), (0, 2))
        self.assertIn("accepted for <alice>", r.warnings[0])
        self.assertEqual(len(self.on_server()), 2)
        self.assertEqual(len(self.delivered("alice")), 2)
        del self.store.fail["bob"]
        r = yield self.run_fetch(f"lmtp:127.0.0.1:{self.lmtp_port}", ["alice", "bob"])
        self.assertEqual((r.fetched, r.deleted, r.deferred), (2, 2, 0))
        self.assertEqual(len(self.delivered("bob")), 2)
        # sent to alice twice, stored once: popservice's LMTP server knows the retry by its key
        self.assertEqual(len(self.delivered("alice")), 2)
        self.assertEqual(self.on_server(), [])

    @defer.inlineCallbacks
    def test_permanent_failure_reported_and_kept_or_dropped(self) -> Any:
        self.pop3.messages["carol"] = self.messages[:2]
        r = yield self.run_fetch(f"lmtp:127.0.0.1:{self.lmtp_port}", ["ghost"])  # no mailbox: 550 at RCPT
        self.assertEqual((r.fetched, r.deleted, r.rejected), (0, 0, 2))
        self.assertEqual(result_status(r), EX_FAIL)
        self.assertIn("550", r.warnings[0])
        self.assertIn("kept on server", r.summary())
        self.assertEqual(len(self.on_server()), 2)
        self.assertEqual(self.store.attempts, [])  # refused at RCPT: no DATA at all
        r = yield self.run_fetch(f"lmtp:127.0.0.1:{self.lmtp_port}", ["ghost"], on_reject="delete")
        self.assertEqual((r.fetched, r.deleted, r.rejected), (0, 2, 2))
        self.assertEqual(result_status(r), EX_OK)
        self.assertIn("recorded and dropped", r.summary())
        self.assertEqual(self.on_server(), [])

    @defer.inlineCallbacks
    def test_unreachable_server_stops_the_run_and_deletes_nothing(self) -> Any:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
        s.close()
        e = yield self.run_fetch(f"lmtp:127.0.0.1:{closed}", ["alice"])
        self.assertIsInstance(e, ForwardError)
        text, status = describe_error(e)
        self.assertEqual(status, EX_TEMPFAIL)
        self.assertIn("connection refused", text)
        self.assertEqual(len(self.on_server()), self.COUNT)
        e = yield self.run_fetch(f"lmtp:{self.tmp}/no-such-socket", ["alice"])
        self.assertIsInstance(e, ForwardError)
        r = yield self.run_fetch(f"lmtp:127.0.0.1:{self.lmtp_port}", ["alice"])
        self.assertEqual(r.fetched, self.COUNT)
        self.assertEqual(len(self.store.attempts), self.COUNT)


class SMTPForwarding(ForwardBase):
    @defer.inlineCallbacks
    def test_exactly_once(self) -> Any:
        r = yield self.run_fetch(f"smtp:127.0.0.1:{self.smtp_port}", ["carol@example.org"])
        self.assertEqual((r.fetched, r.deleted), (self.COUNT, self.COUNT))
        got = sorted(message_id(data) or "" for _, data in self.smtp.messages)
        self.assertEqual(got, sorted(message_id(m) or "" for m in self.messages))
        self.assertEqual({rcpt for rcpt, _ in self.smtp.messages}, {b"carol@example.org"})
        self.assertEqual(sorted(self.smtp.senders), sorted(b"sender%d@example.net" % i
                                                           for i in range(1, self.COUNT + 1)))
        self.assertEqual(self.smtp.messages[0][1], message(1))
        self.assertEqual(self.on_server(), [])
        r = yield self.run_fetch(f"smtp:127.0.0.1:{self.smtp_port}", ["carol@example.org"])
        self.assertEqual(r.fetched, 0)
        self.assertEqual(len(self.smtp.messages), self.COUNT)

    @defer.inlineCallbacks
    def test_4xx_keeps_the_message_for_the_next_poll(self) -> Any:
        self.smtp.busy.add(b"carol@example.org")
        r = yield self.run_fetch(f"smtp:127.0.0.1:{self.smtp_port}", ["carol@example.org"])
        self.assertEqual((r.fetched, r.deferred, r.deleted), (0, self.COUNT, 0))
        self.assertEqual(result_status(r), EX_TEMPFAIL)
        self.assertIn("451", r.warnings[0])
        self.assertEqual(len(self.on_server()), self.COUNT)
        self.smtp.busy.clear()
        r = yield self.run_fetch(f"smtp:127.0.0.1:{self.smtp_port}", ["carol@example.org"])
        self.assertEqual((r.fetched, r.deferred, r.deleted), (self.COUNT, 0, self.COUNT))
        self.assertEqual(len(self.smtp.messages), self.COUNT)

    @defer.inlineCallbacks
    def test_5xx_after_data_is_reported_and_kept(self) -> Any:
        self.smtp.fail_at_end = True  # Twisted's server: 550 after the dot
        r = yield self.run_fetch(f"smtp:127.0.0.1:{self.smtp_port}", ["carol@example.org"], keep=True)
        self.assertEqual((r.fetched, r.rejected), (0, self.COUNT))
        self.assertEqual(result_status(r), EX_FAIL)
        self.assertIn("at the end of DATA: 550", r.warnings[0])
        self.assertEqual(len(self.on_server()), self.COUNT)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), self.COUNT)  # Twisted's server logs each
        self.smtp.fail_at_end = False
        r = yield self.run_fetch(f"smtp:127.0.0.1:{self.smtp_port}", ["carol@example.org"], keep=True)
        self.assertEqual(r.fetched, self.COUNT)
        r = yield self.run_fetch(f"smtp:127.0.0.1:{self.smtp_port}", ["carol@example.org"], keep=True)
        self.assertEqual((r.fetched, r.already), (0, self.COUNT))
        self.assertEqual(len(self.smtp.messages), self.COUNT)

    @defer.inlineCallbacks
    def test_one_bad_recipient_sends_to_nobody(self) -> Any:
        self.pop3.messages["carol"] = self.messages[:1]
        recipients = ["carol@example.org", "nobody@example.org"]
        r = yield self.run_fetch(f"smtp:127.0.0.1:{self.smtp_port}", recipients)
        self.assertEqual((r.fetched, r.rejected), (0, 1))
        self.assertEqual(self.smtp.messages, [])  # reset before DATA


class LMTPForwardingBlocking(LMTPForwarding):
    ENGINE = "blocking"


class SMTPForwardingBlocking(SMTPForwarding):
    ENGINE = "blocking"


class CommandLine(ForwardBase):
    """`popservice fetch --to lmtp:...` as a process: exit statuses, and no smtplib for a Maildir."""

    COUNT = 3

    def cli(self, *args: str) -> Any:
        code = ("import sys\nfrom popservice.client import cli\nrc = cli.main(sys.argv[1:])\n"
                "names = ('smtplib', 'popservice.client.forward')\n"
                "print('LOADED', sorted(m for m in names if m in sys.modules))\nsys.exit(rc)\n")
        env = dict(os.environ, POPSERVICE_PASSWORD=PASSWORD)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        argv = ["-c", code, "fetch", f"pop3://carol@127.0.0.1:{self.pop3_port}", "--starttls", "none",
                "--allow-plaintext", "--state-dir", os.path.join(self.tmp, "cli-state"), *args]
        return utils.getProcessOutputAndValue(sys.executable, argv, env=env, path=ROOT)

    @defer.inlineCallbacks
    def test_exit_statuses_and_modules(self) -> Any:
        self.store.fail["alice"] = MailboxUnavailable("busy")
        out, err, rc = yield self.cli("--to", f"lmtp:127.0.0.1:{self.lmtp_port}", "--recipient", "alice")
        self.assertEqual(rc, EX_TEMPFAIL, err)
        self.assertIn(b"3 deferred by the receiving server", err)
        self.assertIn(b"LOADED ['popservice.client.forward', 'smtplib']", out)
        self.assertEqual(len(self.on_server()), 3)
        del self.store.fail["alice"]
        out, err, rc = yield self.cli("--to", f"lmtp:127.0.0.1:{self.lmtp_port}", "--recipient", "alice",
                                      "--engine", "twisted")
        self.assertEqual(rc, 0, err)
        self.assertIn(b"3 messages fetched", err)
        self.assertEqual(self.on_server(), [])
        out, err, rc = yield self.cli("--to", f"smtp:127.0.0.1:{self.smtp_port}")
        self.assertEqual(rc, 2, err)
        self.assertIn(b"needs a recipient", err)
        # the plain Maildir path loads neither
        self.pop3.messages["carol"] = [message(7)]
        out, err, rc = yield self.cli("--to", f"maildir:{self.tmp}/Mail")
        self.assertEqual(rc, 0, err)
        self.assertIn(b"LOADED []", out)
