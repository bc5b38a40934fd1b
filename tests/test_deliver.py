"""
Delivery outside LMTP: C{popservice deliver} run as a subprocess (exit codes
as sendmail/Postfix read them, the bytes stored), the Maildir store's
delivery and its idempotency record, the idempotency key, and the
twisted.mail domain behind twisted.mail's own ESMTP server (smtplib as the peer).
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.mail import mail
from twisted.trial import unittest

from popservice.delivery.domain import DeliveryDomain
from popservice.delivery.key import delivery_key, message_id
from popservice.interfaces import IMailDelivery, MailboxUnavailable, NoSuchMailbox
from popservice.stores.maildir import MaildirStore, ensure_maildir
from popservice.stores.maildir import delivery as maildir_delivery
from popservice.stores.maildir.delivery import DELIVERED_FILE_NAME, DeliveredKeys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = b"From: Bob <bob@example.net>\nSubject: piped\nMessage-ID: <pipe.1@example.net>\n\nHello.\n.dot\n"


def run_deliver(*args: str, stdin: bytes = MESSAGE) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "popservice.cli", "deliver", *args], input=stdin,
                          capture_output=True, env=env, timeout=60)


def stored_files(maildir: str) -> list[str]:
    return sorted(os.path.join(maildir, sub, name) for sub in ("new", "cur")
                  for name in os.listdir(os.path.join(maildir, sub)))


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class DeliverCommand(unittest.TestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        ensure_maildir(os.path.join(self.root, "alice"))
        self.mail = "maildir:%s/%%u" % (self.root,)

    def test_stored_once_then_retry_is_a_success(self) -> None:
        envelope = b"From bob@example.net  Tue Dec  1 12:00:00 2026\n"
        first = run_deliver("alice", "--mail", self.mail, stdin=envelope + MESSAGE)
        self.assertEqual(first.returncode, 0, first.stderr)
        [path] = stored_files(os.path.join(self.root, "alice"))
        self.assertEqual(read(path), MESSAGE)  # the mbox envelope line is not part of the message
        self.assertIn(",W=%d" % (len(MESSAGE) + MESSAGE.count(b"\n"),), path)
        again = run_deliver("alice", "--mail", self.mail)  # same message: 0, nothing stored
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn(b"already stored", again.stderr)
        self.assertEqual(len(stored_files(os.path.join(self.root, "alice"))), 1)

    def test_unknown_user_is_67(self) -> None:
        result = run_deliver("nobody", "--mail", self.mail)
        self.assertEqual(result.returncode, 67, result.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.root, "nobody")))
        result = run_deliver("../alice", "--mail", self.mail)
        self.assertEqual(result.returncode, 67, result.stderr)

    def test_temporary_failure_is_75(self) -> None:
        box = os.path.join(self.root, "alice")
        os.rmdir(os.path.join(box, "tmp"))
        with open(os.path.join(box, "tmp"), "wb"):
            pass  # tmp/ is a file: nothing can be written (root or not)
        result = run_deliver("alice", "--mail", self.mail)
        self.assertEqual(result.returncode, 75, result.stderr)
        self.assertEqual(stored_files(box), [])
        # a broken configuration keeps the mail queued too
        self.assertEqual(run_deliver("alice", "--mail", "mbox:/var/mail/%u").returncode, 75)
        missing = os.path.join(self.root, "no-such-passwd")
        self.assertEqual(run_deliver("alice", "--mail", self.mail, "--passwd", missing).returncode, 75)

    def test_bad_input_is_65(self) -> None:
        self.assertEqual(run_deliver("alice", "--mail", self.mail, stdin=b"").returncode, 65)
        result = run_deliver("alice", "--mail", self.mail, "--max-size", "10")
        self.assertEqual(result.returncode, 65, result.stderr)
        self.assertEqual(stored_files(os.path.join(self.root, "alice")), [])

    def test_home_from_passwd_file(self) -> None:
        home = os.path.join(self.root, "home", "carol")
        os.makedirs(home)
        passwd = os.path.join(self.root, "passwd")
        with open(passwd, "w") as f:
            f.write("carol:{PLAIN}pw::::%s::\n" % (home,))
        result = run_deliver("carol", "--mail", "maildir:~/Maildir", "--passwd", passwd,
                             stdin=b"Subject: crlf\r\n\r\nline\r\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        [path] = stored_files(os.path.join(home, "Maildir"))  # made at delivery: the home exists
        self.assertEqual(read(path), b"Subject: crlf\n\nline\n")
        result = run_deliver("dave", "--mail", "maildir:~/Maildir", "--passwd", passwd)
        self.assertEqual(result.returncode, 67, result.stderr)


class MaildirDelivery(unittest.TestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.store = MaildirStore(os.path.join(self.root, "%u"))

    @defer.inlineCallbacks
    def test_exists(self) -> Any:
        self.assertTrue(IMailDelivery.providedBy(self.store))
        self.assertFalse((yield self.store.exists("alice", None)))
        ensure_maildir(os.path.join(self.root, "alice"))
        self.assertTrue((yield self.store.exists("alice", None)))
        self.assertFalse((yield self.store.exists("../etc", None)))
        yield self.assertFailure(self.store.deliver("../etc", None, MESSAGE, None), NoSuchMailbox)
        home_store = MaildirStore("~/Maildir")
        home = os.path.join(self.root, "home")
        self.assertFalse((yield home_store.exists("carol", home)))
        self.assertFalse((yield home_store.exists("carol", None)))
        os.makedirs(home)
        self.assertTrue((yield home_store.exists("carol", home)))

    @defer.inlineCallbacks
    def test_line_ends_and_names(self) -> Any:
        for message in (b"a\r\nb\r\n", b"a\nb", b"lone\rcr\r\r\n"):
            self.assertTrue((yield self.store.deliver("alice", None, message, None)))
        box = os.path.join(self.root, "alice")
        contents = sorted(read(p) for p in stored_files(box))
        # LF on disk when that can be undone exactly; as received otherwise
        self.assertEqual(contents, sorted([b"a\nb\n", b"a\nb", b"lone\rcr\r\r\n"]))
        for path in stored_files(box):
            name = os.path.basename(path)
            self.assertRegex(name, r"^[0-9]{10}\.M[0-9]{6}P[0-9]+Q[0-9]+R[0-9a-f]{8}\.[^/:,]+"
                                   r",S=[0-9]+,W=[0-9]+$")
        self.assertEqual(os.listdir(os.path.join(box, "tmp")), [])

    @defer.inlineCallbacks
    def test_crash_between_the_link_and_the_key_record_gives_a_duplicate_not_a_loss(self) -> Any:
        def crash(self: DeliveredKeys, digest: bytes, now: float) -> None:
            raise OSError(28, "No space left on device")

        self.patch(DeliveredKeys, "record", crash)
        self.assertTrue((yield self.store.deliver("alice", None, MESSAGE, "k1")))  # stored; key lost
        self.assertTrue((yield self.store.deliver("alice", None, MESSAGE, "k1")))  # the retry: stored again
        self.assertEqual(len(stored_files(os.path.join(self.root, "alice"))), 2)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_write_failure_is_temporary_and_leaves_nothing(self) -> Any:
        box = os.path.join(self.root, "alice")
        ensure_maildir(box)
        os.rmdir(os.path.join(box, "new"))
        with open(os.path.join(box, "new"), "wb"):
            pass
        failure = yield self.assertFailure(self.store.deliver("alice", None, MESSAGE, "k"),
                                           MailboxUnavailable)
        self.assertNotIsInstance(failure, NoSuchMailbox)
        self.assertFalse(os.path.exists(os.path.join(box, DELIVERED_FILE_NAME)))

    def test_key_record_bounds(self) -> None:
        box = os.path.join(self.root, "bob")
        ensure_maildir(box)
        keys = DeliveredKeys(box, keep_days=7, keep_keys=8)
        day = 86400.0
        digests = [DeliveredKeys.digest("key %d" % i) for i in range(30)]
        with keys.locked():
            for i, digest in enumerate(digests[:20]):
                keys.record(digest, 1_000_000_000 + i)
        # never more than a quarter over the bound; the newest keys stay
        self.assertLessEqual(len(read(keys.path).splitlines()), 10)
        self.assertTrue(keys.contains(digests[19]))
        self.assertFalse(keys.contains(digests[0]))
        # keys older than keep_days go at the next compaction
        with keys.locked():
            keys.record(digests[20], 1_000_000_000 + 9 * day)
        self.assertEqual(read(keys.path).splitlines(), [b"%010d %s" % (1_000_000_000 + 9 * day, digests[20])])
        # a torn append (a crash mid-write) neither counts nor hides the next key
        with open(keys.path, "ab") as f:
            f.write(b"1000777000 " + digests[22][:20])
        self.assertFalse(keys.contains(digests[22]))
        with keys.locked():
            keys.record(digests[21], 1_000_000_000 + 9 * day)
        self.assertTrue(keys.contains(digests[21]))
        self.assertFalse(keys.contains(digests[22]))

    @defer.inlineCallbacks
    def test_concurrent_deliveries_of_one_message_store_it_once(self) -> Any:
        results = yield defer.gatherResults(
            [self.store.deliver("alice", None, MESSAGE, "same key") for _ in range(8)])
        self.assertEqual(sorted(results), [False] * 7 + [True])
        self.assertEqual(len(stored_files(os.path.join(self.root, "alice"))), 1)

    def test_stale_tmp_files_are_removed(self) -> None:
        box = os.path.join(self.root, "alice")
        ensure_maildir(box)
        old = os.path.join(box, "tmp", "1.M1P1.crashed")
        fresh = os.path.join(box, "tmp", "2.M1P1.writing")
        for path in (old, fresh):
            with open(path, "wb"):
                pass
        os.utime(old, (1, 1))
        maildir_delivery._remove_stale_tmp(box, 1_000_000_000.0)
        self.assertEqual(os.listdir(os.path.join(box, "tmp")), [os.path.basename(fresh)])


class Key(unittest.TestCase):
    def test_message_id_and_line_ends(self) -> None:
        lf = b"Subject: x\nMessage-ID:\n  <folded@example.org>\n\nbody\nMessage-ID: <not@header>\n"
        self.assertEqual(message_id(lf), "<folded@example.org>")
        self.assertEqual(delivery_key(lf), delivery_key(lf.replace(b"\n", b"\r\n")))
        self.assertTrue(delivery_key(lf).startswith("<folded@example.org> sha256:"))
        self.assertNotEqual(delivery_key(lf), delivery_key(lf + b"more\n"))
        self.assertIsNone(message_id(b"Subject: none\n\nMessage-ID: <body@x>\n"))
        self.assertTrue(delivery_key(b"\nMessage-ID: <x@y>\n").startswith("sha256:"))


class TwistedMailDomain(unittest.TestCase):
    """The DeliveryDomain behind twisted.mail's ESMTP server, smtplib as the peer."""

    @defer.inlineCallbacks
    def test_rcpt_check_and_retry(self) -> Any:
        root = os.path.abspath(self.mktemp())
        ensure_maildir(os.path.join(root, "alice"))
        store = MaildirStore(os.path.join(root, "%u"))
        service = mail.MailService()
        service.addDomain(b"example.org", DeliveryDomain(store))
        from twisted.cred import checkers

        service.smtpPortal.registerChecker(checkers.AllowAnonymousAccess())
        port = reactor.listenTCP(0, service.getESMTPFactory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def send() -> list[Any]:
            out = []
            for _ in range(2):  # the second time: the same message again (a retry)
                client = smtplib.SMTP("127.0.0.1", port.getHost().port, timeout=10)
                out.append(client.sendmail("bob@example.net", ["alice@example.org", "ghost@example.org"],
                                           MESSAGE.replace(b"\n", b"\r\n")))
                client.quit()
            return out

        refused = yield threads.deferToThread(send)
        yield task.deferLater(reactor, 0.05, lambda: None)  # let the server see the connections close
        self.assertEqual([sorted(r) for r in refused], [["ghost@example.org"]] * 2)
        self.assertEqual(refused[0]["ghost@example.org"][0], 550)
        [path] = stored_files(os.path.join(root, "alice"))  # stored once: its key skips Received:
        content = read(path)
        self.assertTrue(content.startswith(b"Received: "), content[:100])
        self.assertTrue(content.endswith(MESSAGE), content)
