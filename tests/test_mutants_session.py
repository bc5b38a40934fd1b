"""
TRANSACTION and UPDATE exactly (popservice.server.session over a real
Maildir, popservice.stores.maildir.mailbox): the answers' bytes at the edges
of the message numbering, what QUIT says and removes, the logout counts, a
deletion the file system refuses, and the mailbox's own index checks and
EXPIRE bookkeeping.  Written against the mutants that survived the older
tests (bench/mutation/run.py session).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from popservice.interfaces import MailboxUnavailable, MessageGone
from popservice.server.policy import Policy
from popservice.server.session import MailboxSession
from popservice.stores.maildir import INDEX_FILE_NAME, MaildirMailbox, MaildirStore
from popservice.stores.maildir.mailbox import MaildirMessageStream
from popservice.stores.retrieval import RetrievalLog
from tests.support import ServerMixin, make_factory, memory_checker, record_events

MESSAGES = [b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond body\n", b"Subject: three\n\n.\n"]
#: sizes as transmitted (CRLF line ends), what LIST and STAT report
SIZES = [len(m.replace(b"\n", b"\r\n")) for m in MESSAGES]


class MaildirCase(unittest.TestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.box = os.path.join(self.root, "alice")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.box, sub))
        for i, content in enumerate(MESSAGES):
            with open(os.path.join(self.box, "new", f"170000000{i}.m{i}.host"), "wb") as f:
                f.write(content)
        self.store = MaildirStore(os.path.join(self.root, "%u"))

    def files(self) -> list[str]:
        return sorted(name.split(":")[0] for sub in ("cur", "new")
                      for name in os.listdir(os.path.join(self.box, sub)))

    def refuse_removal(self, base: str) -> None:
        """Make the message file C{base} one the file system will not unlink (a directory now)."""
        victim = self.path_of(base)
        os.unlink(victim)
        os.mkdir(victim)

    def path_of(self, base: str) -> str:
        for sub in ("cur", "new"):
            for name in os.listdir(os.path.join(self.box, sub)):
                if name.split(":")[0] == base:
                    return os.path.join(self.box, sub, name)
        raise AssertionError(base)


class Transaction(ServerMixin, MaildirCase):
    def setUp(self) -> None:
        MaildirCase.setUp(self)
        self.listen(make_factory(self.store, [memory_checker(alice="secret")]))
        self.events = record_events(self.factory)

    def logout(self) -> dict[str, Any]:
        [fields] = [f for name, f in self.events if name == "logout"]
        return fields

    @defer.inlineCallbacks
    def test_numbering_edges(self) -> Any:
        client = yield self.login()
        self.assertEqual((yield client.command(b"STAT")), b"+OK 3 %d" % sum(SIZES))
        self.assertEqual((yield client.command(b"LIST 3")), b"+OK 3 %d" % SIZES[2])
        self.assertEqual((yield client.command(b"LIST 1")), b"+OK 1 %d" % SIZES[0])
        self.assertEqual((yield client.command(b"LIST 4")), b"-ERR No such message")
        self.assertEqual((yield client.command(b"UIDL 4")), b"-ERR No such message")
        self.assertEqual((yield client.command(b"DELE 4")), b"-ERR No such message")
        first, body = yield client.command_multi(b"LIST")
        self.assertEqual(first, b"+OK 3 messages (%d octets)" % sum(SIZES))
        self.assertEqual(body, b"".join(b"%d %d\r\n" % (i + 1, s) for i, s in enumerate(SIZES)))
        first, uids = yield client.command_multi(b"UIDL")
        self.assertEqual(first, b"+OK")
        uid = dict(line.split(b" ") for line in uids.split(b"\r\n") if line)
        self.assertEqual(sorted(uid), [b"1", b"2", b"3"])
        self.assertEqual((yield client.command(b"UIDL 2")), b"+OK 2 " + uid[b"2"])

    @defer.inlineCallbacks
    def test_deleted_message_cannot_be_named(self) -> Any:
        client = yield self.login()
        self.assertEqual((yield client.command(b"DELE 2")), b"+OK Message 2 deleted")
        self.assertEqual((yield client.command(b"DELE 2")), b"-ERR Message already deleted")
        self.assertEqual((yield client.command(b"LIST 2")), b"-ERR Message already deleted")
        self.assertEqual((yield client.command(b"UIDL 2")), b"-ERR Message already deleted")
        self.assertEqual((yield client.command(b"STAT")), b"+OK 2 %d" % (SIZES[0] + SIZES[2]))
        first, body = yield client.command_multi(b"LIST")
        self.assertEqual(first, b"+OK 2 messages (%d octets)" % (SIZES[0] + SIZES[2]))
        self.assertEqual(body, b"1 %d\r\n3 %d\r\n" % (SIZES[0], SIZES[2]))
        _, uids = yield client.command_multi(b"UIDL")
        self.assertEqual([line.split(b" ")[0] for line in uids.split(b"\r\n") if line], [b"1", b"3"])
        self.assertEqual((yield client.command(b"RSET")), b"+OK 3 %d" % sum(SIZES))
        self.assertEqual((yield client.command(b"LIST 2")), b"+OK 2 %d" % SIZES[1])
        self.assertEqual((yield client.command(b"QUIT")), b"+OK Bye")
        yield client.lost
        self.assertEqual(self.files(), ["1700000000.m0.host", "1700000001.m1.host", "1700000002.m2.host"])
        counts = {k: self.logout()[k] for k in ("retr", "retr_bytes", "top", "top_bytes", "deleted",
                                                "deleted_bytes")}
        self.assertEqual(counts, dict.fromkeys(counts, 0))

    @defer.inlineCallbacks
    def test_update_removes_the_marked_messages(self) -> Any:
        client = yield self.login()
        for n in (b"1", b"3"):
            self.assertEqual((yield client.command(b"DELE " + n)), b"+OK Message " + n + b" deleted")
        self.assertEqual((yield client.command(b"QUIT")), b"+OK Bye, 2 messages deleted")
        yield client.lost
        self.assertEqual(self.files(), ["1700000001.m1.host"])
        fields = self.logout()
        self.assertEqual((fields["deleted"], fields["deleted_bytes"]), (2, SIZES[0] + SIZES[2]))
        again = yield self.login()
        self.assertEqual((yield again.command(b"STAT")), b"+OK 1 %d" % SIZES[1])

    @defer.inlineCallbacks
    def test_update_reports_a_refused_deletion(self) -> Any:
        """A message the file system will not unlink (a directory now): -ERR [SYS/TEMP], the rest go."""
        client = yield self.login()
        for n in (b"1", b"2", b"3"):
            yield client.command(b"DELE " + n)
        self.refuse_removal("1700000001.m1.host")
        self.assertEqual((yield client.command(b"QUIT")),
                         b"-ERR [SYS/TEMP] Some deleted messages were not removed")
        yield client.lost
        self.assertEqual(self.files(), ["1700000001.m1.host"])
        fields = self.logout()
        self.assertEqual((fields["deleted"], fields["deleted_bytes"]), (2, SIZES[0] + SIZES[2]))

    @defer.inlineCallbacks
    def test_mutant_session_updated_retrieval_of_an_unremoved_message_is_recorded(self) -> Any:
        """
        Found by the mutant C{self.updated = False} in UPDATE: a message retrieved,
        marked and then not removed (the file system refused) must still count
        as retrieved for RFC 2449 EXPIRE, or it would never expire; one that
        was removed is not recorded.
        """
        self.listen(make_factory(self.store, [memory_checker(alice="secret")],
                                 policy=Policy(failure_delay=0, expire=5)))
        client = yield self.login()
        _, uids = yield client.command_multi(b"UIDL")
        uid = [line.split(b" ")[1].decode() for line in uids.split(b"\r\n") if line]
        for n in (b"1", b"2"):
            yield client.command_multi(b"RETR " + n)
            yield client.command(b"DELE " + n)
        self.refuse_removal("1700000000.m0.host")
        self.assertEqual((yield client.command(b"QUIT")),
                         b"-ERR [SYS/TEMP] Some deleted messages were not removed")
        yield client.lost
        self.assertEqual(self.files(), ["1700000000.m0.host", "1700000002.m2.host"])
        self.assertEqual(list(RetrievalLog(self.box).load()), [uid[0]])

    @defer.inlineCallbacks
    def test_marks_without_quit_are_not_deletions(self) -> Any:
        """A connection lost before QUIT has no UPDATE: nothing removed, retrievals recorded."""
        self.listen(make_factory(self.store, [memory_checker(alice="secret")],
                                 policy=Policy(failure_delay=0, expire=5)))
        client = yield self.login()
        _, uids = yield client.command_multi(b"UIDL")
        uid = [line.split(b" ")[1].decode() for line in uids.split(b"\r\n") if line]
        yield client.command_multi(b"RETR 2")
        self.assertEqual((yield client.command(b"DELE 2")), b"+OK Message 2 deleted")
        client.transport.loseConnection()
        yield client.lost
        for _ in range(100):  # the server side of the connection ends on its own time
            if RetrievalLog(self.box).load():
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(list(RetrievalLog(self.box).load()), [uid[1]])
        self.assertEqual(len(self.files()), 3)

    @defer.inlineCallbacks
    def test_quit_without_deletions(self) -> Any:
        client = yield self.login()
        self.assertEqual((yield client.command(b"QUIT")), b"+OK Bye")
        yield client.lost
        self.assertEqual(len(self.files()), 3)


class Mailbox(MaildirCase):
    @defer.inlineCallbacks
    def open(self) -> Any:
        mailbox = yield self.store.open_mailbox("alice", None)
        self.addCleanup(mailbox.close)
        return mailbox

    @defer.inlineCallbacks
    def test_indices_outside_the_listing(self) -> Any:
        mailbox: MaildirMailbox = yield self.open()
        for index in (-1, 3):
            self.failureResultOf(mailbox.open(index), IndexError)
        stream = yield mailbox.open(2)
        self.assertEqual((yield stream.read()), MESSAGES[2])
        stream.close()
        self.assertEqual((yield mailbox.delete([-1, 3, 0])), [-1, 3])
        self.assertEqual(self.files(), ["1700000001.m1.host", "1700000002.m2.host"])
        # deleting it again is not a failure (and does not stop the others), and it stays unreadable
        self.assertEqual((yield mailbox.delete([0, 1])), [])
        self.assertEqual(self.files(), ["1700000002.m2.host"])
        self.failureResultOf(mailbox.open(0), MessageGone)
        self.assertIn("3 messages", repr(mailbox))

    @defer.inlineCallbacks
    def test_session_numbers_start_at_one(self) -> Any:
        """The session checks the numbering itself too (the parser refuses 0 before it)."""
        mailbox: MaildirMailbox = yield self.open()
        session = MailboxSession(mailbox, (yield mailbox.listing()))
        for answer in (session.list(0), session.uidl(0), session.dele(0), session.list(4)):
            self.assertEqual(answer, b"-ERR No such message\r\n")
        self.assertEqual(session.list(3), b"+OK 3 %d\r\n" % SIZES[2])

    @defer.inlineCallbacks
    def test_unreadable_message_is_mailbox_unavailable(self) -> Any:
        """A message file the server cannot open (a directory now): the mailbox, not the server, fails."""
        mailbox: MaildirMailbox = yield self.open()
        self.refuse_removal("1700000001.m1.host")
        self.failureResultOf(mailbox.open(1), MailboxUnavailable)

    @defer.inlineCallbacks
    def test_index_that_cannot_be_rewritten_does_not_fail_deletion(self) -> Any:
        mailbox: MaildirMailbox = yield self.open()
        index = os.path.join(self.box, INDEX_FILE_NAME)
        with open(index, "rb") as f:
            content = f.read()
        os.unlink(index)
        os.mkdir(index)  # now neither readable as a file nor replaceable
        with open(os.path.join(index, "keep"), "wb") as f:
            f.write(content)
        self.assertEqual((yield mailbox.delete([0])), [])
        self.assertEqual(len(self.files()), 2)

    @defer.inlineCallbacks
    def test_closed_mailbox(self) -> Any:
        mailbox: MaildirMailbox = yield self.open()
        yield mailbox.close()
        self.failureResultOf(mailbox.open(0), MailboxUnavailable)
        self.failureResultOf(mailbox.delete([0]), MailboxUnavailable)
        self.failureResultOf(mailbox.expire(0, 0.0), MailboxUnavailable)
        self.assertIsNone((yield mailbox.close()))
        self.assertEqual(len(self.files()), 3)

    def test_a_read_error_is_mailbox_unavailable(self) -> None:
        """EIO from a real file (/proc/self/mem at address 0): the stream fails and closes."""
        stream = MaildirMessageStream(open("/proc/self/mem", "rb", buffering=0))
        self.failureResultOf(stream.read(), MailboxUnavailable)
        self.assertEqual(self.successResultOf(stream.read()), b"")

    @defer.inlineCallbacks
    def test_expire_failure_is_mailbox_unavailable(self) -> Any:
        mailbox: MaildirMailbox = yield self.open()
        os.mkdir(RetrievalLog(self.box).path)  # the retrieval log cannot be read
        yield self.assertFailure(mailbox.expire(1, 0.0), MailboxUnavailable)
        self.assertEqual(len(self.files()), 3)

    @defer.inlineCallbacks
    def test_a_lock_that_fails_to_release_does_not_fail_close(self) -> Any:
        """The session lock's descriptor closed under it: close() logs the error and still succeeds."""
        mailbox: MaildirMailbox = yield self.open()
        lock = mailbox._lock
        assert lock is not None and lock.held
        os.close(lock._fd)
        self.assertIsNone((yield mailbox.close()))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertFalse(lock.held)

    @defer.inlineCallbacks
    def test_record_retrieved_skips_unknown_and_deleted(self) -> Any:
        mailbox: MaildirMailbox = yield self.open()
        listing = yield mailbox.listing()
        yield mailbox.delete([1])
        yield mailbox.record_retrieved([-1], 500.0)
        self.assertEqual(RetrievalLog(self.box).load(), {})
        yield mailbox.record_retrieved([-1, 0, 1, 2, 3], 1000.0)
        self.assertEqual(RetrievalLog(self.box).load(), {listing[0].uid: 1000.0, listing[2].uid: 1000.0})
        # a log that cannot be written only means the messages are kept longer
        os.unlink(RetrievalLog(self.box).path)
        os.mkdir(RetrievalLog(self.box).path)
        self.assertIsNone((yield mailbox.record_retrieved([0], 2000.0)))

    @defer.inlineCallbacks
    def test_expire_removes_old_retrievals_only(self) -> Any:
        mailbox: MaildirMailbox = yield self.open()
        listing = yield mailbox.listing()
        day = 86400.0
        log = RetrievalLog(self.box)
        log.record([listing[0].uid], 0.0)
        log.record([listing[2].uid], 2 * day)
        log.record(["gone-long-ago"], 0.0)
        # at 3 days, with EXPIRE 1: the messages retrieved at 0 and 2 days; at exactly 1 day old too
        self.assertEqual((yield mailbox.expire(1, 3 * day)), 2)
        self.assertEqual(self.files(), ["1700000001.m1.host"])
        self.assertEqual(RetrievalLog(self.box).load(), {})
        # the listing it goes on serving has only the message left, renumbered
        stream = yield mailbox.open(0)
        self.assertEqual((yield stream.read()), MESSAGES[1])
        stream.close()
        self.failureResultOf(mailbox.open(1), IndexError)
        self.assertIn("1 messages", repr(mailbox))
        self.assertEqual((yield mailbox.expire(1, 3 * day)), 0)

    @defer.inlineCallbacks
    def test_expire_boundary_and_a_refused_removal(self) -> Any:
        mailbox: MaildirMailbox = yield self.open()
        listing = yield mailbox.listing()
        day = 86400.0
        log = RetrievalLog(self.box)
        log.record([listing[0].uid, listing[1].uid], 10 * day)
        log.record([listing[2].uid], 10 * day + 1)
        self.refuse_removal("1700000001.m1.host")
        # exactly 2 days after the first two retrievals, a second before the third's 2 days
        self.assertEqual((yield mailbox.expire(2, 12 * day)), 1)
        self.assertEqual(self.files(), ["1700000001.m1.host", "1700000002.m2.host"])
        # the refused one is still listed and still remembered, as is the young one
        self.assertEqual(sorted(RetrievalLog(self.box).load()), sorted([listing[1].uid, listing[2].uid]))
        self.assertIn("2 messages", repr(mailbox))
        self.assertEqual((yield mailbox.listing())[1].uid, listing[2].uid)
