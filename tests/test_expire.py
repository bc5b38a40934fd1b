"""RFC 2449 EXPIRE n: removal n days after first retrieval, at login and by `popservice expire`."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from popservice.auth.passwdfile import PasswdFileChecker
from popservice.expire import expire_all
from popservice.server.policy import Policy
from popservice.stores.maildir import MaildirMailbox, MaildirStore
from popservice.stores.retrieval import RetrievalLog
from tests.support import ServerMixin, make_factory

DAY = 86400


def make_maildir(root: str, user: str, count: int) -> str:
    path = os.path.join(root, user)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    for i in range(count):
        with open(os.path.join(path, "cur", "%d.M%dP1.test:2," % (1700000000 + i, i)), "wb") as f:
            f.write(b"Subject: %d\n\nbody %d\n" % (i, i))
    return path


def files(path: str) -> list[str]:
    return sorted(os.listdir(os.path.join(path, "cur")) + os.listdir(os.path.join(path, "new")))


class RetrievalLogTests(unittest.TestCase):
    def test_first_retrieval_counts(self) -> None:
        log = RetrievalLog(self._dir())
        log.record(["a", "b"], 100)
        log.record(["a", "c", "bad uid"], 500)
        self.assertEqual(log.load(), {"a": 100.0, "b": 100.0, "c": 500.0})
        self.assertEqual(log.expired(1, 100 + DAY), {"a", "b"})
        self.assertEqual(log.expired(1, 100 + DAY - 1), set())
        log.forget(["a"])
        self.assertEqual(set(log.load()), {"b", "c"})

    def _dir(self) -> str:
        d = self.mktemp()
        os.makedirs(d)
        return d


class ExpireAtLogin(ServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.box = make_maildir(self.root, "alice", 3)
        passwd = os.path.join(self.root, "passwd")
        with open(passwd, "w") as f:
            f.write("alice:{PLAIN}secret:::::\n")
        self.clock = task.Clock()
        self.clock.advance(1700000000)
        self.listen(make_factory(MaildirStore(os.path.join(self.root, "%u")), [PasswdFileChecker(passwd)],
                                 clock=self.clock, login_timeout=0,
                                 policy=Policy(failure_delay=0, expire=30)))

    @defer.inlineCallbacks
    def session(self, *commands: bytes) -> Any:
        client = yield self.login()
        out = []
        for command in commands:
            if command.startswith((b"RETR", b"CAPA", b"UIDL")):
                out.append((yield client.command_multi(command)))
            else:
                out.append((yield client.command(command)))
        yield client.command(b"QUIT")
        yield client.lost
        return out

    @defer.inlineCallbacks
    def test_retrieved_messages_expire_after_n_days(self) -> Any:
        (capa, stat, uidl_before, retr, _) = yield self.session(
            b"CAPA", b"STAT", b"UIDL", b"RETR 2", b"TOP 3 0")
        uids_before = [line.split(b" ")[1] for line in uidl_before[1].split(b"\r\n") if line]
        self.assertIn(b"EXPIRE 30\r\n", capa[1])
        self.assertTrue(stat.startswith(b"+OK 3 "))
        self.clock.advance(29 * DAY)
        (stat,) = yield self.session(b"STAT")
        self.assertTrue(stat.startswith(b"+OK 3 "), stat)  # not yet
        self.clock.advance(DAY)
        (stat, uidl) = yield self.session(b"STAT", b"UIDL")
        self.assertTrue(stat.startswith(b"+OK 2 "), stat)  # message 2 expired; TOP is no retrieval
        self.assertEqual(len(files(self.box)), 2)
        lines = [line.split(b" ") for line in uidl[1].split(b"\r\n") if line]
        self.assertEqual(lines, [[b"1", uids_before[0]], [b"2", uids_before[2]]])  # numbered 1..n again

    @defer.inlineCallbacks
    def test_first_retrieval_is_what_counts(self) -> Any:
        yield self.session(b"RETR 1")
        self.clock.advance(20 * DAY)
        yield self.session(b"RETR 1")  # again: does not restart the period
        self.clock.advance(10 * DAY)
        (stat,) = yield self.session(b"STAT")
        self.assertTrue(stat.startswith(b"+OK 2 "), stat)


    @defer.inlineCallbacks
    def test_retrieval_counts_when_the_deletion_fails(self) -> Any:
        def refuse(self: MaildirMailbox, indices: list[int]) -> Any:
            return defer.fail(OSError(5, "Input/output error"))

        with_refusal = self.patch(MaildirMailbox, "delete", refuse)
        client = yield self.login()
        yield client.command_multi(b"RETR 2")
        self.assertTrue((yield client.command(b"DELE 2")).startswith(b"+OK"))
        answer = yield client.command(b"QUIT")
        self.assertTrue(answer.startswith(b"-ERR [SYS/TEMP]"), answer)
        yield client.lost
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)  # "UPDATE failed", logged
        with_refusal.restore()
        self.assertEqual(len(files(self.box)), 3)  # nothing removed
        self.clock.advance(30 * DAY)
        (stat,) = yield self.session(b"STAT")
        self.assertTrue(stat.startswith(b"+OK 2 "), stat)  # message 2's retrieval was recorded


class ExpireJob(unittest.TestCase):
    @defer.inlineCallbacks
    def test_popservice_expire(self) -> Any:
        root = os.path.abspath(self.mktemp())
        boxes = {u: make_maildir(root, u, 2) for u in ("alice", "bob", "carol")}
        passwd = os.path.join(root, "passwd")
        with open(passwd, "w") as f:
            f.write("alice:{PLAIN}a:::::\nbob:{PLAIN}b::::::expire=5\ncarol:{PLAIN}c:::::\n")
        store = MaildirStore(os.path.join(root, "%u"))
        for user in boxes:
            mailbox = yield store.open_mailbox(user, None)
            yield mailbox.record_retrieved([0], 1000)
            yield mailbox.close()
        held = yield store.open_mailbox("carol", None)  # in use: skipped
        self.addCleanup(held.close)
        records = list(PasswdFileChecker(passwd).records())
        results = yield expire_all(store, records, 30, 1000 + 10 * DAY)
        self.assertEqual(results, {"alice": 0, "bob": 1, "carol": "in use, skipped"})  # alice: 30 days not up
        self.assertEqual(len(files(boxes["bob"])), 1)
        self.assertEqual(len(files(boxes["alice"])), 2)
        results = yield expire_all(store, records, 30, 1000 + 31 * DAY)
        self.assertEqual(results["alice"], 1)
